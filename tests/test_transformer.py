"""Tests for mmjax.nn.transformer: scan / remat equal the plain stack, decoding is exact."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn.transformer import ACTIVATIONS, BlockConfig, Decoder, Encoder, EncoderBlock, Mlp

B, L, LE, D = 2, 6, 5, 16
BLOCK = BlockConfig(num_heads=2, mlp_dim=32)
SIZES = dict(num_layers=2, block=BLOCK)


def _tokens(length=L, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, length, D), np.float32))


def _stack_layers(params, prefix, num_layers):
  """Plain-stack params (prefix_0, prefix_1, ...) -> scanned params (prefix, layer axis 0)."""
  params = dict(params)
  layers = [params.pop(f"{prefix}_{i}") for i in range(num_layers)]
  params[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params


def _init(module, *args, **kwargs):
  return nn.meta.unbox(jax.jit(lambda: module.init(jax.random.key(0), *args, **kwargs))())


def _random_params(module, *args, **kwargs):
  """Random parameters of the right shapes, without compiling `init` (slow on CPU)."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), *args, **kwargs)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape, np.float32)),
                      shapes)


def test_mlp_shape_and_param_axes():
  mlp = Mlp(mlp_dim=32)
  variables = jax.jit(lambda: mlp.init(jax.random.key(0), _tokens()))()
  assert mlp.apply(variables, _tokens()).shape == (B, L, D)
  specs = nn.get_partition_spec(variables)["params"]
  assert tuple(specs["fc1"]["kernel"]) == ("embed", "mlp")
  assert tuple(specs["fc2"]["kernel"]) == ("mlp", "embed")


_ERF = np.vectorize(math.erf)
REFERENCE_ACTIVATIONS = {   # the formulas HF / torch / OpenAI CLIP compute
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "gelu": lambda x: 0.5 * x * (1 + _ERF(x / np.sqrt(2))),
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
    "silu": lambda x: x / (1 + np.exp(-x)),
}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_activation_computes_its_formula(activation):
  x = _tokens()
  mlp = Mlp(mlp_dim=32, activation=activation)
  params = _random_params(mlp, x)["params"]
  got = mlp.apply({"params": params}, x)
  p = jax.tree.map(np.asarray, params)
  hidden = REFERENCE_ACTIVATIONS[activation](np.asarray(x) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  np.testing.assert_allclose(got, hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"], atol=1e-5)
  if activation == "gelu_tanh":  # the default, as before the option existed
    np.testing.assert_array_equal(got, Mlp(mlp_dim=32).apply({"params": params}, x))


def test_unknown_activation_is_refused():
  with pytest.raises(ValueError, match=r"Unknown activation 'relu'; expected one of \['gelu'"):
    jax.eval_shape(lambda: Mlp(mlp_dim=32, activation="relu").init(jax.random.key(0), _tokens()))


def numerics_used(fn, under=None):
  """(LayerNorm epsilons, Mlp activations) of every LayerNorm / Mlp that `fn` calls (only
  those below the top-level modules named in `under`, if given)."""
  epsilons, activations = [], []

  def record(f, args, kwargs, context):
    path = context.module.scope.path if context.module.scope else ()
    if context.method_name == "__call__" and (under is None or path[:1] in under):
      if isinstance(context.module, nn.LayerNorm):
        epsilons.append(context.module.epsilon)
      elif isinstance(context.module, Mlp):
        activations.append(context.module.activation)
    return f(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(fn)
  return epsilons, activations


@pytest.mark.parametrize("scan_layers", [False, True])
def test_activation_and_epsilon_reach_every_layer(scan_layers):
  x, enc = _tokens(), _tokens(LE, seed=1)
  block = BlockConfig(num_heads=2, mlp_dim=32, activation="quick_gelu", layer_norm_epsilon=1e-5)
  numerics = dict(num_layers=2, block=block, scan_layers=scan_layers)
  eps, acts = numerics_used(lambda: Encoder(**numerics).init(jax.random.key(0), x))
  # Every LayerNorm / Mlp called (scan may trace a block more than once) got the option.
  assert set(eps) == {1e-5} and len(eps) >= 3 and set(acts) == {"quick_gelu"}
  eps, acts = numerics_used(lambda: Decoder(**numerics).init(jax.random.key(0), x, enc))
  assert set(eps) == {1e-5} and len(eps) >= 4 and set(acts) == {"quick_gelu"}
  eps, acts = numerics_used(lambda: Encoder(**SIZES).init(jax.random.key(0), x))
  assert set(eps) == {1e-6} and set(acts) == {"gelu_tanh"}   # defaults unchanged


def test_encoder_param_names_and_final_norm():
  x = _tokens()
  encoder = Encoder(**SIZES)
  params = _init(encoder, x)["params"]
  assert sorted(params) == ["encoder_norm", "encoderblock_0", "encoderblock_1"]
  assert sorted(params["encoderblock_0"]) == ["attention", "attention_norm", "mlp", "mlp_norm"]
  out = jax.jit(lambda p: encoder.apply({"params": p}, x))(params)
  assert out.shape == (B, L, D)
  # The final LayerNorm (scale 1, bias 0 at init) leaves every token zero-mean, unit-var.
  np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.var(-1), 1.0, atol=1e-3)


def test_encoder_scan_and_remat_equal_plain_stack():
  x = _tokens()
  mask = (np.arange(L) < np.array([[L], [3]]))[:, None, None, :]
  plain = Encoder(**SIZES)
  params = _random_params(plain, x)["params"]
  stacked = _stack_layers(params, "encoderblock", SIZES["num_layers"])

  variants = [(True, "none"), (True, "full"), (False, "dots")]
  modules = [Encoder(**SIZES, scan_layers=s, remat_policy=r) for s, r in variants]
  for module in modules:
    shapes = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), x)))
    expected = stacked if module.scan_layers else params
    assert jax.tree.map(jnp.shape, shapes["params"]) == jax.tree.map(jnp.shape, expected)

  @jax.jit   # one compile for all four stacks
  def losses_and_grads(params, stacked):
    loss_and_grad = lambda module, p: jax.value_and_grad(
        lambda p: jnp.sum(module.apply({"params": p}, x, mask=mask) ** 2))(p)
    return loss_and_grad(plain, params), [
        loss_and_grad(m, stacked if m.scan_layers else params) for m in modules]

  (loss, grads), results = losses_and_grads(params, stacked)
  stacked_grads = _stack_layers(grads, "encoderblock", SIZES["num_layers"])
  for module, result in zip(modules, results):
    expected = (loss, stacked_grads if module.scan_layers else grads)
    chex.assert_trees_all_close(result, expected, atol=1e-5, rtol=1e-5)


