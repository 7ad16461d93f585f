"""What checkpoint verification costs at ViT-B/16 size: save and restore with the checksums.

  python experiments/checkpoint_cost.py --workdir=/tmp/ckpt_cost [--repeats=3]

The state is what the trainer checkpoints for ViT-B/16 (ImageNet head) with AdamW: the
params and Adam's two moments (3 x 86.6M float32 = 1.04 GB), random values. Measured with
mmjax's `Checkpointer`, median of `--repeats`:
  checksum       computing the checksums of every array (done once per save, once per restore)
  save_blocking  `Checkpointer.save` until it returns (the training loop waits this long;
                 includes the checksums and orbax's copy to host memory)
  save_total     until the asynchronous write has finished
  restore        `restore_latest`: read, verify the checksums, check the state is finite
  restore_unverified  orbax's restore of the same step without any of mmjax's checks
Each as wall seconds and as this process's CPU seconds (less sensitive to other load on a
shared machine). Writes the figures as JSON to WORKDIR/checkpoint_cost.json.
"""
import json
import os
import shutil
import statistics
import sys
import time

import grain
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from mmjax.models import vit as vit_lib  # noqa: E402
from mmjax.train import checkpoint as checkpoint_lib  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mmjax_checkpoint_cost", "Scratch directory.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves and restores measured.")


def vit_b16_state():
  """{'params', 'opt_state'} of ViT-B/16 + AdamW, filled with random values on device."""
  model = vit_lib.ViT(variant="B/16", num_classes=1000)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
  shapes = jax.tree.map(lambda x: getattr(x, "value", x), shapes,
                        is_leaf=lambda x: hasattr(x, "value"))
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  params = jax.tree.unflatten(tree, [jax.random.normal(k, s.shape, s.dtype) * 0.02
                                     for k, s in zip(keys, leaves)])
  opt_state = optax.adamw(1e-3).init(params)
  opt_state = jax.tree.map(lambda x: x + 1e-3 if x.ndim else x, opt_state)  # not all zeros
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(0)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  workdir = os.path.abspath(_WORKDIR.value)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  state = jax.block_until_ready(vit_b16_state())
  num_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
  data = iter(grain.MapDataset.range(10).to_iter_dataset())
  times = {k: [] for k in ("checksum", "save_blocking", "save_total", "restore",
                           "restore_unverified")}
  cpu = {k: [] for k in times}

  def clock():
    return time.perf_counter(), time.process_time()

  def record(name, since):
    times[name].append(time.perf_counter() - since[0])
    cpu[name].append(time.process_time() - since[1])

  directory = os.path.join(workdir, "checkpoints")
  for repeat in range(_REPEATS.value):
    shutil.rmtree(directory, ignore_errors=True)
    start = clock()
    checkpoint_lib.checksums(state)
    record("checksum", start)

    checkpointer = checkpoint_lib.Checkpointer(directory, keep=1)
    start = clock()
    checkpointer.save(1, state, data)
    record("save_blocking", start)
    checkpointer.wait()
    record("save_total", start)
    checkpointer.close()

    checkpointer = checkpoint_lib.Checkpointer(directory, keep=1)
    start = clock()
    restored, step = checkpointer.restore_latest(target, data)
    jax.block_until_ready(restored)
    record("restore", start)
    assert step == 1
    del restored

    start = clock()
    plain = ocp.StandardCheckpointer().restore(os.path.join(directory, "1", "state"), target)
    jax.block_until_ready(plain)
    record("restore_unverified", start)
    del plain
    checkpointer.close()
    print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
          flush=True)

  result = {"state_bytes": num_bytes, "devices": str(jax.devices()[0].device_kind),
            "repeats": _REPEATS.value,
            "load_average_1min": os.getloadavg()[0],
            **{f"{k}_seconds": round(statistics.median(v), 3) for k, v in times.items()},
            **{f"{k}_cpu_seconds": round(statistics.median(v), 3) for k, v in cpu.items()}}
  result["checksum_GB_per_s"] = round(num_bytes / 1e9 / result["checksum_seconds"], 2)
  print(json.dumps(result, indent=2))
  with open(os.path.join(workdir, "checkpoint_cost.json"), "w") as f:
    json.dump(result, f, indent=2)
  shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
