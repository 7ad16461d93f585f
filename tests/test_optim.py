"""Optimizer and schedule options from the config do what their names say."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.train import optim
from mmjax.train.config import default_config

PARAMS = {"encoder": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
          "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones((2,))}}


def _config(**optimizer):
  config = default_config()
  config.total_steps = 100
  config.schedule.warmup_steps = 0
  config.schedule.name = "constant"
  config.optimizer.clip_grad_norm = 0.0
  config.optimizer.weight_decay = 0.0
  config.optimizer.update(optimizer)
  return config


def _one_update(config, grads_value=1.0):
  tx, _ = optim.make_optimizer(config, PARAMS)
  grads = jax.tree.map(lambda p: jnp.full_like(p, grads_value), PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  return updates


def test_warmup_then_cosine_reaches_end_fraction():
  config = _config(lr=1.0)
  config.schedule.update(name="cosine", warmup_steps=10, end_lr_fraction=0.1)
  schedule = optim.make_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(100)],
                             [0.0, 0.5, 1.0, 0.1], atol=1e-6)


def test_linear_and_rsqrt_schedules():
  config = _config(lr=1.0)
  config.schedule.update(name="linear", warmup_steps=0, end_lr_fraction=0.0)
  np.testing.assert_allclose(optim.make_schedule(config)(50), 0.5, atol=1e-6)
  config.schedule.update(name="rsqrt", warmup_steps=4, timescale=0)
  schedule = optim.make_schedule(config)
  # lr / sqrt(1 + (step - warmup) / timescale), timescale defaulting to the warmup.
  np.testing.assert_allclose([schedule(4), schedule(16)], [1.0, 0.5], atol=1e-6)


def test_sgd_lr_multiplier_and_frozen_params():
  config = _config(name="sgd", lr=0.1, momentum=0.0,
                   lr_multipliers=((r"head/.*", 0.5),), frozen=(r"encoder/bias",))
  updates = _one_update(config)
  np.testing.assert_allclose(updates["encoder"]["kernel"], -0.1)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["encoder"]["bias"], 0.0)


def test_frozen_params_get_no_optimizer_state():
  config = _config(name="adamw", frozen=(r"encoder/.*",))
  tx, _ = optim.make_optimizer(config, PARAMS)
  state_leaves = jax.tree.leaves(tx.init(PARAMS))
  trained_size = sum(x.size for x in jax.tree.leaves(PARAMS["head"]))
  # adam's mu and nu for the head only (plus scalar counts).
  assert sum(x.size for x in state_leaves if x.ndim) == 2 * trained_size


def test_weight_decay_mask_skips_excluded_names():
  config = _config(name="adamw", lr=1.0, weight_decay=0.5, weight_decay_exclude=(r".*bias",))
  updates = _one_update(config, grads_value=0.0)
  np.testing.assert_allclose(updates["encoder"]["kernel"], -0.5)   # decayed: -lr * wd * p
  np.testing.assert_allclose(updates["encoder"]["bias"], 0.0)      # excluded


def test_clipping_bounds_the_global_norm():
  config = _config(name="sgd", lr=1.0, momentum=0.0, clip_grad_norm=1.0)
  updates = _one_update(config, grads_value=10.0)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "lamb"])
def test_every_optimizer_reduces_a_quadratic(name):
  config = _config(name=name, lr=0.05)
  target = jax.tree.map(jnp.zeros_like, PARAMS)
  loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in
                       zip(jax.tree.leaves(p), jax.tree.leaves(target)))
  tx, _ = optim.make_optimizer(config, PARAMS)
  params, state = PARAMS, tx.init(PARAMS)
  for _ in range(5):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < loss(PARAMS)


def test_pattern_that_matches_nothing_is_an_error():
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.make_optimizer(_config(frozen=(r"encoder/kernal",)), PARAMS)
