"""Will it compile and fit on a TPU slice? Answered on a CPU-only machine.

  python -m mmjax.aot --config configs/NAME.py --topology v5e:2x4 [--config.x=...] \
      [--json FILE] [--find-max-batch]

Builds the train and eval steps exactly as `python -m mmjax.main` would for that config
(`mmjax.train.program.build`: the same validation, mesh, logical rules, model, optimizer,
state and batch shardings) over the devices of TPU topology TOPO, and compiles them with
the TPU compiler in libtpu; no TPU and no data are needed (the batch comes from the
dataset's declared shapes). `NxTOPO` (e.g. `2xv5e:16x16`) compiles for N slices.

Reports per-chip bytes (arguments, outputs, temporaries, aliased, peak) against the
chip's HBM, whether it fits, compile seconds, XLA's FLOPs per chip and the analytic model
FLOPs per step, and parameter / optimizer-state bytes per chip. `--find-max-batch`
bisects the largest global batch (a multiple of the data-parallel size) that fits.
Exits 1 when the program does not compile or does not fit, naming why.

Needs the TPU compiler: `pip install -e ".[tpu]"`.
"""
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, Optional

from absl import app, flags
from ml_collections import config_flags

# HBM per chip in GiB, matched as substrings of `device_kind`, most specific first
# (v5p reports "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite").
HBM_GIB_PER_CHIP = (
    ("TPU v6 lite", 32), ("TPU v6", 32), ("TPU v5 lite", 16), ("TPU v5e", 16),
    ("TPU v5p", 95), ("TPU v5", 95), ("TPU v4", 32), ("TPU v3", 32), ("TPU v2", 16),
)
GIB = 2**30

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/NAME.py file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x4, v4:2x2x2, "
                                "v5p:4x4x4, v6e:8x8; NxTOPO for N slices.")
_JSON = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
_FIND_MAX_BATCH = flags.DEFINE_bool("find-max-batch", False, "Bisect the largest global "
                                    "batch that fits (multiples of the data-parallel size).")
flags.mark_flags_as_required(["config", "topology"])


class AotError(Exception):
  """A user-facing reason the compile could not be attempted."""


def _quiet_libtpu() -> None:
  """libtpu expects to run on a TPU VM; these keep it from looking for one (and let
  several processes, e.g. test workers, load it at once)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def topology_devices(topology: str):
  """The devices of TPU topology `topology` ("v5e:2x4", or "2xv5e:2x4" for 2 slices)."""
  if importlib.util.find_spec("libtpu") is None:
    raise AotError("mmjax.aot needs the TPU compiler (libtpu); install it with "
                   "`pip install -e \".[tpu]\"`.")
  _quiet_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  match = re.fullmatch(r"(?:(\d+)x)?(v\w+:[\dx]+)", topology)
  if match is None:
    raise AotError(f"--topology={topology!r}; expected a TPU topology such as v5e:2x4, "
                   "v4:2x2x2, v5p:4x4x4, v6e:8x8, or NxTOPO for N slices (2xv5e:16x16).")
  slices, name = match.groups()
  kwargs = {"num_slices": int(slices)} if slices else {}
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             **kwargs).devices)
  except Exception as e:  # libtpu's message names the problem; keep it on one line
    message = " ".join(str(e).split())[:300]
    raise AotError(f"unknown TPU topology {topology!r} (expected e.g. v5e:2x4, v4:2x2x2, "
                   f"v5p:4x4x4, v6e:8x8): {message}") from e


def hbm_bytes_per_device(devices) -> float:
  """HBM of one device: the chip's, divided among the devices a chip shows (v4 cores)."""
  kind = devices[0].device_kind
  per_chip = next((gib for name, gib in HBM_GIB_PER_CHIP if name.lower() in kind.lower()),
                  None)
  if per_chip is None:
    raise AotError(f"no HBM size known for device kind {kind!r}; add it to "
                   "mmjax.aot.HBM_GIB_PER_CHIP.")
  chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}
  return per_chip * GIB * len(chips) / len(devices)


