"""Tests for mmjax.models.vit: shapes, published parameter counts, the model contract."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax.models.base import build_model
from mmjax.models.vit import ViT, decode_variant, resample_vit_posemb
from mmjax.registry import MODELS
from tests.test_transformer import numerics_used

TINY = dict(variant=None, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)


def _images(batch=2, size=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3),
                                                                 np.float32))


def _random_params(model, *args, **kwargs):
  """Random parameters of the right shapes, without compiling `init` (slow on CPU)."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *args, **kwargs)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape, np.float32)),
                      shapes)


def _num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))


@pytest.mark.parametrize("variant, expected", [
    ("Ti/16", 5_717_416), ("S/16", 22_050_664), ("B/16", 86_567_656), ("L/16", 304_326_632)])
def test_published_parameter_counts(variant, expected):
  model = ViT(variant=variant, num_classes=1000, scan_layers=True)   # scan: faster tracing
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert _num_params(shapes["params"]) == expected


@pytest.mark.parametrize("pool_type, num_classes, expected_shape", [
    ("cls", 10, (2, 10)), ("gap", 10, (2, 10)), ("map", 10, (2, 10)),
    ("cls", 0, (2, 32)), ("gap", 0, (2, 32)), ("map", 0, (2, 32)),
    ("none", 0, (2, 16, 32)), ("none", 10, (2, 16, 10))])
def test_output_shapes_for_every_pooling(pool_type, num_classes, expected_shape):
  model = ViT(**TINY, num_classes=num_classes, pool_type=pool_type)
  # Shapes by tracing only (no compile); the numerics are tested below.
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                                  _images())
  assert out.shape == expected_shape and out.dtype == jnp.float32
  params = nn.meta.unbox(variables["params"])
  assert ("cls" in params) == (pool_type == "cls")
  assert ("MAPHead" in params) == (pool_type == "map")
  assert params["pos_embedding"].shape == (1, (pool_type == "cls") + 16, 32)


def test_variants_overrides_and_options():
  assert decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                        patch_size=16)
  assert ViT(variant="S/32").sizes()["patch_size"] == (32, 32)
  assert ViT(variant="Ti/4", depth=2).sizes() == dict(width=192, depth=2, mlp_dim=768,
                                                      num_heads=3, patch_size=(4, 4))
  assert ViT(variant="g", patch_size=14).sizes()["width"] == 1408
  model = ViT(**{**TINY, "patch_size": (4, 2)}, num_classes=5, posemb="sincos2d",
              representation_size=24, class_token=True, pool_type="gap")
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), _images(size=8))))["params"]
  assert "pos_embedding" not in shapes             # fixed sin-cos: no parameter
  assert shapes["pre_logits"]["kernel"].shape == (32, 24)
  assert shapes["head"]["kernel"].shape == (24, 5)
  assert shapes["embedding"]["kernel"].shape == (4, 2, 3, 32)


def test_pre_norm_activation_and_epsilon_options():
  model = ViT(**TINY, num_classes=0, pool_type="map", pre_norm=True, activation="gelu",
              layer_norm_epsilon=1e-12)
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), _images())))["params"]
  assert shapes["pre_norm"]["scale"].shape == shapes["pre_norm"]["bias"].shape == (32,)
  # pre_norm, 2 x 2 block norms, encoder_norm, MAPHead norm; every MLP incl. MAPHead's.
  eps, acts = numerics_used(lambda: model.init(jax.random.key(0), _images()))
  assert eps == [1e-12] * 7 and acts == ["gelu"] * 3
  assert "pre_norm" not in jax.eval_shape(
      lambda: ViT(**TINY).init(jax.random.key(0), _images()))["params"]   # off by default


def test_loss_and_evaluate_follow_the_model_contract():
  model = ViT(**{**TINY, "depth": 1}, num_classes=10, dropout_rate=0.1, droppath_rate=0.1)
  batch = {"image": _images(batch=4), "label": jnp.array([0, 3, 9, 3], jnp.int32)}
  params = nn.meta.unbox(jax.jit(lambda: model.init(jax.random.key(0), batch, train=False,
                                                    method="loss"))())["params"]
  evaluate = jax.jit(lambda p: model.apply({"params": p}, batch, method="evaluate"))
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, rng):
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: model.apply({"params": p}, batch, train=True, method="loss",
                              rngs={"dropout": rng}), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  outputs = evaluate(params)
  assert {k: v.shape for k, v in outputs.items()} == {"loss": (4,), "accuracy": (4,)}
  # The head is zero-initialised: uniform logits, loss log(10) for every example.
  np.testing.assert_allclose(ViT.summarize(jax.tree.map(np.asarray, outputs))["loss"],
                             np.log(10), rtol=1e-6)
  # A few Adam steps in training mode (dropout + stochastic depth) fit the batch.
  opt_state = optimizer.init(params)
  for i in range(20):
    params, opt_state, loss, metrics = step(params, opt_state, jax.random.key(i))
    if i == 0:
      np.testing.assert_allclose(loss, np.log(10), rtol=1e-6)
      assert set(metrics) == {"accuracy"} and metrics["accuracy"].shape == ()
    assert np.isfinite(loss)
  outputs = evaluate(params)
  assert outputs["loss"].mean() < 0.5 * np.log(10) and outputs["accuracy"].mean() == 1.0


