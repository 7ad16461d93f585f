"""Pretrained weights in and out of mmjax.

  hf.load(path)          Hugging Face ViT / CLIP (directory or weights file) -> "vit" / "two_tower"
  timm.load(path)        timm VisionTransformer state dict -> "vit"
  big_vision.load(path)  big_vision / vision_transformer ViT .npz -> "vit"
  export_hf.export(params, model_config, dir)   "vit" / "two_tower" -> HF ViT / CLIP directory
  common                 checkpoint reading, the name-by-name Mapper and its Report, Orbax output

Each `load` returns (params, model_config, report): params fit `build_model(model_config)`
exactly (derived from the checkpoint unless given), and the report lists what was loaded,
unused, missing and resampled, and the source's pixel normalisation (`image_normalization`,
which `common.save_checkpoint` records in DST/model_config.json for the data pipeline).
Any shape mismatch is refused with every offending name.
Command line: `python -m mmjax.convert --help`.
"""