def _bytes_per_device(abstract, shardings) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                 for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))))


@dataclasses.dataclass
class Report:
  """What one compile found; every size is bytes per device (chip)."""
  config: str
  topology: str
  devices: int
  device_kind: str
  mesh: Dict[str, int]
  global_batch: int
  compiled: bool = False
  error: Optional[str] = None
  fits: bool = False
  hbm_bytes: float = 0.0
  peak_bytes: int = 0
  argument_bytes: int = 0
  output_bytes: int = 0
  temp_bytes: int = 0
  alias_bytes: int = 0
  param_bytes: int = 0
  opt_state_bytes: int = 0
  compile_seconds: float = 0.0
  eval_compiled: bool = False
  eval_peak_bytes: int = 0
  xla_flops_per_device: float = float("nan")
  model_flops_per_step: float = float("nan")
  max_global_batch: Optional[int] = None

  def summary(self) -> str:
    head = (f"{self.config} on {self.topology} ({self.devices} x {self.device_kind}, mesh "
            f"{self.mesh}), global batch {self.global_batch}")
    if not self.compiled:
      return f"{head}\n  does not compile: {self.error}"
    g = lambda b: f"{b / GIB:.2f} GiB"
    lines = [head,
             f"  peak per chip   {g(self.peak_bytes)} of {g(self.hbm_bytes)} HBM: "
             + ("fits" if self.fits else "DOES NOT FIT"),
             f"  arguments {g(self.argument_bytes)}, outputs {g(self.output_bytes)}, "
             f"temporaries {g(self.temp_bytes)}, aliased {g(self.alias_bytes)}",
             f"  params {g(self.param_bytes)}, optimizer state {g(self.opt_state_bytes)} per chip",
             f"  eval step peak {g(self.eval_peak_bytes)} per chip"
             + ("" if self.eval_compiled else " (did not compile)"),
             f"  compile {self.compile_seconds:.1f} s; XLA FLOPs/step/chip "
             f"{self.xla_flops_per_device:.4g}; model FLOPs/step {self.model_flops_per_step:.4g}"]
    if self.max_global_batch is not None:
      lines.append(f"  largest global batch that fits: {self.max_global_batch}")
    return "\n".join(lines)


