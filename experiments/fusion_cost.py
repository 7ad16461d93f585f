"""What each fusion strategy costs at MBT's real token counts (the efficiency claim of
Nagrani et al. 2021, which the toy-scale ablation cannot show).

  python experiments/fusion_cost.py [--topology v5e:2x4] [--skip-aot] [--skip-cpu]
      [--strategies early,cross,...] [--repeats 2]

(`--skip-aot` / `--skip-cpu` keep the memory / CPU-time columns of the previous run's JSON;
`--strategies` measures only those fusions and keeps the other rows. CPU ratios are only
comparable within one run: measure them for all strategies at once, on a quiet machine.)

`configs/mbt_audiovisual.py` with 16 px patches per frame instead of its 2-frame tubelets
(the token count MBT's efficiency table is about): ViT-B width (12 layers, 768 wide, 12
heads), 8 frames of 224 px cut into 16 px patches (1,568 tokens) plus an 8 s, 128-bin
log-mel spectrogram (400 tokens): 1,968 tokens per clip. For each strategy:
  - analytic forward GFLOPs per clip of the whole model (mmjax.models.flops);
  - per-chip peak memory of the real train step (batch 64 on 8 chips, bfloat16),
    compiled deviceless by `mmjax.aot` for a TPU topology;
  - CPU time (process time, all threads) of forward + backward of the fusion block
    stack alone on one clip's tokens, as a ratio to joint (early) fusion, all measured
    in this one run.
Writes experiments/results/fusion_cost.{json,md}.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from mmjax import aot  # noqa: E402  pylint: disable=wrong-import-position
from mmjax.data import pipeline  # noqa: E402  pylint: disable=wrong-import-position
from mmjax.models import flops as flops_lib  # noqa: E402  pylint: disable=wrong-import-position
from mmjax.models.base import build_model  # noqa: E402  pylint: disable=wrong-import-position
from mmjax.nn.transformer import BlockConfig  # noqa: E402  pylint: disable=wrong-import-position
from mmjax.registry import FUSIONS  # noqa: E402  pylint: disable=wrong-import-position
from mmjax.train import trainer  # noqa: E402  pylint: disable=wrong-import-position
from mmjax.train.config import load_config_file  # noqa: E402  pylint: disable=wrong-import-position

STRATEGIES = {  # label: model overrides (fusion_layer 8 and 4 bottlenecks as MBT's best;
                #   None unsets a field the strategy does not use)
    "early (joint from layer 0)": {"fusion": "early", "fusion_layer": None,
                                   "num_bottlenecks": None},
    "hybrid (joint from layer 8)": {"fusion": "hybrid", "fusion_layer": 8,
                                    "num_bottlenecks": None},
    "bottleneck B4 (from layer 8)": {"fusion": "bottleneck", "fusion_layer": 8},
    "cross (from layer 8)": {"fusion": "cross", "fusion_layer": 8, "num_bottlenecks": None},
    "fusion-in-transformer": {"fusion": "fusion_in_transformer", "fusion_layer": None,
                              "num_bottlenecks": None},
    "late": {"fusion": "late", "fusion_layer": None, "num_bottlenecks": None},
}


AOT_FIELDS = ("peak_gib", "needed_gib", "fits", "error", "global_batch")
CPU_FIELDS = ("cpu_seconds",)


def _config(overrides):
  config = load_config_file(os.path.join(ROOT, "configs", "mbt_audiovisual.py"))
  config.model.video_patch_size = (1, 16, 16)
  for key, value in overrides.items():
    config.model[key] = value
  return config


def analytic_gflops(config) -> float:
  model = build_model(config.model)
  spec = pipeline.batch_spec(config.data)
  batch = {k: jax.ShapeDtypeStruct((1,) + shape, dtype) for k, (shape, dtype) in spec.items()}
  variables = jax.eval_shape(
      lambda b: model.init(jax.random.key(0), b, train=False, method="loss"), batch)
  return flops_lib.model_flops(model, variables, batch, method="loss", train=False) / 1e9


def block_stack_seconds(config, tokens, repeats: int) -> float:
  """Median CPU seconds (this process, all threads) of jit(grad) of the fusion encoder
  alone on one clip's tokens. CPU time rather than wall time, so that other work on the
  machine changes the ratios little."""
  m = config.model
  encoder = FUSIONS.get(m.fusion)(
      num_layers=m.num_layers, block=BlockConfig(num_heads=m.num_heads, mlp_dim=m.mlp_dim),
      fusion_layer=m.get("fusion_layer"), num_bottlenecks=m.get("num_bottlenecks"))
  masks = {k: jnp.ones(v.shape[:2], bool) for k, v in tokens.items()}
  params = encoder.init(jax.random.key(0), tokens, masks)

  @jax.jit
  def step(params, tokens):
    loss = lambda p: sum(jnp.mean(jnp.square(v)) for v in encoder.apply(p, tokens, masks).values())
    return jax.grad(loss)(params)

  jax.block_until_ready(step(params, tokens))
  times = []
  for _ in range(repeats):
    start = time.process_time()
    jax.block_until_ready(step(params, tokens))
    times.append(time.process_time() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--topology", default="v5e:2x4")
  parser.add_argument("--skip-aot", action="store_true")
  parser.add_argument("--skip-cpu", action="store_true")
  parser.add_argument("--strategies", default="",
                      help="comma-separated fusion names to measure (default: all)")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
  args = parser.parse_args()
  trainer.import_models()
  devices = None if args.skip_aot else aot.topology_devices(args.topology)
  base = _config({})
  width = base.model.width
  rng = np.random.default_rng(0)
  # Token counts of one clip, from the declared VGGSound shapes: 8 x (224/16)^2 video
  # patches, (800 frames / 16) x (128 bins / 16) spectrogram patches.
  counts = {"video": 8 * (224 // 16) ** 2, "audio": (128_000 // 160 // 16) * (128 // 16)}
  tokens = {k: jnp.asarray(rng.normal(size=(1, n, width)), jnp.float32)
            for k, n in counts.items()}
  json_path = os.path.join(args.out, "fusion_cost.json")
  wanted = set(filter(None, args.strategies.split(",")))
  unknown = wanted - {o["fusion"] for o in STRATEGIES.values()}
  if unknown:
    parser.error(f"--strategies: unknown {sorted(unknown)}; expected some of "
                 f"{[o['fusion'] for o in STRATEGIES.values()]}")
  earlier = {}  # rows (or columns) this run does not measure are kept from the last run
  if os.path.exists(json_path):
    with open(json_path) as f:
      earlier = {r["strategy"]: r for r in json.load(f)}
  rows = []
  for label, overrides in STRATEGIES.items():
    if wanted and overrides["fusion"] not in wanted:
      if label in earlier:
        rows.append(earlier[label])
      continue
    config = _config(overrides)
    kept = earlier.get(label, {})
    row = {"strategy": label, "tokens": counts, "gflops_per_clip": analytic_gflops(config),
           **{k: kept[k] for k in AOT_FIELDS if args.skip_aot and k in kept},
           **{k: kept[k] for k in CPU_FIELDS if args.skip_cpu and k in kept}}
    if not args.skip_cpu:
      row["cpu_seconds"] = block_stack_seconds(config, tokens, args.repeats)
    if devices is not None:
      config.model.dtype = "bfloat16"
      report = aot.compile_config(config, args.topology, devices, "mbt_audiovisual.py")
      row.update(peak_gib=report.peak_bytes / 2**30 if report.compiled else None,
                 needed_gib=report.needed_bytes / 2**30 if report.out_of_memory else None,
                 fits=report.fits, error=report.error, global_batch=report.global_batch)
    rows.append(row)
    print(row, flush=True)
  joint = rows[0].get("cpu_seconds") if rows and rows[0]["strategy"].startswith("early") else None
  for row in rows:
    row["cpu_time_vs_early"] = (row["cpu_seconds"] / joint
                                if joint and row.get("cpu_seconds") else None)
  with open(json_path, "w") as f:
    json.dump(rows, f, indent=1)
  lines = [f"| strategy | GFLOPs per clip (forward) | per-chip peak GiB ({args.topology}, "
           "batch 64, bf16) | CPU fwd+bwd of the block stack vs early |",
           "|---|---:|---:|---:|"]
  for row in rows:
    peak = (f"{row['peak_gib']:.2f}" if row.get("peak_gib") else
            f"needs {row['needed_gib']:.2f} (> HBM)" if row.get("needed_gib") else "-")
    ratio = f"x{row['cpu_time_vs_early']:.2f}" if row.get("cpu_time_vs_early") else "-"
    lines.append(f"| {row['strategy']} | {row['gflops_per_clip']:.0f} | {peak} | {ratio} |")
  with open(os.path.join(args.out, "fusion_cost.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
