"""Will it compile and fit on a TPU slice? Answered on a CPU-only machine.

  python -m mmjax.aot --config configs/NAME.py --topology TOPO [--config.x=...]
                      [--json FILE] [--find-max-batch]

Builds the train and eval steps exactly as `python -m mmjax.main` would for that config
(`mmjax.train.program.build`: the same validation, mesh, logical rules, model, optimizer,
state and batch shardings) over the devices of TPU topology TOPO, and compiles them with
the TPU compiler in libtpu; no TPU and no data are needed (the batch comes from the
dataset's declared shapes). `NxTOPO` (e.g. `2xv5e:16x16`) compiles for N slices.
GPUs compile deviceless too, with JAX's CUDA plugin (`pip install -e ".[gpu]"`):
`--topology h100:8` (one host of 8) or `h200:2x8` (2 hosts x 8), cuDNN attention
included; `--topology local` compiles for this machine's own devices.

Reports per-chip bytes (arguments, outputs, temporaries, aliased, peak) against the HBM
the TPU compiler allows a program (asked of the compiler), whether it fits, compile
seconds, XLA's FLOPs per chip (a scanned layer stack's body counted once, as XLA does)
and the analytic FLOPs per step (counted on the traced step), and parameter /
optimizer-state bytes per chip. `--find-max-batch` searches the largest global batch (a
multiple of the data-parallel size) that fits.
Exits 1 when the program does not compile or does not fit, naming why.

Needs the TPU compiler for TPU topologies: `pip install -e ".[tpu]"`.
"""
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, Optional, Tuple

from absl import app, flags, logging
from ml_collections import config_flags

from mmjax import cli
from mmjax.errors import ConfigError, run_reporting_user_errors

# HBM per chip in GiB, matched as substrings of `device_kind`, most specific first
# (v5p reports "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite").
HBM_GIB_PER_CHIP = (
    ("TPU v6 lite", 32), ("TPU v6", 32), ("TPU v5 lite", 16), ("TPU v5e", 16),
    ("TPU v5p", 95), ("TPU v5", 95), ("TPU v4", 32), ("TPU v3", 32), ("TPU v2", 16),
)
GIB = 2**30
# How fused kernels appear in compiled HLO.
KERNEL_MARKERS = {"pallas (mosaic)": 'custom_call_target="tpu_custom_call"',
                  "cudnn attention": 'custom_call_target="__cudnn$fmha'}

# GPUs for deviceless compiles (`--topology h100:8`, `h200:2x8`): XLA's GpuTargetConfig of
# each, from the vendor datasheets (SXM parts). The memory is what CUDA reports as usable.
GPU_TARGETS = {
    "h100": dict(description="NVIDIA H100 80GB HBM3", memory=84_942_979_072, cores=132,
                 bandwidth=3_352_320_000_000, clock_ghz=1.755),
    "h200": dict(description="NVIDIA H200", memory=149_250_113_536, cores=132,
                 bandwidth=4_800_000_000_000, clock_ghz=1.755),
}



class AotError(Exception):
  """A user-facing reason the compile could not be attempted."""


def _compile_only_environment(gpu: bool = False) -> None:
  """Settings for compiling without the accelerators: libtpu expects a TPU VM (these keep
  it from looking for one, and let several processes load it at once); set before JAX
  starts its backends."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # The CUDA plugin checks the installed CUDA against a GPU; compiling needs none.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  if gpu:  # without a GPU to autotune on, XLA's Triton GEMM tiler fails on some dots
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_enable_triton_gemm=false").strip()


def _gpu_target_config(gpu: Dict[str, Any]) -> str:
  """A Hopper GpuTargetConfig (text proto) for the CUDA plugin's deviceless topology."""
  return (
      "gpu_device_info { cuda_compute_capability { major: 9 minor: 0 } "
      "threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
      "shared_memory_per_core: 233472 threads_per_core_limit: 2048 "
      f"core_count: {gpu['cores']} fpus_per_core: 128 block_dim_limit_x: 2147483647 "
      "block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
      f"memory_bandwidth: {gpu['bandwidth']} l2_cache_size: 52428800 "
      f"clock_rate_ghz: {gpu['clock_ghz']} device_memory_size: {gpu['memory']} "
      "shared_memory_per_block_optin: 232448 registers_per_core_limit: 65536 "
      "registers_per_block_limit: 65536 } platform_name: \"CUDA\" "
      f"dnn_version_info {{ major: 9 minor: 1 }} device_description_str: \"{gpu['description']}\"")


