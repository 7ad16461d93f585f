"""The README's "Will it fit?" table: every paper config on its intended TPU topology, at
its real global batch, in bfloat16, compiled deviceless by `mmjax.aot`.

  python experiments/will_it_fit.py [--rows NAME[:K],NAME] [--max-compiles 4]

For each row the settings are tried in order (the config's default mesh first, then
rematerialisation, then FSDP) until one fits; the rows of the table are the default's
outcome and the first setting that fits, each with the `python -m mmjax.aot` command
that reproduces it. The largest global batch that fits is then searched with that
setting (`--find-max-batch`, at most --max-compiles extra compiles). `NAME:K` starts a
row at its K-th setting (to skip settings already known not to fit). Writes
experiments/results/will_it_fit.{json,md}.
"""
import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmjax import aot  # noqa: E402  pylint: disable=wrong-import-position
from mmjax import sweep as sweep_lib  # noqa: E402  pylint: disable=wrong-import-position
from mmjax.train.config import load_config_file  # noqa: E402  pylint: disable=wrong-import-position

BF16 = {"model.dtype": "bfloat16"}
SO400M_14 = {  # SigLIP So400m/14 (both towers So400m-shaped, 224 px: 256 image tokens)
    "model.patch_size": 14, "model.image_width": 1152, "model.image_depth": 27,
    "model.image_heads": 16, "model.image_mlp_dim": 4304, "model.text_width": 1152,
    "model.text_depth": 27, "model.text_heads": 16, "model.text_mlp_dim": 4304,
    "model.embed_dim": 1152}
SCAN = {"model.scan_layers": True}
REMAT = {"model.remat_policy": "dots_no_batch"}
FULL_REMAT = {"model.remat_policy": "full"}

# name: (config, topology, base overrides, settings tried in order until one fits)
ROWS = {
    "vit_b16": ("vit_b16_imagenet.py", "v5e:4x4", {**BF16, **SCAN},
                [{}, REMAT, FULL_REMAT, {**FULL_REMAT, "mesh.fsdp": 16}]),
    "vit_l16": ("vit_b16_imagenet.py", "v5e:4x4", {**BF16, **SCAN, "model.variant": "L/16"},
                [{}, FULL_REMAT, {**FULL_REMAT, "mesh.fsdp": 16}]),
    "clip_b16": ("clip_b16.py", "v5e:16x16", {**BF16, **SCAN},
                 [{}, FULL_REMAT, {**FULL_REMAT, "mesh.fsdp": 16}]),
    "siglip_b16": ("siglip_b16.py", "v5e:16x16", {**BF16, **SCAN},
                   [{}, FULL_REMAT, {**FULL_REMAT, "mesh.fsdp": 16}]),
    "siglip_so400m14": ("siglip_b16.py", "v5e:16x16", {**BF16, **SCAN, **SO400M_14},
                        [{}, FULL_REMAT, {**FULL_REMAT, "mesh.fsdp": 16}]),
    "mbt": ("mbt_audiovisual.py", "v5e:2x4", BF16, [{}, {"mesh.fsdp": 8}]),
    # PaliGemma 3B (So400m/14 + Gemma 2B), big_vision's transfer batch of 256.
    "paligemma_224": ("paligemma_224.py", "v5e:4x4", {},
                      [{}, {"mesh.fsdp": 16}, {"mesh.fsdp": 16, **FULL_REMAT}]),
}

def command(config: str, topology: str, overrides) -> str:
  flags = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
  return f"python -m mmjax.aot --config configs/{config} --topology {topology} {flags}"


