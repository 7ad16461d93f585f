r"""Command line: convert pretrained weights into an mmjax checkpoint, or export one to HF.

Import (writes DST/state, the Orbax checkpoint `config.init_from.checkpoint=DST` loads,
DST/model_config.json, the model's fields plus the source's pixel normalisation
`image_normalization`, and DST/conversion_report.txt):

  python -m mmjax.convert --from hf --src ./vit-base-patch16-224 --dst /ckpt/vit_b16_hf
  python -m mmjax.convert --from big_vision --src siglip_b16_224.npz --dst /ckpt/siglip_b16
  python -m mmjax.convert --from big_vision --src vit_b16.npz --dst /ckpt/vit_b16 \
      --image-size 384                       # position grid resampled from 224
  python -m mmjax.convert --from timm --src vit_small.pth --dst /ckpt/vit_s16 --num-heads 6
  python -m mmjax.convert --from hf --src ./paligemma-3b-pt-224 --dst /ckpt/paligemma
  python -m mmjax.convert --from hf --src ./gemma-2b ./siglip-so400m-patch14-224 \
      --dst /ckpt/my_vlm                     # LM + vision tower; the projector is new

  The derived model config computes the checkpoint's activation and LayerNorm epsilon
  (exact GELU / 1e-12 for Hub ViTs, quick GELU / 1e-5 for CLIP, exact GELU / 1e-6 for
  timm); --allow-approximate accepts a --model-config that computes something else.

  --model-config: the mmjax model to load into (configs/NAME.py, whose get_config().model
  is used, or a JSON file such as a previous DST/model_config.json); default: derived
  from the checkpoint. --skip REGEX (repeatable) leaves mmjax parameters out, e.g. a head
  of another size, which init_from then initialises.

Export (an mmjax checkpoint: a converted DST, a run directory or one of its steps -> a
Hugging Face model directory):

  python -m mmjax.convert --to hf --src /ckpt/vit_b16 --dst ./vit-b16-hf --image-size 224
  python -m mmjax.convert --to hf --src /runs/my_vlm --dst ./my-paligemma \
      --model-config /ckpt/paligemma/model_config.json     # a "vlm" -> PaliGemma
"""
import argparse
import json
import os
import sys
from typing import Optional, Sequence

import ml_collections

from mmjax.errors import ConfigError, run_reporting_user_errors


def read_model_config(spec: Optional[str]) -> Optional[ml_collections.ConfigDict]:
  """A configs/NAME.py (its get_config().model) or a JSON file -> the model ConfigDict."""
  if not spec:
    return None
  if spec.endswith(".py"):
    from mmjax.train.config import load_config_file  # pylint: disable=g-import-not-at-top
    config = load_config_file(spec)
    return config.model if "model" in config else config
  if spec.endswith(".json"):
    from mmjax.convert import common  # pylint: disable=g-import-not-at-top
    with open(spec) as f:
      fields = json.load(f)
    fields.pop(common.IMAGE_NORMALIZATION, None)  # the data's, not a model field
    return ml_collections.ConfigDict(fields)
  raise ConfigError(f"--model-config must be a configs/NAME.py or a .json file; given {spec!r}.")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mmjax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  direction = p.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from", dest="source_format", choices=("big_vision", "hf", "timm"),
                         help="import a checkpoint of this format")
  direction.add_argument("--to", dest="target_format", choices=("hf",),
                         help="export an mmjax checkpoint to this format")
  p.add_argument("--src", required=True, nargs="+",
                 help="checkpoint file or directory to read (several only for VLM parts: "
                      "a Gemma / Llama LM and a SigLIP vision tower)")
  p.add_argument("--dst", required=True, help="directory to write (must not exist yet)")
  p.add_argument("--model-config", help="configs/NAME.py or model_config.json")
  p.add_argument("--image-size", type=int, help="image size the mmjax model runs at")
  p.add_argument("--num-heads", type=int,
                 help="attention heads, for files that do not record them (timm)")
  p.add_argument("--skip", action="append", default=[],
                 help="regex of mmjax parameters to leave out (repeatable)")
  p.add_argument("--allow-approximate", action="store_true",
                 help="accept a model computing another activation / LayerNorm epsilon "
                      "than the checkpoint")
  p.add_argument("--no-strict", action="store_true",
                 help="report, instead of refusing, unused or unfilled parameters")
  p.add_argument("--debug", action="store_true",
                 help="show the traceback of user errors (bad flags, missing or truncated files)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  model_config = read_model_config(args.model_config)
  sources = args.src
  from mmjax.convert import hf_vlm  # pylint: disable=g-import-not-at-top
  vlm_parts = args.source_format == "hf" and all(hf_vlm.is_vlm_source(s) for s in sources)
  if len(sources) > 1 and not vlm_parts:
    raise SystemExit(f"--src takes several directories only for Hugging Face VLM parts "
                     f"({', '.join(hf_vlm.MODEL_TYPES)}); given {sources}.")
  args.src = sources[0]
  if args.target_format == "hf":
    from mmjax.convert import export_hf  # pylint: disable=g-import-not-at-top
    if model_config is None:
      path = os.path.join(args.src, "model_config.json")
      if not os.path.exists(path):
        raise ConfigError(f"--model-config is needed: {path} does not exist.")
      model_config = read_model_config(path)
    from mmjax.train.checkpoint import load_params  # pylint: disable=g-import-not-at-top
    params = load_params(args.src)  # what init_from reads: a converted DST or a run
    if model_config.get("name") == "vlm":
      hf_vlm.export(params, model_config, args.dst, image_size=args.image_size)
    else:
      export_hf.export(params, model_config, args.dst, image_size=args.image_size)
    print(f"wrote Hugging Face model to {args.dst}")
    return 0

  strict = not args.no_strict
  if vlm_parts:
    params, model_config, report = hf_vlm.load(
        sources, model_config, image_size=args.image_size, skip=args.skip, strict=strict)
  elif args.source_format == "hf":
    from mmjax.convert import hf  # pylint: disable=g-import-not-at-top
    params, model_config, report = hf.load(
        args.src, model_config, image_size=args.image_size, skip=args.skip,
        allow_approximate=args.allow_approximate, strict=strict)
  elif args.source_format == "timm":
    from mmjax.convert import timm  # pylint: disable=g-import-not-at-top
    params, model_config, report = timm.load(
        args.src, model_config, num_heads=args.num_heads, image_size=args.image_size,
        skip=args.skip, allow_approximate=args.allow_approximate, strict=strict)
  else:
    from mmjax.convert import big_vision  # pylint: disable=g-import-not-at-top
    params, model_config, report = big_vision.load(
        args.src, model_config, num_heads=args.num_heads, image_size=args.image_size,
        skip=args.skip, strict=strict)
  from mmjax.convert import common  # pylint: disable=g-import-not-at-top
  state = common.save_checkpoint(params, args.dst, model_config=model_config, report=report)
  print(report)
  print(f"wrote {state}; train from it with --config.init_from.checkpoint={os.path.abspath(args.dst)}"
        f" and the model config in {os.path.join(os.path.abspath(args.dst), 'model_config.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(run_reporting_user_errors(main, debug="--debug" in sys.argv[1:]))