def _gpu_devices(gpu: str, hosts: int, per_host: int):
  """Compile-only devices of `hosts` x `per_host` GPUs, from the CUDA plugin (no GPU needed)."""
  import jax._src.xla_bridge as xla_bridge  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    plugin = importlib.util.find_spec("jax_plugins.xla_cuda12")
  except ModuleNotFoundError:  # not even the jax_plugins namespace
    plugin = None
  if plugin is None:
    raise AotError("GPU topologies need JAX's CUDA plugin; install it with "
                   "`pip install -e \".[gpu]\"` (no GPU is needed to compile).")
  xla_bridge._discover_and_register_pjrt_plugins()  # pylint: disable=protected-access
  try:
    return list(topologies.get_topology_desc(
        platform="cuda", topology=f"1x{hosts}x{per_host}",
        target_config=_gpu_target_config(GPU_TARGETS[gpu])).devices)
  except Exception as e:  # pylint: disable=broad-except
    raise AotError(f"the CUDA plugin cannot describe {hosts}x{per_host} {gpu}: "
                   f"{' '.join(str(e).split())[:300]}") from e


def topology_devices(topology: str):
  """The devices of TPU topology `topology` ("v5e:2x4", or "2xv5e:2x4" for 2 slices), or
  this machine's own devices for "local" (e.g. to read per-GPU memory on a GPU host)."""
  if topology == "local":
    import jax  # pylint: disable=g-import-not-at-top
    return jax.devices()
  gpu = re.fullmatch(r"(%s):(?:(\d+)x)?(\d+)" % "|".join(GPU_TARGETS), topology.lower())
  if gpu:
    return _gpu_devices(gpu.group(1), int(gpu.group(2) or 1), int(gpu.group(3)))
  if importlib.util.find_spec("libtpu") is None:
    raise AotError("mmjax.aot needs the TPU compiler (libtpu); install it with "
                   "`pip install -e \".[tpu]\"`.")
  _compile_only_environment()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  match = re.fullmatch(r"(?:(\d+)x)?(v\w+:[\dx]+)", topology)
  if match is None:
    raise AotError(f"--topology={topology!r}; expected a TPU topology such as v5e:2x4, "
                   "v4:2x2x2, v5p:4x4x4, v6e:8x8, NxTOPO for N slices (2xv5e:16x16), GPUs as "
                   "h100:8 or h200:2x8 (hosts x GPUs), or local.")
  slices, name = match.groups()
  kwargs = {"num_slices": int(slices)} if slices else {}
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             **kwargs).devices)
  except Exception as e:  # libtpu's message names the problem; keep it on one line
    message = " ".join(str(e).split())[:300]
    raise AotError(f"libtpu cannot build TPU topology {topology!r}: {message} (valid "
                   "examples: v5e:2x4, v5e:16x16, v4:2x2x2, v5p:4x4x4, v6e:8x8)") from e


def _bytes_in(text: str, pattern: str) -> int:
  """The size "(15.75G)" at `{size}` in `pattern`, found in the compiler's `text`; 0 if absent."""
  found = re.search(pattern.format(size=r"\(([\d.]+)([KMGT])\)"), text)
  return int(float(found.group(1)) * 1024 ** ("KMGT".index(found.group(2)) + 1)) if found else 0


_USABLE_HBM = {}


def compiler_usable_hbm(device) -> int:
  """What the TPU compiler lets one program use on `device` (a little under the chip's HBM,
  e.g. 15.75 of 16 GiB on v5e): it says so when refusing a program far too large (a
  4 TB sort); 0 if it did not."""
  kind = device.device_kind
  if kind not in _USABLE_HBM:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    on_device = jax.sharding.SingleDeviceSharding(device)
    too_big = jax.jit(lambda x: jnp.sort(jnp.outer(x, x), axis=0)[0].sum())
    try:
      too_big.trace(jax.ShapeDtypeStruct((10**6,), jnp.float32, sharding=on_device)
                   ).lower().compile()
      _USABLE_HBM[kind] = 0
    except Exception as e:  # pylint: disable=broad-except  (the refusal is the answer)
      _USABLE_HBM[kind] = _bytes_in(str(e), r"exceeds available HBM {size}")
  return _USABLE_HBM[kind]


