"""Optax optimizer and learning-rate schedule from `config.optimizer` / `config.schedule`.

Parameters are addressed by their slash-joined path, e.g. `encoder/block_0/mlp/fc1/kernel`,
the same names checkpoints and `init_from` use. Regexes (`re.fullmatch`) on those names
choose what gets weight decay, a learning-rate multiplier, or stays frozen.

The chain is: clip global norm -> optimizer (with decoupled weight decay) -> per-parameter
lr multipliers -> zero the frozen parameters' updates. Frozen parameters get no optimizer
state (optax.set_to_zero via multi_transform), so freezing a tower also saves memory.
"""
import re
from typing import Any, Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import traverse_util

from mmjax.errors import ConfigError


def param_names(params: Any) -> Any:
  """A tree like `params` whose leaves are the 'a/b/c' path names."""
  flat = traverse_util.flatten_dict(_to_dict(params), sep="/")
  return traverse_util.unflatten_dict({k: k for k in flat}, sep="/")


def _to_dict(tree):
  return tree.unfreeze() if hasattr(tree, "unfreeze") else tree


def _matches(name: str, patterns: Sequence[str]) -> bool:
  return any(re.fullmatch(p, name) for p in patterns)


def _check_patterns_match(what: str, patterns: Sequence[str], names: Sequence[str]) -> None:
  """A regex that selects nothing is almost always a typo: say so instead of a silent no-op."""
  for pattern in patterns:
    if not any(re.fullmatch(pattern, n) for n in names):
      raise ConfigError(f"config.optimizer.{what} pattern {pattern!r} matches no parameter; "
                        f"parameter names look like {sorted(names)[:8]}.")


def make_schedule(config) -> Callable[[Any], Any]:
  """Linear warmup from 0 to `optimizer.lr`, then the configured decay. A warmup longer
  than the run is clamped to the run (with a warning), so any config runs a few steps."""
  lr, s, total = config.optimizer.lr, config.schedule, config.total_steps
  warmup = int(s.warmup_steps)
  if warmup > total:  # a smoke test (--config.total_steps=3) of a long recipe
    logging.warning("config.schedule.warmup_steps=%d exceeds config.total_steps=%d: warming up "
                    "over the whole run instead.", warmup, total)
    warmup = total
  decay_steps = max(total - warmup, 1)
  end = lr * s.end_lr_fraction
  if s.name == "constant":
    decay = optax.constant_schedule(lr)
  elif s.name == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=s.end_lr_fraction)
  elif s.name == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif s.name == "rsqrt":
    timescale = s.timescale or max(warmup, 1)
    decay = lambda step: lr * jnp.sqrt(timescale / (step + timescale))
  else:
    raise ConfigError(f"config.schedule.name={s.name!r}; expected constant/cosine/linear/rsqrt.")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(config, params: Any) -> Tuple[optax.GradientTransformation, Callable]:
  """(optax transformation, schedule) for `params` (any tree with the model's structure)."""
  o = config.optimizer
  schedule = make_schedule(config)
  names_tree = param_names(params)
  names = jax.tree.leaves(names_tree)
  frozen = tuple(o.frozen)
  multipliers = tuple((str(p), float(f)) for p, f in o.lr_multipliers)
  _check_patterns_match("frozen", frozen, names)
  _check_patterns_match("lr_multipliers", [p for p, _ in multipliers], names)
  decay_mask = jax.tree.map(lambda n: not _matches(n, o.weight_decay_exclude), names_tree)

  if o.name == "adamw":
    core = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                       mask=decay_mask)
  elif o.name == "lamb":
    core = optax.lamb(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=decay_mask)
  elif o.name == "adafactor":
    core = optax.adafactor(schedule, weight_decay_rate=o.weight_decay or None,
                           weight_decay_mask=decay_mask, multiply_by_parameter_scale=True)
  elif o.name == "sgd":
    core = optax.chain(
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask) if o.weight_decay
        else optax.identity(),
        optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
  else:
    raise ConfigError(f"config.optimizer.name={o.name!r}; expected adamw/sgd/adafactor/lamb.")

  parts = []
  if o.clip_grad_norm:
    parts.append(optax.clip_by_global_norm(o.clip_grad_norm))
  parts.append(core)
  if multipliers:
    parts.append(_scale_by_name(multipliers))
  tx = optax.chain(*parts)
  if frozen:
    labels = jax.tree.map(lambda n: "frozen" if _matches(n, frozen) else "trained", names_tree)
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def _lr_multiplier(name: str, multipliers: Sequence[Tuple[str, float]]) -> float:
  """The factor of the first pattern matching `name` (1 if none)."""
  for pattern, factor in multipliers:
    if re.fullmatch(pattern, name):
      return factor
  return 1.0


def _scale_by_name(multipliers: Sequence[Tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each update by the lr multiplier its parameter name selects.

  Names come from the update tree's own paths, so this works on any sub-tree (e.g. the
  trained part that multi_transform passes on when some parameters are frozen).
  """
  def scale(path, update):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    factor = _lr_multiplier(name, multipliers)
    return update if factor == 1.0 else update * factor

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def describe(config, params: Any) -> Dict[str, Any]:
  """What the optimizer does to which parameters (for the step-0 log)."""
  o = config.optimizer
  multipliers = tuple((str(p), float(f)) for p, f in o.lr_multipliers)
  names = jax.tree.leaves(param_names(params))
  return {
      "frozen": [n for n in names if _matches(n, o.frozen)],
      "no_weight_decay": [n for n in names if _matches(n, o.weight_decay_exclude)],
      "lr_multipliers": {n: _lr_multiplier(n, multipliers) for n in names
                         if _lr_multiplier(n, multipliers) != 1.0},
  }
