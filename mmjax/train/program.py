"""Everything a run compiles, built from a config: mesh, model, optimizer, state, steps.

`build(config, batch_spec, devices)` is the one place that turns a config into the
program the accelerators run. The trainer calls it with the real devices and the shapes
of its first batch; `python -m mmjax.aot` calls it with the devices of a TPU topology and
the shapes the dataset declares, and compiles the same steps without any TPU. Because
both go through here, the program compiled ahead of time is the one that trains.

Nothing is computed by `build`: the state is abstract until `program.init()` is called,
and the steps are traced on first use (or by `.trace(...)` in `mmjax.aot`). Trace the
steps inside `program.context()` (the mesh and the logical axis rules), so the models'
activation constraints shard them.
"""
import contextlib
import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from mmjax.models.base import build_model
from mmjax.train import config as config_lib
from mmjax.train import evaluate as evaluate_lib
from mmjax.train import optim
from mmjax.train import sharding as sharding_lib
from mmjax.train import state as state_lib
from mmjax.train import train_step as train_step_lib
from mmjax.train.state import TrainState

# {batch key: (shape without the batch axis, dtype)}: what one example looks like.
BatchSpec = Mapping[str, Tuple[Tuple[int, ...], Any]]


@dataclasses.dataclass(frozen=True)
class Program:
  """The compiled-to-be pieces of a run; see the module docstring."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: Tuple[Tuple[str, Any], ...]
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  init: Callable[[], TrainState]     # the fresh state, born sharded
  abstract_state: TrainState         # ShapeDtypeStructs of the state
  shardings: TrainState              # NamedShardings of the state
  train_step: Callable               # jit(state, batch) -> (state, metrics), donates state
  eval_step: Callable                # jit(params, batch) -> per-example outputs

  def context(self) -> contextlib.AbstractContextManager:
    """The mesh and logical axis rules the steps must be traced under."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def batch(self, spec: BatchSpec, rows: int) -> Dict[str, jax.ShapeDtypeStruct]:
    """Abstract batch of `rows` examples shaped like `spec`, sharded as the steps expect."""
    return abstract_batch(spec, rows, sharding_lib.batch_sharding(self.mesh))


def abstract_batch(spec: BatchSpec, rows: int,
                   sharding: Optional[NamedSharding] = None) -> Dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((rows,) + tuple(shape), dtype, sharding=sharding)
          for k, (shape, dtype) in spec.items()}


def check(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> Mesh:
  """Validates `config` for `devices` (before any data or compilation); returns the mesh."""
  num_processes = len({d.process_index for d in devices})
  config_lib.validate(config, len(devices), num_processes)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  sharding_lib.check_batch_size(config.batch_size // config.grad_accum_steps, mesh,
                                "config.batch_size / config.grad_accum_steps")
  sharding_lib.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
  return mesh


def build(config: ml_collections.ConfigDict, batch_spec: BatchSpec,
          devices: Optional[Sequence[Any]] = None) -> Program:
  """The program of `config` on `devices` (default: every device of every process).

  `batch_spec` describes one training example (the `valid` key, if present, is ignored:
  only evaluation batches carry it).
  """
  devices = list(jax.devices() if devices is None else devices)
  mesh = check(config, devices)
  rules = sharding_lib.axis_rules(config.axis_rules)
  model = build_model(config.model)
  spec = {k: v for k, v in batch_spec.items() if k != "valid"}
  example = abstract_batch(spec, sharding_lib.data_parallel_size(mesh))

  # State creation needs no mesh context (shardings are explicit); see
  # state.create_train_state for why init must even run outside it.
  boxed = state_lib.abstract_params(model, example, jax.random.PRNGKey(0))
  tx, schedule = optim.make_optimizer(config, state_lib.unbox_abstract(boxed))
  init, abstract, shardings = state_lib.create_train_state(
      model, tx, example, config.seed, mesh, rules, boxed_params=boxed)

  batch_shardings = {k: sharding_lib.batch_sharding(mesh) for k in spec}
  train_step = jax.jit(
      train_step_lib.make_train_step(model, tx, schedule, config.grad_accum_steps),
      in_shardings=(shardings, batch_shardings),
      out_shardings=(shardings, sharding_lib.replicated(mesh)),
      donate_argnums=0)
  eval_step = evaluate_lib.make_eval_step(model, shardings.params, mesh)
  return Program(config=config, mesh=mesh, rules=rules, model=model, tx=tx,
                 schedule=schedule, init=init, abstract_state=abstract, shardings=shardings,
                 train_step=train_step, eval_step=eval_step)
