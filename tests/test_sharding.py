"""State born sharded by logical axis rules; gradient accumulation and mixed precision."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from test_train_fixtures import TokenClassifier, tiny_config

from mmjax.train import optim
from mmjax.train import sharding
from mmjax.train import state as state_lib
from mmjax.train import trainer


def _setup(mesh_shape=(2, 2, 2), optimizer="adamw", grad_accum_steps=1, dtype="float32"):
  config = tiny_config(grad_accum_steps=grad_accum_steps, **{"optimizer.name": optimizer})
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
  rules = sharding.axis_rules(config.axis_rules)
  model = TokenClassifier(num_classes=4, width=16, dtype=dtype)
  example = {"image": jax.ShapeDtypeStruct((8, 4, 4, 1), jnp.float32),
             "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
  boxed = state_lib.abstract_params(model, example, jax.random.PRNGKey(0))
  tx, schedule = optim.make_optimizer(config, state_lib.unbox_abstract(boxed))
  init, _, shardings = state_lib.create_train_state(model, tx, example, 0, mesh, rules)
  state = init()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(trainer.make_train_step(model, tx, schedule, grad_accum_steps),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return mesh, rules, state, shardings, step


def _batch(mesh):
  rng = np.random.default_rng(0)
  local = {"image": rng.normal(size=(16, 4, 4, 1)).astype(np.float32),
           "label": rng.integers(0, 4, 16).astype(np.int32)}
  return sharding.global_batch(local, mesh)


def test_params_and_adam_moments_are_born_sharded_by_logical_axes():
  _, _, state, _, _ = _setup()
  hidden = state.params["hidden"]["kernel"]                   # ("embed", "mlp")
  assert hidden.sharding.spec == P("fsdp", "tensor")
  assert len(hidden.addressable_shards) == 8
  assert hidden.addressable_shards[0].data.shape == (8, 16)   # (16 / fsdp, 32 / tensor)
  mu = state.opt_state[1][0].mu["hidden"]["kernel"]           # adam's first moment
  assert mu.sharding.spec == P("fsdp", "tensor")


def test_optimizer_state_follows_params_or_is_replicated():
  _, _, state, _, _ = _setup(optimizer="adafactor")
  param_specs = {x.shape: x.sharding.spec for x in jax.tree.leaves(state.params)}
  for leaf in jax.tree.leaves(state.opt_state):
    assert leaf.sharding.spec == param_specs.get(leaf.shape, P()), leaf.shape


def test_batch_is_split_over_data_and_fsdp():
  mesh, _, _, _, _ = _setup()
  image = _batch(mesh)["image"]
  assert image.sharding.spec == P(("data", "fsdp"))
  assert image.addressable_shards[0].data.shape == (4, 4, 4, 1)


def test_gradient_accumulation_matches_the_full_batch():
  mesh, rules, state_a, _, step_a = _setup()
  _, _, state_b, _, step_b = _setup(grad_accum_steps=4)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    new_a, metrics_a = step_a(state_a, _batch(mesh))
    new_b, metrics_b = step_b(state_b, _batch(mesh))
  np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_a["grad_norm"], metrics_b["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new_a.params), jax.tree.leaves(new_b.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_loss():
  mesh, rules, state, _, step = _setup(mesh_shape=(1, 1, 1), dtype="bfloat16")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    new, metrics = step(state, _batch(mesh))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(metrics["loss"])


def test_bfloat16_params_are_rejected():
  params = {"kernel": jax.ShapeDtypeStruct((2, 2), jnp.bfloat16)}
  with pytest.raises(ValueError, match="must be float32"):
    state_lib._check_float32(params)
