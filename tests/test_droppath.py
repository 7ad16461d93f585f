"""Stochastic depth grows linearly with depth (ViT / MBT), or is constant on request."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.fusion import BottleneckFusion
from mmjax.nn.transformer import BlockConfig, Encoder, droppath_rates


def test_rates_grow_linearly_from_zero_to_the_configured_rate():
  assert droppath_rates(0.3, 4) == pytest.approx((0.0, 0.1, 0.2, 0.3))
  assert droppath_rates(0.3, 4, "constant") == (0.3,) * 4
  assert droppath_rates(0.3, 1) == (0.3,)
  with pytest.raises(ValueError, match="droppath_schedule='cubic'"):
    droppath_rates(0.3, 4, "cubic")


def _encoder(num_layers, **kw):
  return Encoder(num_layers=num_layers, block=BlockConfig(num_heads=2, mlp_dim=16), **kw)


def test_linear_schedule_keeps_the_first_layer_and_drops_the_last():
  """Rate 1 in the last of two layers, 0 in the first: training computes exactly the
  one-layer encoder; the constant schedule drops both layers."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 8))
  params = _encoder(2).init(jax.random.PRNGKey(1), x)["params"]
  rngs = {"dropout": jax.random.PRNGKey(2)}
  linear = _encoder(2, droppath_rate=1.0).apply({"params": params}, x, deterministic=False,
                                                rngs=rngs)
  first_only = _encoder(1).apply(
      {"params": {k: params[k] for k in ("encoderblock_0", "encoder_norm")}}, x)
  np.testing.assert_allclose(linear, first_only, atol=1e-6)
  constant = _encoder(2, droppath_rate=1.0, droppath_schedule="constant").apply(
      {"params": params}, x, deterministic=False, rngs=rngs)
  skipped = _encoder(0).apply({"params": {"encoder_norm": params["encoder_norm"]}}, x)
  np.testing.assert_allclose(constant, skipped, atol=1e-6)


def test_scanned_layers_refuse_a_growing_rate():
  x = jnp.zeros((2, 3, 8))
  with pytest.raises(ValueError, match="droppath_schedule='constant' or scan_layers=False"):
    _encoder(2, droppath_rate=0.1, scan_layers=True).init(jax.random.PRNGKey(0), x)
  _encoder(2, droppath_rate=0.1, scan_layers=True, droppath_schedule="constant").init(
      jax.random.PRNGKey(0), x)


def test_fusion_layers_count_depth_over_the_whole_stack():
  fusion = BottleneckFusion(num_layers=4, block=BlockConfig(num_heads=2, mlp_dim=16),
                            droppath_rate=0.3)
  assert [fusion.layer_droppath(i) for i in range(4)] == pytest.approx([0, 0.1, 0.2, 0.3])
