"""The training loop: `train_and_evaluate(config, workdir)`.

Read top to bottom:
  1. validate the config against the devices (before anything is compiled); lock the
     workdir (`mmjax.train.lock`: a second run on it is refused);
  2. build the data iterators, then the program (mesh, model, optimizer, state
     shardings, jitted steps: `mmjax.train.program`, shared with `mmjax.aot`);
  3. resume from the newest good checkpoint in WORKDIR/checkpoints, else initialise the
     state already sharded (optionally loading `init_from` params);
  4. loop: one jitted, donating train step (`mmjax.train.train_step`) per batch; log,
     evaluate, checkpoint;
  5. on SIGTERM, Ctrl-C or multi-host preemption: checkpoint the current step, stop cleanly.
"""
import importlib
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils

from mmjax.models import flops as flops_lib
from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import config as config_lib
from mmjax.train import evaluate as evaluate_lib
from mmjax.train import lock as lock_lib
from mmjax.train import optim
from mmjax.train import program as program_lib
from mmjax.train import sharding as sharding_lib
from mmjax.train import state as state_lib
from mmjax.train import workdir as workdir_lib
from mmjax.train import writers
from mmjax.train.state import TrainState
from mmjax.train.train_step import GRADS_FINITE, make_train_step  # noqa: F401 (re-exported)


class NonFiniteError(FloatingPointError):
  """Loss or gradients became NaN/Inf and `config.on_nonfinite == "error"`."""