def hbm_bytes_per_device(devices) -> float:
  """Usable HBM of one device: what a real device or the TPU compiler reports, else the
  chip's divided among the devices a chip shows (v4 cores)."""
  kind = devices[0].device_kind
  try:  # a real (not compile-only) device knows its own memory
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except  (compile-only devices have none)
    limit = None
  if limit:
    return float(limit)
  gpu = next((g for g in GPU_TARGETS.values() if g["description"] == kind), None)
  if gpu:
    return float(gpu["memory"])
  usable = compiler_usable_hbm(devices[0]) if devices[0].platform == "tpu" else 0
  if usable:
    return float(usable)
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
  batch_step: int = 1               # global batches are multiples of data x fsdp x grad_accum
  compiled: bool = False
  error: Optional[str] = None
  out_of_memory: bool = False       # the TPU compiler refused: it cannot fit in HBM
  needed_bytes: int = 0             # what the refusing compiler said it needed (arguments
                                    # and temporaries: its "HLO temporaries" include both)
  fits: bool = False
  hbm_bytes: int = 0
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
  max_global_batch: Optional[int] = None   # --find-max-batch: the largest that fits
  max_batch_bound: Optional[int] = None    # and the smallest tried that does not
  # Fused-kernel calls in the compiled train step: Pallas (Mosaic) on TPU, cuDNN on GPU.
  kernels: Dict[str, int] = dataclasses.field(default_factory=dict)

  def summary(self) -> str:
    head = (f"{self.config} on {self.topology} ({self.devices} x {self.device_kind}, mesh "
            f"{self.mesh}), global batch {self.global_batch}")
    state = (f"  params {_gib(self.param_bytes)}, optimizer state "
             f"{_gib(self.opt_state_bytes)} per chip")
    if self.out_of_memory:
      lines = [head, f"  DOES NOT FIT (the compiler ran out of HBM): {self.error}", state]
    elif not self.compiled:
      lines = [head, f"  does not compile: {self.error}"]
    else:
      lines = [head,
               f"  peak per chip   {_gib(self.peak_bytes)} of {_gib(self.hbm_bytes)} HBM: "
               + ("fits" if self.fits else "DOES NOT FIT"),
               f"  arguments {_gib(self.argument_bytes)}, outputs {_gib(self.output_bytes)}, "
               f"temporaries {_gib(self.temp_bytes)}, aliased {_gib(self.alias_bytes)}"
               + ("" if self.peak_bytes == self.argument_bytes + self.output_bytes
                  + self.temp_bytes - self.alias_bytes else " (the peak is XLA's own)"),
               state,
               f"  eval step peak {_gib(self.eval_peak_bytes)} per chip"
               + ("" if self.eval_compiled else " (did not compile)"),
               f"  fused kernels {self.kernels or 'none'}",
               f"  compile {self.compile_seconds:.1f} s; XLA FLOPs/step/chip "
               f"{self.xla_flops_per_device:.4g}; model FLOPs/step "
               f"{self.model_flops_per_step:.4g}"]
    if self.max_global_batch is not None:
      found = (f"  largest global batch that fits: {self.max_global_batch} "
               f"({self.max_global_batch // self.devices} per chip)")
      if self.max_batch_bound is None:
        found += "; the search stopped before a batch that does not fit"
      elif not _bracket_closed(self.max_global_batch, self.max_batch_bound, self.batch_step):
        found += (f"; the search stopped at its compile limit: the largest lies below "
                  f"{self.max_batch_bound}, which does not fit")
      else:
        found += f"; {self.max_batch_bound} does not"
      lines.append(found)
    return "\n".join(lines)

  def to_json(self) -> Dict[str, Any]:
    """The fields, with null where a number is unknown (strict JSON has no NaN)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in dataclasses.asdict(self).items()}


def _bracket_closed(low: int, high: int, step: int, tolerance: float = 0.02) -> bool:
  """Whether the search is done: nothing between a fitting `low` and a failing `high` is
  worth a compile (within `tolerance` of `low`, or one step)."""
  return high <= low + max(step, tolerance * low)


def _gib(nbytes: float) -> str:
  return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def compile_config(config, topology: str, devices, config_name: str = "",
                   train_only: bool = False) -> Report:
  """Compiles `config`'s train and eval steps (`train_only`: the train step alone, as the
  batch search needs) for `devices`; never raises for the program."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmjax.models import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import program as program_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top

  trainer.import_models(config.imports)
  spec = pipeline.batch_spec(config.data)
  program = program_lib.build(config, spec, devices)
  report = Report(config=config_name, topology=topology, devices=len(devices),
                  device_kind=devices[0].device_kind, mesh=dict(program.mesh.shape),
                  global_batch=config.batch_size,
                  batch_step=(program.mesh.shape["data"] * program.mesh.shape["fsdp"]
                              * config.grad_accum_steps),
                  hbm_bytes=int(hbm_bytes_per_device(devices)))
  state = state_lib.abstract_with_shardings(program.abstract_state, program.shardings)
  report.param_bytes = _bytes_per_device(program.abstract_state.params,
                                         program.shardings.params)
  report.opt_state_bytes = _bytes_per_device(program.abstract_state.opt_state,
                                             program.shardings.opt_state)
  train_batch = program.batch(spec, config.batch_size)
  eval_batch = program.batch(pipeline.batch_spec(config.data, train=False),
                             config.eval_batch_size)
  start = time.perf_counter()
  try:
    with program.context():
      traced = program.train_step.trace(state, train_batch)
      compiled = traced.lower().compile()
  except Exception as e:  # the compiler's own words say why
    report.compile_seconds = time.perf_counter() - start  # until it refused
    report.error = f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"
    report.out_of_memory = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
    # the compiler says how much it would have needed
    report.needed_bytes = _bytes_in(str(e), r"{size} exceeds available HBM")
    return report
  report.compile_seconds = time.perf_counter() - start
  report.compiled = True
  hlo = compiled.as_text() or ""
  report.kernels = {name: hlo.count(marker) for name, marker in KERNEL_MARKERS.items()
                    if marker in hlo}
  memory = compiled.memory_analysis()
  report.argument_bytes = int(memory.argument_size_in_bytes)
  report.output_bytes = int(memory.output_size_in_bytes)
  report.temp_bytes = int(memory.temp_size_in_bytes)
  report.alias_bytes = int(memory.alias_size_in_bytes)
  # Conservative: every argument, output and temporary live at once (XLA's own peak,
  # from its buffer schedule, can be lower; the larger is reported).
  report.peak_bytes = max(
      int(getattr(memory, "peak_memory_in_bytes", 0) or 0),
      report.argument_bytes + report.output_bytes + report.temp_bytes - report.alias_bytes)
  report.fits = report.peak_bytes <= report.hbm_bytes
  if train_only:
    return report
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report.xla_flops_per_device = float((cost or {}).get("flops", float("nan")))
  # Counted on the traced step: XLA's count above takes a scanned layer stack's body once.
  report.model_flops_per_step = flops_lib.count_jaxpr(traced.jaxpr).flops
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