def test_registered_and_built_from_config():
  assert MODELS.get("vit") is ViT
  config = ml_collections.ConfigDict(dict(name="vit", **TINY, num_classes=3, pool_type="map"))
  model = build_model(config)
  assert isinstance(model, ViT) and model.pool_type == "map"


def test_posemb_resampled_to_a_new_image_size():
  model = ViT(**TINY, num_classes=0)
  params = _random_params(model, _images(size=16))["params"]
  same = resample_vit_posemb(model, params, 16, 16)
  chex.assert_trees_all_close(same, params, atol=1e-6)
  bigger = resample_vit_posemb(model, params, 16, 24)
  assert bigger["pos_embedding"].shape == (1, 1 + 6 * 6, 32)
  np.testing.assert_array_equal(bigger["pos_embedding"][:, 0], params["pos_embedding"][:, 0])
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(bigger, _images(size=24))
  assert out.shape == (2, 32)
  chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("kwargs, image_shape, message", [
    (dict(variant="X/16"), (1, 32, 32, 3), r"Unknown ViT variant 'X/16'; expected .*\['B'"),
    (dict(variant="B/sixteen"), (1, 32, 32, 3), "Unknown ViT variant 'B/sixteen'"),
    (TINY, (2, 18, 16, 3), r"image size \(18, 16\) is not divisible by the patch size \(4, 4\)"),
    (TINY, (16, 16, 3), r"expects images \[batch, height, width, channels\]; given shape "
                        r"\(16, 16, 3\)"),
    ({**TINY, "patch_size": None}, (1, 16, 16, 3), r"leaves \['patch_size'\] unset"),
    ({**TINY, "num_heads": 3}, (1, 16, 16, 3), "divisible by num_heads; given width 32, "
                                               "num_heads 3"),
    ({**TINY, "pool_type": "max"}, (1, 16, 16, 3), "unknown pool_type 'max'; expected one of"),
    ({**TINY, "posemb": "rope"}, (1, 16, 16, 3), "unknown posemb 'rope'; expected one of"),
    ({**TINY, "class_token": False}, (1, 16, 16, 3), "pool_type='cls' needs class_token"),
])
def test_bad_config_and_inputs_raise(kwargs, image_shape, message):
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda: ViT(**kwargs).init(jax.random.key(0), jnp.zeros(image_shape)))


def test_bad_batches_raise():
  model = ViT(**TINY, num_classes=10)
  with pytest.raises(ValueError, match=r"labels \[batch\] = \(2,\); given shape \(2, 1\)"):
    jax.eval_shape(lambda: model.init(
        jax.random.key(0), {"image": _images(), "label": jnp.zeros((2, 1), jnp.int32)},
        train=False, method="loss"))
  with pytest.raises(ValueError, match=r"needs batch\['label'\]; given keys \['image'\]"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), {"image": _images()}, train=False,
                                      method="loss"))
  with pytest.raises(ValueError, match="needs a classifier"):
    jax.eval_shape(lambda: ViT(**TINY, num_classes=0).init(
        jax.random.key(0), {"image": _images(), "label": jnp.zeros((2,), jnp.int32)},
        train=False, method="loss"))


def test_sharded_over_a_mesh_matches_single_device():
  """Logical axis names on every kernel map onto a (data, fsdp, tensor) mesh."""
  rules = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
           ("heads", "tensor"), ("vocab", "tensor"), ("kv", None), ("layers", None),
           ("length", None)]
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  model = ViT(**{**TINY, "depth": 1}, num_classes=10, pool_type="map", scan_layers=True)
  batch = {"image": _images(batch=8), "label": jnp.arange(8, dtype=jnp.int32)}
  init = lambda: model.init(jax.random.key(0), batch, train=False, method="loss")
  loss_fn = lambda v: model.apply(v, batch, train=False, method="loss")[0]
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(init)), mesh,
                                          rules)
  variables = _random_params(model, batch, train=False, method="loss")
  single_loss = jax.jit(loss_fn)(variables)
  sharded = jax.device_put(variables, nn.meta.unbox(shardings))
  kernel = sharded["params"]["encoder"]["encoderblock"]["attention"]["query"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):   # activation constraints active
    sharded_loss = jax.jit(loss_fn)(sharded)
  assert abs(float(single_loss) - np.log(10)) > 1e-3      # a non-trivial loss
  np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-5)