def _configured(config_file: str, overrides):
  config = load_config_file(os.path.join(ROOT, "configs", config_file))
  known = {k: v for k, v in overrides.items()
           if k.partition(".")[2] in config[k.partition(".")[0]]}
  config = sweep_lib.apply_overrides(config, known)
  for key, value in overrides.items():  # model fields the file leaves at their defaults
    if key not in known:
      section, _, field = key.partition(".")
      config[section][field] = value
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS))
  parser.add_argument("--max-compiles", type=int, default=4)
  parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
  args = parser.parse_args()
  json_path = os.path.join(args.out, "will_it_fit.json")
  rerun = {name: int(first or 0) for name, _, first in
           (entry.partition(":") for entry in args.rows.split(","))}
  unknown = sorted(set(rerun) - set(ROWS))
  if unknown:
    parser.error(f"--rows: unknown {unknown}; expected some of {list(ROWS)}")
  for name, first in rerun.items():
    config_file, topology, base, settings = ROWS[name]
    devices = aot.topology_devices(topology)
    for index, setting in list(enumerate(settings))[first:]:
      overrides = {**base, **setting}
      report = aot.compile_config(_configured(config_file, overrides), topology, devices,
                                  config_file)
      print(f"[{name}] {command(config_file, topology, overrides)}\n{report.summary()}",
            flush=True)
      if report.fits and args.max_compiles:
        report.max_global_batch, report.max_batch_bound = aot.find_max_batch(
            _configured(config_file, overrides), topology, devices, config_file, report,
            max_compiles=args.max_compiles)
      row = dict(row=name, setting=index, command=command(config_file, topology, overrides)
                 + (" --find-max-batch" if report.fits else ""), **report.to_json())
      # A row re-measured replaces its earlier results from this setting on (kept until
      # then: an interrupted run loses nothing).
      _update(json_path, lambda r: r["row"] != name or r["setting"] < index, row)
      if report.fits:
        break


def _update(json_path: str, keep, row=None) -> None:
  """Rewrites the JSON (and the markdown next to it) with the rows `keep` accepts, plus
  `row`; read again each time, so that runs of different rows can share the file."""
  results = []
  if os.path.exists(json_path):
    with open(json_path) as f:
      results = [r for r in json.load(f) if keep(r)]
  results = sorted(results + ([row] if row else []),
                   key=lambda r: (list(ROWS).index(r["row"]), r["setting"]))
  with open(json_path + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
  os.replace(json_path + ".tmp", json_path)
  write_markdown(results, os.path.join(os.path.dirname(json_path), "will_it_fit.md"))


def write_markdown(results, path: str) -> None:
  gib = lambda b: f"{b / 2**30:.1f}"
  hbm = lambda b: f"{b / 2**30:.2f}".rstrip("0").rstrip(".")  # 15.75, 16
  lines = ["| row | topology | global batch | mesh (data, fsdp, tensor) | remat | peak / HBM "
           "GiB per chip | fits | compile s | largest batch per chip that fits | command |",
           "|---|---|---:|---|---|---|---|---:|---:|---|"]
  for r in results:
    needed = re.search(r"\(([\d.]+)G\) exceeds available HBM", r.get("error") or "")
    if needed and not r.get("needed_bytes"):  # reports written before the field existed
      r["needed_bytes"] = float(needed.group(1)) * 2**30
    per_chip = r["global_batch"] // r["devices"]
    remat = next((p.split("=")[1] for p in r["command"].split() if "remat_policy" in p), "none")
    mesh = f"{r['mesh']['data']}, {r['mesh']['fsdp']}, {r['mesh']['tensor']}"
    peak = (f"{gib(r['peak_bytes'])} / {hbm(r['hbm_bytes'])}" if r["compiled"]
            else f"needs {gib(r['needed_bytes'])} / {hbm(r['hbm_bytes'])}"
            if r["out_of_memory"] and r.get("needed_bytes")
            else f"> {hbm(r['hbm_bytes'])} (compiler: out of HBM)" if r["out_of_memory"]
            else "does not compile")
    largest = (f"{r['max_global_batch'] // r['devices']}" if r.get("max_global_batch")
               else "")
    if largest:
      largest += (f" ({r['max_batch_bound'] // r['devices']} does not)"
                  if r.get("max_batch_bound") else " or more (the search stopped first)")
    seconds = f"{r['compile_seconds']:.0f}" if r["compiled"] else ""
    lines.append(f"| {r['row']} | {r['topology']} | {r['global_batch']} ({per_chip}/chip) | "
                 f"{mesh} | {remat} | {peak} | {'yes' if r['fits'] else 'no'} | "
                 f"{seconds} | {largest} | `{r['command']}` |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