# ---------------------------------------------------------------------------------------
# Multi-host and preemption.


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 force: bool = False) -> None:
  """`jax.distributed.initialize` when this is one process of a multi-process run.

  Explicit arguments win; `force` (main's --multiprocess) or a detected cluster
  (SLURM with several tasks, Open MPI, a multi-worker TPU slice, JAX_COORDINATOR_ADDRESS)
  lets jax find the coordinator itself. A single process on one machine skips it.
  Must run before any other JAX call.
  """
  if coordinator_address or (num_processes or 1) > 1:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return
  env = os.environ
  cluster = (force
             or env.get("JAX_COORDINATOR_ADDRESS")
             or int(env.get("SLURM_NTASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
             or "," in env.get("TPU_WORKER_HOSTNAMES", "")
             or "MEGASCALE_COORDINATOR_ADDRESS" in env)
  if cluster:
    jax.distributed.initialize()


class PreemptionWatcher:
  """True at the step every process should save and stop (SIGTERM, Ctrl-C or a TPU
  maintenance event).

  Multi-process runs use JAX's preemption sync point, so all hosts agree on the step;
  a single process installs its own SIGTERM handler (only from the main thread). Ctrl-C
  (SIGINT) is a SIGTERM to this process: the current step is saved and the run exits
  cleanly. A second Ctrl-C exits at once, without waiting for anything.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._multi = jax.process_count() > 1
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      if not self._multi:
        self._previous[signal.SIGTERM] = signal.signal(
            signal.SIGTERM, lambda *_: self._signalled.set())
      if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # e.g. under nohup: leave it
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

  def _on_interrupt(self, *_):
    if self._signalled.is_set():
      os.write(2, b"\nSecond Ctrl-C: exiting now, without saving.\n")
      os._exit(130)  # pylint: disable=protected-access
    os.write(2, b"\nCtrl-C: saving the current step, then stopping (Ctrl-C again to exit "
                b"at once).\n")
    self._signalled.set()
    if self._multi:  # JAX's preemption service listens for SIGTERM and tells every host
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # preemption service not enabled in this cluster
        return False
    return self._signalled.is_set()

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


# ---------------------------------------------------------------------------------------
# Data access: the one place that knows the pipeline module.


def create_data(config: ml_collections.ConfigDict):
  """(train iterator, eval iterable factory) from `config.data_pipeline`."""
  pipeline = importlib.import_module(config.data_pipeline)
  train_iter = pipeline.create_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed)
  make_eval = lambda: pipeline.create_eval_iterator(
      config.data, global_batch_size=config.eval_batch_size)
  return train_iter, make_eval


def batch_spec(local_batch: Mapping[str, np.ndarray]) -> program_lib.BatchSpec:
  """{key: (shape without the batch axis, dtype)} of a batch."""
  return {k: (np.shape(v)[1:], np.asarray(v).dtype) for k, v in local_batch.items()}


# ---------------------------------------------------------------------------------------
# Fine-tuning from another run.


def apply_init_from(state: TrainState, init_config, param_shardings: Any,
                    grids: Optional[Mapping[str, Any]] = None) -> Tuple[TrainState, Dict]:
  """Loads `init_config.checkpoint`'s params into `state.params` (subset, renamed, and the
  position tables `grids` names, the model's `position_grids`, resampled)."""
  source = checkpoint_lib.load_params(init_config.checkpoint)
  # The fresh params stay where they are (new leaves keep them); only loaded ones move.
  target = traverse_util.flatten_dict(state.params, sep="/")
  merged, report = checkpoint_lib.merge_params(
      target, source, include=tuple(init_config.include), exclude=tuple(init_config.exclude),
      skip=tuple(init_config.get("skip", ())),
      rename=checkpoint_lib.rename_rules(init_config.rename), grids=grids)
  if not report["loaded"]:
    raise ValueError(f"init_from {init_config.checkpoint!r} loaded no parameter; checkpoint "
                     f"names look like {sorted(source)[:8]}, model names like "
                     f"{sorted(target)[:8]}.")
  params = traverse_util.unflatten_dict(merged, sep="/")
  params = jax.device_put(params, param_shardings)
  return state.replace(params=params), report


# ---------------------------------------------------------------------------------------
# Summary printing (extend with `config.summary_hooks`).

# Deprecated: hooks for every run of the process; name them in config.summary_hooks.
# hook(results, config, workdir) -> text appended to the summary ("" adds nothing).
SUMMARY_HOOKS: List[Callable[[Dict[str, Any], ml_collections.ConfigDict, str], str]] = []


def format_summary(results: Mapping[str, Any], config: ml_collections.ConfigDict,
                   workdir: str) -> str:
  """The end-of-run summary: one aligned `name: value` line per result, then the text of
  each hook `config.summary_hooks` names."""
  lines = ["=== mmjax run summary ==="]
  width = max((len(k) for k in results), default=0)
  for key in sorted(results):
    value = results[key]
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    lines.append(f"{key:<{width}}  {text}")
  hooks = SUMMARY_HOOKS + config_lib.summary_hooks(config)
  lines += [hook(dict(results), config, workdir) for hook in hooks]
  return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------------------
# The loop.


import_models = config_lib.import_models  # where it used to live


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       start_over: bool = False) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final metrics.

  Refuses (raising, with nothing in the workdir moved or overwritten) a workdir in use by
  another run, a checkpoint the config's state does not fit, and a workdir whose every
  checkpoint is damaged; `start_over=True` trains from step 0 in that last case.
  """
  import_models(config.imports)
  from_checkpoint = config_lib.model_fields_from_init_checkpoint(config)
  data_from_checkpoint = config_lib.data_fields_from_init_checkpoint(config)
  program_lib.check(config, jax.devices())  # before any data is prepared
  for section, fields in (("model", from_checkpoint), ("data", data_from_checkpoint)):
    if fields and jax.process_index() == 0:
      print(f"config.{section} fields from {config.init_from.checkpoint}/model_config.json: "
            f"{fields}", flush=True)
  workdir = workdir_lib.resolve(workdir)
  lock = lock_lib.acquire(workdir)  # before orbax, which cleans other runs' temporary saves
  # From here on SIGTERM / Ctrl-C mean "save a step and stop" (during start-up: the first).
  preemption = PreemptionWatcher()
  try:
    return _train_and_evaluate_locked(config, workdir, start_over, preemption)
  finally:
    preemption.close()
    lock.release()


def _train_and_evaluate_locked(config, workdir, start_over, preemption) -> Dict[str, Any]:
  is_chief = jax.process_index() == 0
  train_iter, make_eval_iter = create_data(config)
  first_batch = next(train_iter)  # used as step 1's batch unless a checkpoint rewinds the iterator
  spec = batch_spec(first_batch)
  program = program_lib.build(config, spec)
  mesh, shardings = program.mesh, program.shardings

  writer = None  # opened once the checkpoint is known to fit: a refused run writes nothing
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
      async_save=config.async_checkpointing)
  failed = True  # until the loop returns: then a failed last save is the error to raise
  try:
    try:
      state, start_step = checkpointer.restore_latest(
          state_lib.abstract_with_shardings(program.abstract_state, shardings), train_iter,
          start_over=start_over)
    except checkpoint_lib.CheckpointShapeError as e:
      raise workdir_lib.resume_mismatch(e, workdir, config) from None
    if is_chief:
      if state is not None:
        changes = workdir_lib.describe_changes(workdir, config)
        print(f"Resumed from step {start_step} of {checkpointer.directory}"
              + (" with config changes:\n  " + "\n  ".join(changes) if changes else "."),
              flush=True)
      workdir_lib.write_config(workdir, config)  # validated: the checkpoint fits it
    writer = writers.MetricWriter(workdir, active=is_chief)
    if state is not None:
      pending = None
    else:
      start_step, pending = 0, first_batch
      state = program.init()
      if config.init_from.checkpoint:
        grids = program.model.position_grids(program_lib.abstract_batch(spec, 1)) if hasattr(
            program.model, "position_grids") else {}
        state, report = apply_init_from(state, config.init_from, shardings.params, grids)
        _log_init_from(report, config.init_from.checkpoint)
        writer.write(0, {f"init_from_{k}": len(v) for k, v in report.items()})

    with program.context():
      # The state and the batch as the loop passes them: the trace is then the loop's own.
      flops_per_step = _flops(program.train_step, state, program.batch(spec, config.batch_size))
      extra_evals = evaluate_lib.make_extra_evaluators(  # generation, zero-shot (if configured)
          config, program.model, shardings.params, mesh, workdir, make_eval_iter)
      peak = writers.device_peak_flops() * jax.device_count()

      if start_step == 0:
        counts = state_lib.param_counts(state.params)
        _log_step_zero(config, mesh, counts, flops_per_step, optim.describe(config, state.params))
        writer.write(0, {"flops_per_step": flops_per_step,
                         **{f"params/{k}": v for k, v in counts.items()}})

      results = _train_loop(config, state, start_step, pending, train_iter, make_eval_iter,
                            program.train_step, program.eval_step, program.model, mesh,
                            writer, checkpointer, preemption, flops_per_step, peak,
                            extra_evals)
    failed = False
  finally:
    try:
      checkpointer.close(quiet=failed)  # waits for the last save
    finally:
      if writer is not None:
        writer.close()
  if is_chief:
    print(format_summary(results, config, workdir), flush=True)
  return results


def _train_loop(config, state, start_step, pending, train_iter, make_eval_iter, train_step,
                eval_step, model, mesh, writer, checkpointer, preemption, flops_per_step,
                peak, extra_evals=()) -> Dict[str, Any]:
  total = config.total_steps
  is_chief = jax.process_index() == 0
  bar = writers.ProgressBar(total, start_step, active=is_chief and config.progress_bar)
  results: Dict[str, Any] = {"step": start_step}
  unchecked = []  # (step, finite flag, per-parameter flags) not yet read on the host
  skipped = {"total": 0, "in_a_row": 0}  # on_nonfinite="skip": steps whose update was dropped
  last_log_time, last_log_step = time.perf_counter(), start_step

  def check_finite():
    for step_, finite, grads_finite in unchecked:
      if bool(finite):
        skipped["in_a_row"] = 0
        continue
      if config.on_nonfinite == "error":
        bad = sorted(n for n, ok in jax.device_get(grads_finite).items() if not ok)
        raise NonFiniteError(
            f"Non-finite loss or gradient at step {step_}; parameters with non-finite "
            f"gradients: {bad or 'none (the loss itself)'}. The update was not applied; "
            "set config.on_nonfinite='skip' to skip such steps, or lower the lr.")
      skipped["total"] += 1
      skipped["in_a_row"] += 1
      if config.max_skipped_steps and skipped["in_a_row"] >= config.max_skipped_steps:
        raise NonFiniteError(
            f"{skipped['in_a_row']} steps in a row (up to step {step_}) had a non-finite loss "
            f"or gradient and were skipped (config.max_skipped_steps="
            f"{config.max_skipped_steps}): the run is no longer training. Lower the lr or "
            "check the data; the last checkpoint holds the state before the skips began.")
    unchecked.clear()
    results["train/skipped_steps"] = skipped["total"]

  step = start_step
  try:
    for step in range(start_step + 1, total + 1):
      local = pending if pending is not None else next(train_iter)
      pending = None
      state, metrics = train_step(state, sharding_lib.global_batch(local, mesh))
      unchecked.append((step, metrics["finite"], metrics[GRADS_FINITE]))
      bar.update(1)
      first_step = step == start_step + 1
      if first_step:  # includes compilation: time throughput from here on
        jax.block_until_ready(metrics)
        last_log_time, last_log_step = time.perf_counter(), step

      checkpointer.check()  # a failed background save stops the run here, not a save later
      if step % config.log_every == 0 or step == total:
        check_finite()
        host = {k: float(v) for k, v in jax.device_get(metrics).items() if k != GRADS_FINITE}
        host["finite"] = host["finite"] > 0
        host["skipped_steps"] = skipped["total"]
        if not first_step:
          now = time.perf_counter()
          steps_per_s = (step - last_log_step) / max(now - last_log_time, 1e-9)
          last_log_time, last_log_step = now, step
          host.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * config.batch_size,
                      mfu=flops_per_step * steps_per_s / peak)
        writer.write(step, host)
        bar.update(0, loss=host["loss"], lr=host["lr"])
        results.update({f"train/{k}": v for k, v in host.items()})

      if (config.eval_every and step % config.eval_every == 0) or step == total:
        eval_start = time.perf_counter()
        eval_metrics = evaluate_lib.evaluate(model, eval_step, state.params, make_eval_iter(), mesh)
        for extra in extra_evals:
          eval_metrics.update(extra(state.params, step))
        eval_metrics["seconds"] = time.perf_counter() - eval_start
        last_log_time += eval_metrics["seconds"]  # throughput counts training time only
        writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        results.update({f"eval/{k}": v for k, v in eval_metrics.items()})

      stop = preemption.should_stop(step)
      if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == total or stop:
        check_finite()
        checkpointer.save(step, state, train_iter)
      if stop:
        logging.warning("Preemption requested: saved step %d, stopping.", step)
        checkpointer.wait()
        results["preempted"] = True
        break
    check_finite()
  finally:
    bar.close()
  results["step"] = step
  return results


def _flops(train_step, state, global_batch) -> float:
  """FLOPs of one step, counted from its traced program: a scanned layer stack counts
  depth times (XLA's cost analysis counts a loop body once)."""
  try:
    return flops_lib.count_jaxpr(train_step.trace(state, global_batch).jaxpr).flops
  except Exception as e:  # pylint: disable=broad-except  (best effort: MFU is a diagnostic)
    logging.warning("Counting the train step's FLOPs failed (%s); MFU will read nan.", e)
    return float("nan")


def _log_step_zero(config, mesh, counts, flops, optimizer_summary) -> None:
  if jax.process_index() != 0:
    return
  lines = [f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
           f"devices, {jax.process_count()} process(es)",
           "parameters per top-level module:"]
  lines += [f"  {name:<30} {n:>14,}" for name, n in counts.items()]
  lines.append(f"FLOPs per step (counted on the traced train step): {flops:.4g}")
  if optimizer_summary["frozen"]:
    lines.append(f"frozen: {optimizer_summary['frozen']}")
  if optimizer_summary["lr_multipliers"]:
    lines.append(f"lr multipliers: {optimizer_summary['lr_multipliers']}")
  print("\n".join(lines), flush=True)


def _log_init_from(report: Mapping[str, List[str]], path: str) -> None:
  if jax.process_index() != 0:
    return
  print(f"init_from {path}: loaded {len(report['loaded'])}, resampled {report['resampled']}, "
        f"new {report['new']}, dropped {report['dropped']}", flush=True)
  skipped = report.get("skipped", [])
  if skipped:  # trained weights thrown away (those the model has a place for are `excluded`)
    logging.warning("init_from %s: %d trained parameters of the checkpoint are dropped, as "
                    "config.init_from.skip asks: %s.", path, len(skipped), skipped)
