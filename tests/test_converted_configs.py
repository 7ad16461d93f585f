"""Converted weights train in one flag: the paper configs build the architectures the
converters write, and a converted checkpoint's pixel normalisation reaches the data.

The converters run on the tiny random Hugging Face models of tests/test_convert_parity.py
and tests/test_convert_vlm.py (the convert extra: transformers, torch).
"""
import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip(
    "transformers", reason="converter tests need transformers (pip install -e '.[convert]')")

# pylint: disable=g-bad-import-order,unused-import
from test_convert_parity import HEADS, TIMM, _hf_vit, hf_clip, hf_siglip  # noqa: E402,F401
from test_convert_parity import siglip_big_vision_params, timm_state_dict  # noqa: E402
from test_convert_vlm import TEXT, VISION  # noqa: E402

from mmjax.convert import big_vision, common, hf, hf_vlm, timm  # noqa: E402
from mmjax.data import pipeline  # noqa: E402
from mmjax.train import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Sizes and vocabulary facts, which a paper config sets to the paper's and the tiny test
# models do not share; every other field a converter writes is architecture.
SIZES = {"variant", "width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim",
         "patch_size", "num_classes", "vocab_size", "embed_dim", "max_text_len", "eos_id",
         "image_width", "image_depth", "image_heads", "image_mlp_dim",
         "text_width", "text_depth", "text_heads", "text_mlp_dim"}


def _architecture(fields):
  """The architecture fields of a model config; a pre-logits layer only as present / absent."""
  out = {}
  for key, value in dict(fields).items():
    if key in SIZES:
      continue
    if key == "representation_size":
      value = value is not None
    elif isinstance(value, dict) or hasattr(value, "to_dict"):
      value = _architecture(value)
    out[key] = value
  return out


def _clip(request):
  with open(os.path.join(request.getfixturevalue("hf_clip")[1], "config.json")) as f:
    return hf.clip_model_config(json.load(f))


def _siglip(request):
  weights = big_vision.normalize(siglip_big_vision_params(request.getfixturevalue("hf_siglip")))
  return big_vision.siglip_model_config(weights)


def _timm_vit(request):
  del request
  return timm.vit_model_config(timm_state_dict(_hf_vit(4, **TIMM)), HEADS)


def _hf_hub_vit(request):
  del request
  model = _hf_vit(0)  # transformers' ViT defaults: exact GELU, LayerNorm epsilon 1e-12
  weights = hf.normalize_vit({k: v.numpy() for k, v in model.state_dict().items()})
  return hf.vit_model_config(model.config.to_dict(), weights)


def _paligemma(request):
  del request
  config = transformers.PaliGemmaConfig(
      vision_config=dict(VISION, vision_use_head=False),
      text_config=dict(model_type="gemma", **TEXT), projection_dim=TEXT["hidden_size"],
      image_token_index=TEXT["vocab_size"] - 1, vocab_size=TEXT["vocab_size"])
  return hf_vlm.model_config_of([("paligemma", config.to_dict())])[0]


@pytest.mark.parametrize("config_file, converted", [
    ("clip_b16.py", _clip), ("siglip_b16.py", _siglip), ("vit_b16_imagenet.py", _timm_vit),
    ("vit_b16_imagenet.py", _hf_hub_vit), ("paligemma_224.py", _paligemma)],
    ids=["clip_b16-hf", "siglip_b16-big_vision", "vit_b16_imagenet-timm",
         "vit_b16_imagenet-hf", "paligemma_224-hf"])
def test_paper_config_with_init_from_builds_the_converted_architecture(
    config_file, converted, request, tmp_path):
  """`--config.init_from.checkpoint=DST` alone: the config's model, completed from
  DST/model_config.json, has every architecture field the converter wrote (pre-norm,
  activation, LayerNorm epsilon, pooling, pre-logits, ...); no field the config sets
  contradicts the converted weights."""
  written = converted(request).to_dict()
  (tmp_path / "model_config.json").write_text(json.dumps(written))
  config_lib.import_models()
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", config_file))
  config.init_from.checkpoint = str(tmp_path)
  config_lib.model_fields_from_init_checkpoint(config)
  assert _architecture(config.model.to_dict()).items() >= _architecture(written).items(), (
      {k: (config.model.to_dict().get(k), v) for k, v in _architecture(written).items()
       if _architecture(config.model.to_dict()).get(k) != v})


# ------------------------------------------------------------------- pixel normalisation


def test_converted_pixel_normalisation_is_recorded_and_applied_by_the_pipeline(
    hf_clip, tmp_path):  # pylint: disable=redefined-outer-name
  params, model_config, report = hf.load(hf_clip[1])
  dst = str(tmp_path / "clip")
  common.save_checkpoint(params, dst, model_config=model_config, report=report)
  with open(os.path.join(dst, "model_config.json")) as f:
    assert json.load(f)["image_normalization"] == common.CLIP_NORMALIZATION
  # A preprocessor_config.json, when the source has one, is what is recorded.
  with open(os.path.join(hf_clip[1], "preprocessor_config.json"), "w") as f:
    json.dump({"do_normalize": True, "image_mean": [0.1, 0.2, 0.3], "image_std": 0.25}, f)
  assert hf.load(hf_clip[1])[2].image_normalization == {"mean": [0.1, 0.2, 0.3],
                                                         "std": [0.25] * 3}
  os.remove(os.path.join(hf_clip[1], "preprocessor_config.json"))

  config = config_lib.default_config()
  config.data = pipeline.default_config("digits", data_dir=str(tmp_path / "data"))
  config.init_from.checkpoint = dst
  plain = next(iter(pipeline.create_eval_iterator(config.data, global_batch_size=4)))["image"]
  assert config_lib.data_fields_from_init_checkpoint(config) == {"image_normalization": (
      tuple(common.CLIP_NORMALIZATION["mean"]), tuple(common.CLIP_NORMALIZATION["std"]))}
  clip = next(iter(pipeline.create_eval_iterator(config.data, global_batch_size=4)))["image"]
  pixels = plain * 0.5 + 0.5  # the default normalisation is (0.5, 0.5)
  mean, std = (np.asarray(common.CLIP_NORMALIZATION[k], np.float32) for k in ("mean", "std"))
  np.testing.assert_allclose(clip, (pixels - mean) / std, atol=1e-5)
  # A normalisation the config sets wins over the checkpoint's.
  config.data.image_normalization = (0.5, 0.5)
  assert config_lib.data_fields_from_init_checkpoint(config) == {}