def find_max_batch(config, topology: str, devices, config_name: str, first: Report,
                   tolerance: float = 0.02,
                   max_compiles: int = 10) -> Tuple[int, Optional[int]]:
  """(the largest global batch, a multiple of data x fsdp, whose train step fits (0: none),
  the smallest batch tried that does not (None: none did)).

  Peak memory is close to linear in the batch, so each guess is where a line meets the
  HBM: the line through the two measurements nearest it (compiled peaks first; a refused
  batch's needed bytes, a lower bound, only where fewer than two compiled), or, with one
  measurement, the line from the state's bytes (which do not grow with the batch) through
  it. Once a fitting and a non-fitting batch bracket the answer, each guess stays in the
  middle half of the bracket (small programs are not quite linear). Each guess is
  compiled (train step only); the search stops when the bracket is within `tolerance` (or
  one data-parallel step), or after `max_compiles`.
  """
  step = first.batch_step
  state_bytes = first.param_bytes + first.opt_state_bytes
  peaks, needed, fits = {}, {}, {}

  def record(report: Report) -> None:
    if report.compiled:
      peaks[report.global_batch] = report.peak_bytes
    elif report.needed_bytes:  # a lower bound: the compiler can stop counting early
      needed[report.global_batch] = report.needed_bytes
    fits[report.global_batch] = report.fits

  def measure(batch: int) -> None:
    print(f"  compiling batch {batch} ({batch // first.devices} per chip)", flush=True)
    trial = config.copy_and_resolve_references()
    trial.batch_size = batch
    report = compile_config(trial, topology, devices, config_name, train_only=True)
    record(report)
    print(f"  batch {batch}: " + ("fits" if report.fits else "does not fit"
           if report.compiled or report.out_of_memory else "does not compile")
          + (f", peak {_gib(report.peak_bytes)}" if report.compiled
             else f", needs at least {_gib(report.needed_bytes)}" if report.needed_bytes
             else ""),
          flush=True)

  def estimate() -> float:
    """The batch at which the line through the measurements nearest the HBM reaches it
    (compiled peaks first, refusals' needed bytes where fewer than two compiled)."""
    nearest = lambda known: sorted(known, key=lambda b: abs(known[b] - first.hbm_bytes))
    points = [(b, peaks[b]) for b in nearest(peaks)[:2]]
    points += [(b, needed[b]) for b in nearest(needed)[:2 - len(points)]]
    points.sort(key=lambda point: abs(point[1] - first.hbm_bytes))
    if len(points) < 2 or points[0][1] == points[1][1]:
      points = [(0, state_bytes), points[0]]
    (b0, p0), (b1, p1) = points
    return b0 + (first.hbm_bytes - p0) * (b1 - b0) / (p1 - p0) if p1 != p0 else 2 * b1

  def bracket():
    low = max((b for b, ok in fits.items() if ok), default=0)
    return low, min((b for b, ok in fits.items() if not ok and b > low), default=None)

  record(first)
  confirming = False  # the last guess was the smallest step above a fitting batch
  for _ in range(max_compiles):
    low, high = bracket()
    if high is not None and _bracket_closed(low, high, step, tolerance):
      break
    least = low + max(step, tolerance * low)  # the smallest move worth a compile
    guess = estimate() if peaks or needed else (low + high) / 2 if high else 2 * low
    if high is None:
      guess = min(max(guess, least), 8 * max(low, step))  # no wild leaps
    elif low:  # bracketed by two measurements: keep to its middle half, except once to
      # confirm a boundary the line puts just above `low`
      quarter = (high - low) / 4
      confirming = guess < low + quarter and not confirming
      guess = least if confirming else min(max(guess, low + quarter), high - quarter)
    guess = max(int(guess) // step * step, low + step)
    if high is not None and guess >= high:
      break
    measure(guess)
  return bracket()


def run(config, topology: str, config_name: str = "", json_path: Optional[str] = None,
        max_batch: bool = False) -> Report:
  devices = topology_devices(topology)
  report = compile_config(config, topology, devices, config_name)
  print(report.summary(), flush=True)
  if max_batch and (report.compiled or report.out_of_memory):
    print("searching the largest global batch that fits:", flush=True)
    report.max_global_batch, report.max_batch_bound = find_max_batch(
        config, topology, devices, config_name, report)
    print(report.summary().splitlines()[-1].strip(), flush=True)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(report.to_json(), f, indent=2)
  return report


def _define_flags():
  """The command line's flags (defined only when run as a program, so that importing this
  module next to mmjax.main defines no flag twice)."""
  config = config_flags.DEFINE_config_file("config", None, "Path to a configs/NAME.py file.",
                                           lock_config=True)
  topology = flags.DEFINE_string(
      "topology", None, "TPU topology, e.g. v5e:2x4, v4:2x2x2, v5p:4x4x4, v6e:8x8; NxTOPO for "
      "N slices; GPUs as h100:8 or h200:2x8 (hosts x GPUs per host); 'local' for this "
      "machine's own devices.")
  json_path = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
  max_batch = flags.DEFINE_bool("find-max-batch", False, "Search the largest global batch "
                                "that fits (multiples of the data-parallel size).")
  flags.DEFINE_bool("debug", False, "Show the traceback of user errors too.")
  flags.mark_flags_as_required(["config", "topology"])
  return config, topology, json_path, max_batch


def main(argv, config_flag, topology_flag, json_flag, max_batch_flag):
  if len(argv) > 1:  # e.g. "[--find-max-batch]" pasted with its brackets
    sys.exit(f"error: unexpected arguments {argv[1:]}; flags are --config, --topology, "
             "--config.FIELD=VALUE, --json FILE, --find-max-batch.")
  logging.set_verbosity(logging.WARNING)  # dataset builders' INFO lines, between results
  config_name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                     None) or sys.argv[sys.argv.index("--config") + 1]

  def compile_and_report():
    config = config_flag.value
    cli.apply_new_overrides(config)
    try:
      return run(config, topology_flag.value, config_name, json_flag.value,
                 max_batch_flag.value)
    except AotError as e:
      raise ConfigError(str(e)) from e

  report = run_reporting_user_errors(compile_and_report, debug=flags.FLAGS.debug)
  if report.out_of_memory:
    sys.exit(f"error: does not fit on {report.topology}: {report.error}")
  if not report.compiled:
    sys.exit(f"error: does not compile for {report.topology}: {report.error}")
  if not report.fits:
    sys.exit(f"error: does not fit: peak {report.peak_bytes / GIB:.2f} GiB per chip > "
             f"{report.hbm_bytes / GIB:.2f} GiB HBM on {report.topology}.")


if __name__ == "__main__":
  _topology = next((a.split("=", 1)[1] if "=" in a else sys.argv[i + 1]
                    for i, a in enumerate(sys.argv[:-1] + [""])
                    if a.startswith("--topology")), "")
  _compile_only_environment(gpu=_topology.split(":")[0].lower() in GPU_TARGETS)
  _flags = _define_flags()
  app.run(lambda argv: main(argv, *_flags), flags_parser=cli.parse_flags)