def compile_config(config, topology: str, devices, config_name: str = "") -> Report:
  """Compiles `config`'s train and eval steps for `devices`; never raises for the program."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmjax.models import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import program as program_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top

  trainer.import_models(config.imports)
  program = program_lib.build(config, pipeline.batch_spec(config.data), devices)
  report = Report(config=config_name, topology=topology, devices=len(devices),
                  device_kind=devices[0].device_kind, mesh=dict(program.mesh.shape),
                  global_batch=config.batch_size, hbm_bytes=hbm_bytes_per_device(devices))
  state = state_lib.abstract_with_shardings(program.abstract_state, program.shardings)
  report.param_bytes = _bytes_per_device(program.abstract_state.params,
                                         program.shardings.params)
  report.opt_state_bytes = _bytes_per_device(program.abstract_state.opt_state,
                                             program.shardings.opt_state)
  train_batch = program.batch(pipeline.batch_spec(config.data), config.batch_size)
  eval_batch = program.batch(pipeline.batch_spec(config.data, train=False),
                             config.eval_batch_size)
  start = time.perf_counter()
  try:
    with program.context():
      compiled = program.train_step.trace(state, train_batch).lower().compile()
  except Exception as e:  # the compiler's own words say why
    report.error = f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"
    return report
  report.compile_seconds = time.perf_counter() - start
  report.compiled = True
  memory = compiled.memory_analysis()
  report.argument_bytes = int(memory.argument_size_in_bytes)
  report.output_bytes = int(memory.output_size_in_bytes)
  report.temp_bytes = int(memory.temp_size_in_bytes)
  report.alias_bytes = int(memory.alias_size_in_bytes)
  report.peak_bytes = int(getattr(memory, "peak_memory_in_bytes", 0) or (
      report.argument_bytes + report.output_bytes + report.temp_bytes - report.alias_bytes))
  report.fits = report.peak_bytes <= report.hbm_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report.xla_flops_per_device = float((cost or {}).get("flops", float("nan")))
  # Analytic FLOPs of the same step traced for the host (einsum attention: countable).
  try:
    report.model_flops_per_step = flops_lib.forward_flops(
        program.train_step.__wrapped__, program.abstract_state,
        program_lib.abstract_batch(pipeline.batch_spec(config.data), config.batch_size))
  except Exception:  # pylint: disable=broad-except  (best effort; XLA's count stands)
    pass
  try:
    with program.context():
      eval_compiled = program.eval_step.trace(state.params, eval_batch).lower().compile()
    eval_memory = eval_compiled.memory_analysis()
    report.eval_compiled = True
    report.eval_peak_bytes = int(
        getattr(eval_memory, "peak_memory_in_bytes", 0) or
        eval_memory.argument_size_in_bytes + eval_memory.output_size_in_bytes
        + eval_memory.temp_size_in_bytes - eval_memory.alias_size_in_bytes)
  except Exception as e:
    report.error = f"eval step: {type(e).__name__}: {' '.join(str(e).split())[:1000]}"
  return report


def find_max_batch(config, topology: str, devices, config_name: str,
                   first: Report) -> int:
  """The largest global batch, a multiple of data x fsdp, whose train step fits (0: none)."""
  from mmjax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  step = first.mesh["data"] * first.mesh["fsdp"] * config.grad_accum_steps

  def fits(batch: int) -> bool:
    trial = config.copy_and_resolve_references()
    trial.batch_size = batch
    trial.eval_batch_size = min(config.eval_batch_size, batch)
    trial.eval_batch_size -= trial.eval_batch_size % (step // config.grad_accum_steps)
    report = compile_config(trial, topology, devices, config_name)
    print(f"  batch {batch}: " + ("fits" if report.fits else
                                   "does not fit" if report.compiled else "does not compile")
          + (f", peak {report.peak_bytes / GIB:.2f} GiB" if report.compiled else ""),
          flush=True)
    return report.fits
  del sharding_lib
  low, high = 0, None  # low fits (0 = nothing known), high does not
  batch = max(step, config.batch_size - config.batch_size % step)
  if first.fits:
    low = batch
    while high is None:
      batch *= 2
      if fits(batch):
        low = batch
      else:
        high = batch
  else:
    high = batch
  while high - low > step:
    middle = (low + high) // 2 // step * step
    if middle <= low:
      break
    if fits(middle):
      low = middle
    else:
      high = middle
  return low


def run(config, topology: str, config_name: str = "", json_path: Optional[str] = None,
        max_batch: bool = False) -> Report:
  devices = topology_devices(topology)
  report = compile_config(config, topology, devices, config_name)
  if max_batch and report.compiled:
    report.max_global_batch = find_max_batch(config, topology, devices, config_name, report)
  print(report.summary(), flush=True)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(dataclasses.asdict(report), f, indent=2)
  return report


def main(argv):
  del argv
  config_name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                     None) or sys.argv[sys.argv.index("--config") + 1]
  try:
    report = run(_CONFIG.value, _TOPOLOGY.value, config_name, _JSON.value,
                 _FIND_MAX_BATCH.value)
  except (AotError, ValueError) as e:
    sys.exit(f"error: {e}")
  if not report.compiled:
    sys.exit(f"error: does not compile for {report.topology}: {report.error}")
  if not report.fits:
    sys.exit(f"error: does not fit: peak {report.peak_bytes / GIB:.2f} GiB per chip > "
             f"{report.hbm_bytes / GIB:.2f} GiB HBM on {report.topology}.")


if __name__ == "__main__":
  _quiet_libtpu()
  app.run(main)
