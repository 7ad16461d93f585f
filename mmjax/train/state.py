"""The train state, and creating it already sharded over the mesh.

`TrainState` is everything a checkpoint needs besides the data iterator: the step, the
float32 parameters, the optimizer state and the base rng (per-step keys are folded from
it, so a resumed run draws exactly the same dropout masks).

Creation never materialises the full state on one device: `jax.eval_shape` gives the
shapes and logical axis names for free, `state_shardings` turns them into NamedShardings,
and the init runs under `jax.jit(out_shardings=...)` so each device only ever computes
its own shard. (Init runs outside the mesh context; see `create_train_state`.)
"""
from typing import Any, Callable, Dict, Mapping, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax.train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array         # int32 scalar: optimizer steps taken
  params: Any             # float32 parameters, nested dicts named as in the model
  opt_state: Any          # optax state
  rng: jax.Array          # uint32[2] base key; step keys are fold_in(rng, step)


def init_variables_fn(model: nn.Module, example_batch: Mapping[str, Any]) -> Callable:
  """rng -> boxed model variables (with logical axis metadata), per the model contract."""
  def init(rng):
    params_rng, dropout_rng, sample_rng = jax.random.split(rng, 3)
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch.items()}
    return model.init({"params": params_rng, "dropout": dropout_rng, "sample": sample_rng},
                      batch, train=False, method="loss")
  return init


def abstract_params(model: nn.Module, example_batch: Mapping[str, Any], rng) -> Any:
  """Boxed parameter shapes (nn.Partitioned leaves where the model annotated axes)."""
  variables = jax.eval_shape(init_variables_fn(model, example_batch), rng)
  extra = sorted(set(variables) - {"params"})
  if extra:
    raise ValueError(f"The model creates variable collections {extra} besides 'params'; "
                     "the trainer only carries 'params' (the model contract has no mutable state).")
  return variables["params"]


def unbox_abstract(boxed: Any) -> Any:
  """Strips logical-axis boxes from abstract values (no sharding constraint applied)."""
  return jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _dict_path(path) -> Tuple[str, ...]:
  """The trailing run of dict keys of a tree path: a parameter's name inside any container."""
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(str(entry.key))
  return tuple(reversed(keys))


def state_shardings(abstract_state: TrainState, boxed_params: Any, mesh: Mesh, rules) -> TrainState:
  """NamedShardings for every leaf of the state.

  Params follow their logical axes. An optimizer-state leaf shaped like a parameter and
  named after it (adam's mu / nu, momentum) is sharded like that parameter; anything
  else (counts, adafactor's factored rows) is small and replicated.
  """
  param_shardings = sharding_lib.logical_shardings(boxed_params, mesh, rules)
  unboxed = unbox_abstract(boxed_params)
  by_name = {}
  for (path, leaf), shard in zip(jax.tree_util.tree_flatten_with_path(unboxed)[0],
                                 jax.tree.leaves(param_shardings)):
    by_name[_dict_path(path)] = (leaf.shape, shard)
  replicated = NamedSharding(mesh, P())

  def opt_leaf_sharding(path, leaf):
    shape, shard = by_name.get(_dict_path(path), (None, None))
    return shard if shape is not None and shape == leaf.shape else replicated

  opt_shardings = jax.tree_util.tree_map_with_path(opt_leaf_sharding, abstract_state.opt_state)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                    rng=replicated)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       example_batch: Mapping[str, Any], seed: int, mesh: Mesh,
                       rules, boxed_params: Any = None
                       ) -> Tuple[Callable[[], TrainState], TrainState, TrainState]:
  """(init, abstract state, shardings); `init()` returns the state born sharded.

  `boxed_params`: the model's `abstract_params` when the caller has them already (one
  trace of the model's init fewer).

  Nothing is computed until `init()` is called, so a run that resumes from a checkpoint
  never materialises a throwaway state.

  Call *outside* `jax.set_mesh` / `nn.logical_axis_rules`: the result is placed by
  `out_shardings`, so init-time activation constraints add nothing, and flax's
  DenseGeneral cannot apply its kernel's logical constraint to the flat kernel it first
  draws (a rank error under active rules).
  """
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  init_variables = init_variables_fn(model, example_batch)

  def init_state(rng):
    params = nn.meta.unbox(init_variables(rng)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)

  boxed = (abstract_params(model, example_batch, init_rng) if boxed_params is None
           else boxed_params)
  params = unbox_abstract(boxed)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=jax.eval_shape(tx.init, params),
                        rng=jax.eval_shape(lambda: state_rng))
  _check_float32(abstract.params)
  shardings = state_shardings(abstract, boxed, mesh, rules)
  init = lambda: jax.jit(init_state, out_shardings=shardings)(init_rng)
  return init, abstract, shardings


def _check_float32(params: Any) -> None:
  wrong = {jax.tree_util.keystr(p): str(x.dtype)
           for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if x.dtype != jnp.float32}
  if wrong:
    raise ValueError(f"Parameters must be float32 (compute dtype is the model's `dtype`); "
                     f"got {wrong}. Keep the model's param_dtype at float32.")


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: a restore target on any mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def param_counts(params: Any) -> Dict[str, int]:
  """Parameter count per top-level module, plus the total under 'total'."""
  counts = {name: int(sum(np.prod(x.shape) for x in jax.tree.leaves(sub)))
            for name, sub in params.items()}
  counts["total"] = sum(counts.values())
  return counts