def test_decoder_cache_decoding_equals_full_forward():
  x, encoded = _tokens(), _tokens(LE, seed=1)
  cross_mask = (np.arange(LE) < np.array([[LE], [2]]))[:, None, None, :]
  decoder = Decoder(**SIZES, scan_layers=True)   # the cache is scanned over layers too
  params = _random_params(decoder, x, encoded)["params"]
  expected = jax.jit(lambda p: decoder.apply({"params": p}, x, encoded,
                                             cross_mask=cross_mask))(params)
  assert expected.shape == (B, L, D)
  cache_shapes = jax.eval_shape(lambda: decoder.init(jax.random.key(0), x, encoded,
                                                     decode=True)["cache"])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)  # empty cache

  @jax.jit
  def step(cache, token):
    return decoder.apply({"params": params, "cache": cache}, token, encoded,
                         cross_mask=cross_mask, decode=True, mutable=["cache"])

  outs = []
  for t in range(L):
    out, variables = step(cache, x[:, t:t + 1])
    cache = variables["cache"]
    outs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), expected, atol=1e-5)


def test_decoder_is_causal_and_scan_remat_equal_plain():
  x, encoded = _tokens(), _tokens(LE, seed=1)
  plain = Decoder(**SIZES)
  params = _random_params(plain, x, encoded)["params"]
  apply = lambda module, p, x: jax.jit(lambda p, x: module.apply({"params": p}, x, encoded))(p, x)
  out = apply(plain, params, x)
  # Changing the last target token leaves every earlier position unchanged.
  changed = apply(plain, params, x.at[:, -1].set(5.0))
  np.testing.assert_array_equal(changed[:, :-1], out[:, :-1])
  assert not np.allclose(changed[:, -1], out[:, -1])
  variant = Decoder(**SIZES, scan_layers=True, remat_policy="full")
  stacked = _stack_layers(params, "decoderblock", SIZES["num_layers"])
  chex.assert_trees_all_close(apply(variant, stacked, x), out, atol=1e-5)


def test_dropout_and_droppath_only_in_training():
  x = _tokens(seed=2)
  block = EncoderBlock(BLOCK, droppath_rate=0.5)
  variables = _random_params(block, x)
  apply = jax.jit(lambda x, rng: block.apply(variables, x, deterministic=False,
                                             rngs={"dropout": rng}))
  np.testing.assert_array_equal(jax.jit(block.apply)(variables, x),
                                jax.jit(block.apply)(variables, x))
  # With a big batch and rate 0.5 both residual branches of some examples are dropped
  # (output == input exactly) and those of others are kept: per-example stochastic depth.
  big_x = jnp.tile(x, (16, 1, 1))
  out = apply(big_x, jax.random.key(0))
  unchanged = np.all(np.asarray(out) == np.asarray(big_x), axis=(1, 2))
  assert 0 < unchanged.sum() < len(unchanged)
  assert not np.array_equal(apply(big_x, jax.random.key(0)), apply(big_x, jax.random.key(1)))


def test_bad_config_and_inputs_raise():
  with pytest.raises(ValueError, match="Unknown remat_policy 'bogus'; expected one of"):
    Encoder(**SIZES, remat_policy="bogus").init(jax.random.key(0), _tokens())
  with pytest.raises(ValueError, match=r"rank 3 \[batch, length, width\]; given shape \(2, 16\)"):
    Encoder(**SIZES).init(jax.random.key(0), jnp.ones((B, D)))
  with pytest.raises(ValueError, match=r"Decoder \(encoded\).*given shape \(2, 5\)"):
    Decoder(**SIZES).init(jax.random.key(0), _tokens(), jnp.ones((B, LE)))
