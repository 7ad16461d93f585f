"""Per-chip memory of the contrastive loss against the global batch, dense vs ring, on a TPU
topology, compiled on this CPU machine (no TPU needed; `pip install -e ".[tpu]"`).

    python experiments/contrastive_memory.py --topology v5e:16x16 --dim 768 \
        --batches 32768,131072,524288,1048576 --markdown experiments/results/contrastive_memory.md

Compiles the loss and its gradients (embeddings, temperature, bias) exactly as the train
step runs them on the global batch's features, sharded over every chip (data-parallel),
and reports XLA's per-chip peak and temp bytes. The encoders are left out on purpose: with
exact accumulation they only ever see one micro-batch, the same for both, so this is the
part of a train step that grows with the global batch (`python -m mmjax.aot` compiles
whole steps).
"""
import argparse
import json
import os
import re
import sys
from typing import Any, Dict, List

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from mmjax import aot  # noqa: E402

GIB = 2**30


def measure(topology: str, batches: List[int], dim: int, kinds: List[str]) -> List[Dict[str, Any]]:
  devices = aot.topology_devices(topology)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from mmjax.models import heads  # pylint: disable=g-import-not-at-top
  from mmjax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  mesh = sharding_lib.make_mesh(dict(data=len(devices), fsdp=1, tensor=1), devices)
  hbm = aot.hbm_bytes_per_device(devices)
  records = []
  for kind in kinds:
    for n in batches:
      for impl in ("dense", "ring"):
        head = heads.ContrastiveHead(kind, max_scale=None, impl=impl)
        z = jax.ShapeDtypeStruct((n, dim), jnp.float32,
                                 sharding=sharding_lib.batch_sharding(mesh))
        params = jax.eval_shape(head.init, jax.random.key(0), z, z)
        params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(
            p.shape, p.dtype, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec())),
                              params)
        loss = lambda p, a, b, h=head: h.apply(p, a, b)[0]
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        record = {"topology": topology, "chips": len(devices), "loss": kind, "impl": impl,
                  "global_batch": n, "dim": dim, "hbm_bytes": hbm}
        try:
          with jax.set_mesh(mesh):
            memory = step.trace(params, z, z).lower().compile().memory_analysis()
          record.update(
              temp_bytes=int(memory.temp_size_in_bytes),
              peak_bytes=int(getattr(memory, "peak_memory_in_bytes", 0) or (
                  memory.argument_size_in_bytes + memory.output_size_in_bytes
                  + memory.temp_size_in_bytes - memory.alias_size_in_bytes)))
        except Exception as e:  # pylint: disable=broad-except  (e.g. does not fit)
          record["error"] = " ".join(str(e).split())[:300]
        records.append(record)
        print(json.dumps(record), flush=True)
  return records


def _short_error(error: str) -> str:
  """The compiler's out-of-memory verdict in a few words, else the start of the error."""
  needed = re.search(r"temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", error)
  if needed:
    return f"out of HBM (temporaries {needed.group(1)} > {needed.group(2)})"
  return f"does not compile: {error[:60]}"


def markdown(records: List[Dict[str, Any]]) -> str:
  lines = ["| loss | global batch | per chip | dense peak | ring peak | ring / dense |",
           "|---|---:|---:|---:|---:|---:|"]
  rows = {}
  for r in records:
    rows.setdefault((r["loss"], r["global_batch"]), {})[r["impl"]] = r
  for (kind, n), pair in rows.items():
    dense, ring = pair.get("dense", {}), pair.get("ring", {})
    show = lambda r: (f"{r['peak_bytes'] / GIB:.3f} GiB" if "peak_bytes" in r
                      else _short_error(r.get("error", "")))
    ratio = (f"{ring['peak_bytes'] / dense['peak_bytes']:.4f}"
             if "peak_bytes" in ring and "peak_bytes" in dense else "")
    chips = (dense or ring)["chips"]
    lines.append(f"| {kind} | {n:,} | {n // chips:,} | {show(dense)} | {show(ring)} | {ratio} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--topology", default="v5e:16x16")
  p.add_argument("--batches", default="32768,131072,524288,1048576")
  p.add_argument("--dim", type=int, default=768, help="embedding size (SigLIP B/16: 768)")
  p.add_argument("--losses", default="sigmoid,softmax")
  p.add_argument("--json", default="")
  p.add_argument("--markdown", default="")
  p.add_argument("--from-json", default="", help="only tabulate the records of this file")
  args = p.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      records = json.load(f)
  else:
    records = measure(args.topology, [int(b) for b in args.batches.split(",")], args.dim,
                      args.losses.split(","))
  table = markdown(records)
  print(table)
  if args.json and not args.from_json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table)


if __name__ == "__main__":
  aot._quiet_libtpu()  # pylint: disable=protected-access
  main()
