"""Tests for mmjax.nn.attention: backends agree, masks hold, cache decoding is exact."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn import attention
from mmjax.nn.attention import MultiHeadAttention, dot_product_attention
from mmjax.registry import ATTENTION_BACKENDS

B, TQ, TK, H, D = 2, 5, 7, 4, 8


def _qkv(num_kv_heads=H, tq=TQ, tk=TK, dtype=jnp.float32, seed=0):
  # numpy inputs: no per-shape compile of jax.random ops outside the jitted functions.
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in
               ((B, tq, H, D), (B, tk, num_kv_heads, D), (B, tk, num_kv_heads, D)))


def attend(q, k, v, **kwargs):
  """dot_product_attention under jit (one compile is much faster than op-by-op on CPU)."""
  arrays = {n: kwargs.pop(n) for n in ("mask", "bias", "dropout_rng") if n in kwargs}
  return jax.jit(lambda q, k, v, arrays: dot_product_attention(q, k, v, **arrays, **kwargs))(
      q, k, v, arrays)


def _key_padding(lengths=(TK, 3), tk=TK):
  """[B, 1, 1, Tk] True on the first `length` keys of each example."""
  return (np.arange(tk)[None, :] < np.array(lengths)[:, None])[:, None, None, :]


def _bias(tq=TQ, tk=TK):
  return np.random.default_rng(7).standard_normal((1, H, tq, tk), np.float32)


def _fully_masked_rows(tq=TQ, tk=TK):
  """[B, 1, Tq, Tk] with query row 2 of example 0 and every row of example 1 masked."""
  mask = np.ones((B, 1, tq, tk), bool)
  mask[0, :, 2, :] = False
  mask[1] = False
  return mask


CASES = {   # name: (num_kv_heads, kwargs)
    "plain": (H, dict()),
    "padding": (H, dict(mask=_key_padding())),
    "causal": (H, dict(is_causal=True)),
    "bias": (H, dict(bias=_bias())),
    "scale": (H, dict(scale=0.3, mask=_key_padding())),
    "gqa_padding": (2, dict(mask=_key_padding())),
    "gqa_causal_bias": (2, dict(is_causal=True, bias=_bias())),
    "gqa_causal_padding_bias": (2, dict(is_causal=True, mask=_key_padding(), bias=_bias())),
    "mqa_causal_padding_bias": (1, dict(is_causal=True, mask=_key_padding(), bias=_bias())),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backends_match_reference_and_jax_nn(case):
  num_kv_heads, kwargs = CASES[case]
  q, k, v = _qkv(num_kv_heads)
  kwargs = dict(kwargs)
  arrays = {n: kwargs.pop(n) for n in ("mask", "bias") if n in kwargs}

  @jax.jit   # one compile for all three (much faster than op-by-op on CPU)
  def outputs(q, k, v, arrays):
    expected = jax.nn.dot_product_attention(
        q, k, v, arrays.get("bias"), arrays.get("mask"), implementation="xla", **kwargs)
    return expected, [dot_product_attention(q, k, v, implementation=impl, **arrays, **kwargs)
                      for impl in ("reference", "xla")]

  expected, outs = outputs(q, k, v, arrays)
  for out in outs:
    chex.assert_trees_all_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_is_softmax_definition():
  q, k, v = _qkv()
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
  expected = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
  out = attend(q, k, v, implementation="reference")
  chex.assert_trees_all_close(out, expected, atol=1e-6)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_masked_keys_get_zero_weight(implementation):
  q, k, v = _qkv()
  mask = _key_padding()   # example 1 sees keys 0..2 only
  f = jax.jit(lambda v: dot_product_attention(q, k, v, mask=mask, bias=_bias(), is_causal=True,
                                              implementation=implementation))
  # Changing the values of masked keys changes nothing, and they receive no gradient.
  v_changed = np.array(v)
  v_changed[1, 3:] = 1e6
  np.testing.assert_array_equal(f(v), f(v_changed))
  grad_v = jax.jit(jax.grad(lambda v: f(v).sum()))(v)
  np.testing.assert_array_equal(grad_v[1, 3:], 0.0)
  assert np.all(np.abs(grad_v[1, :3]) > 0)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_fully_masked_rows_are_zeros_not_nan(implementation):
  q, k, v = _qkv()
  mask = _fully_masked_rows()
  f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=mask, bias=_bias(),
                                                    implementation=implementation))
  out = f(q, k, v)
  np.testing.assert_array_equal(out[0, 2], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.all(np.abs(out[0, :2]) > 0)
  grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
  chex.assert_tree_all_finite(grads)
  np.testing.assert_array_equal(grads[0][1], 0.0)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_bfloat16_close_to_float32(implementation):
  q, k, v = _qkv(num_kv_heads=2)
  kwargs = dict(mask=_key_padding(), is_causal=True, bias=_bias(), implementation=implementation)
  out32 = attend(q, k, v, **kwargs)
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out16 = attend(*bf16, **kwargs)
  assert out16.dtype == jnp.bfloat16
  chex.assert_trees_all_close(out16.astype(jnp.float32), out32, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_gradients_finite(implementation):
  q, k, v = _qkv(num_kv_heads=2)
  loss = lambda q, k, v: jnp.sum(dot_product_attention(
      q, k, v, mask=_key_padding(), bias=_bias(), is_causal=True,
      implementation=implementation) ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  chex.assert_tree_all_finite(grads)
  assert all(float(jnp.abs(g).sum()) > 0 for g in grads)


def test_dropout_drops_weights_and_is_unbiased():
  q, k, v = _qkv()
  v = jnp.ones_like(v)   # every row of weights sums to 1 -> outputs are 1 without dropout
  out = attend(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1),
               implementation="reference")
  assert not np.allclose(out, 1.0)
  big_q, big_k, big_v = _qkv(tq=48, tk=48)
  out = attend(big_q, big_k, jnp.ones_like(big_v), dropout_rate=0.3,
               dropout_rng=jax.random.key(2))
  np.testing.assert_allclose(float(out.mean()), 1.0, atol=0.05)
  with pytest.raises(ValueError, match="dropout_rng"):
    dot_product_attention(q, k, v, dropout_rate=0.1)


# Chunked: 16 queries = 2 chunks of 8 (rows and causal offsets cross a chunk boundary);
# 12 keys != 16 queries checks the top-left causal alignment.
CHUNKED_TQ, CHUNKED_TK = 16, 12
CHUNKED_CASES = {   # name: (num_kv_heads, kwargs)
    "plain": (H, dict()),
    "padding": (H, dict(mask=_key_padding((CHUNKED_TK, 3), CHUNKED_TK))),
    "causal": (H, dict(is_causal=True)),
    "bias_per_row": (H, dict(bias=_bias(CHUNKED_TQ, CHUNKED_TK))),
    "bias_per_key": (H, dict(bias=_bias(CHUNKED_TQ, CHUNKED_TK)[:, :, :1])),
    "fully_masked_rows": (H, dict(mask=_fully_masked_rows(CHUNKED_TQ, CHUNKED_TK),
                                  bias=_bias(CHUNKED_TQ, CHUNKED_TK))),
    "gqa_causal_padding_bias": (2, dict(is_causal=True, scale=0.3,
                                        mask=_key_padding((CHUNKED_TK, 3), CHUNKED_TK),
                                        bias=_bias(CHUNKED_TQ, CHUNKED_TK))),
    "mqa_causal_masked_rows": (1, dict(is_causal=True,
                                       mask=_fully_masked_rows(CHUNKED_TQ, CHUNKED_TK))),
}


@pytest.mark.parametrize("case", list(CHUNKED_CASES))
def test_chunked_equals_reference_with_gradients(case):
  num_kv_heads, kwargs = CHUNKED_CASES[case]
  q, k, v = _qkv(num_kv_heads, tq=CHUNKED_TQ, tk=CHUNKED_TK)
  kwargs = dict(kwargs)
  mask = kwargs.pop("mask", None)
  bias = kwargs.pop("bias", None)
  ct = np.random.default_rng(3).standard_normal(q.shape, np.float32)

  @jax.jit   # outputs and grads of both backends in one compile
  def outputs_and_grads(q, k, v, bias, mask):
    def run(impl):
      f = lambda q, k, v, bias: dot_product_attention(
          q, k, v, bias=bias, mask=mask, implementation=impl, **kwargs)
      out, vjp = jax.vjp(f, q, k, v, bias)
      return out, vjp(ct)
    return run("chunked"), run("reference")

  chunked, reference = outputs_and_grads(q, k, v, bias, mask)
  chex.assert_trees_all_close(chunked, reference, atol=1e-5, rtol=1e-5)
  if mask is not None and not mask[1].any():   # example 1: every row masked
    np.testing.assert_array_equal(chunked[0][1], 0.0)


def test_chunked_scratch_is_a_fraction_of_the_reference():
  q = jax.ShapeDtypeStruct((1, 1024, 1, 8), jnp.float32)   # 4 chunks of 256 queries

  def temp_bytes(impl):
    grad = jax.grad(lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=True, implementation=impl).sum(), argnums=(0, 1, 2))
    return jax.jit(grad).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

  # The reference holds ~3 float32 [L, L] blocks, chunked ~1 (a few [256, L] ones).
  assert temp_bytes("chunked") < 0.5 * temp_bytes("reference")


@pytest.mark.parametrize("implementation", ["xla", "splash", "chunked"])
def test_backends_refuse_what_they_cannot_honour(implementation):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="dropout"):
    dot_product_attention(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0),
                          implementation=implementation)
  if implementation == "splash":
    with pytest.raises(ValueError, match="mask"):
      dot_product_attention(q, k, v, mask=_key_padding(), implementation="splash")
    with pytest.raises(ValueError, match="bias"):
      dot_product_attention(q, k, v, bias=_bias(), implementation="splash")
    with pytest.raises(ValueError, match="divisible by 128"):
      dot_product_attention(q, k, v, implementation="splash")
  if implementation == "chunked":   # 5 queries: the query chunk is 2
    with pytest.raises(ValueError, match="q_length divisible by its query chunk.* = 2.*5"):
      dot_product_attention(q, k, v, implementation="chunked")


def test_cudnn_needs_a_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("runs on GPU")
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="needs a GPU"):
    dot_product_attention(q, k, v, implementation="cudnn")


def test_splash_matches_reference_in_interpret_mode():
  q, k, v = (x[:1] for x in _qkv(num_kv_heads=2, tq=128, tk=128))
  f = lambda impl, is_causal: jax.jit(lambda q, k, v: dot_product_attention(
      q, k, v, is_causal=is_causal, implementation=impl))
  chex.assert_trees_all_close(f("splash", False)(q, k, v), f("reference", False)(q, k, v),
                              atol=1e-5)
  grad = lambda impl: jax.jit(jax.grad(lambda *a: f(impl, True)(*a).sum(), argnums=(0, 1, 2)))(
      q, k, v)
  chex.assert_trees_all_close(grad("splash"), grad("reference"), atol=1e-5)


def test_default_backend_per_platform():
  assert attention.default_backend(platform="cpu") == "reference"
  assert attention.default_backend(platform="cpu", dropout=True) == "reference"
  assert attention.default_backend(platform="gpu", dtype=jnp.bfloat16) == "cudnn"
  assert attention.default_backend(platform="gpu", dtype=jnp.float32) == "xla"
  assert attention.default_backend(platform="gpu", dtype=jnp.bfloat16, head_dim=256) == "xla"
  assert attention.default_backend(platform="tpu", q_length=256, kv_length=128) == "splash"
  assert attention.default_backend(platform="tpu", has_mask=True) == "xla"
  assert attention.default_backend(platform="tpu", q_length=100, kv_length=100) == "xla"
  assert {"reference", "xla", "cudnn", "splash", "chunked"} <= set(ATTENTION_BACKENDS.names())


def test_default_backend_chunks_long_queries_on_cpu():
  cpu = functools.partial(attention.default_backend, platform="cpu")
  assert cpu(q_length=1024, kv_length=1024) == "chunked"               # 4 chunks of 256
  assert cpu(q_length=4096, kv_length=77, has_mask=True, has_bias=True) == "chunked"
  assert cpu(q_length=512, kv_length=512) == "reference"               # too short to gain
  assert cpu(q_length=1000, kv_length=1000) == "reference"             # chunk 256 does not divide
  assert cpu(q_length=1024, kv_length=1024, dropout=True) == "reference"
  assert attention.default_backend(platform="gpu", q_length=1024) == "xla"


@pytest.mark.parametrize("shapes, kwargs, message", [
    (((B, TQ, D), (B, TK, H, D), (B, TK, H, D)), {}, r"query must have rank 4.*\(2, 5, 8\)"),
    (((B, TQ, H, D), (B, TK, H, D + 1), (B, TK, H, D + 1)), {}, "head_dim must match.*8.*9"),
    (((B, TQ, H, D), (B, TK, H, D), (B, TK + 1, H, D)), {}, "key and value shapes"),
    (((B, TQ, H, D), (B, TK, 3, D), (B, TK, 3, D)), {}, "multiple of key/value heads.*4.*3"),
    (((B, TQ, H, D), (B, TK, H, D), (B, TK, H, D)), {"mask": jnp.ones((B, 1, 1, TK + 1), bool)},
     r"mask must broadcast to .*\(2, 4, 5, 7\).*\(2, 1, 1, 8\)"),
    (((B, TQ, H, D), (B, TK, H, D), (B, TK, H, D)), {"mask": jnp.ones((TQ, TK))}, "must be bool"),
    (((B, TQ, H, D), (B, TK, H, D), (B, TK, H, D)), {"implementation": "nope"},
     "Unknown attention implementation 'nope'"),
])
def test_bad_inputs_raise(shapes, kwargs, message):
  q, k, v = (jnp.zeros(s) for s in shapes)
  with pytest.raises(ValueError, match=message):
    dot_product_attention(q, k, v, **kwargs)


# ------------------------------------------------------------------------------------------
# MultiHeadAttention
# ------------------------------------------------------------------------------------------

def test_mha_shapes_params_and_logical_axes():
  x, y = jnp.ones((B, TQ, 16)), jnp.ones((B, TK, 12))
  mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, qkv_features=32, out_features=24)
  variables = jax.jit(mha.init)(jax.random.key(0), x, y)
  assert jax.jit(mha.apply)(variables, x, y).shape == (B, TQ, 24)
  shapes = jax.tree.map(jnp.shape, nn.meta.unbox(variables["params"]))
  assert shapes == {
      "query": {"kernel": (16, 4, 8), "bias": (4, 8)},
      "key": {"kernel": (12, 2, 8), "bias": (2, 8)},
      "value": {"kernel": (12, 2, 8), "bias": (2, 8)},
      "out": {"kernel": (4, 8, 24), "bias": (24,)}}
  specs = nn.get_partition_spec(variables)["params"]
  assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "kv")
  assert tuple(specs["out"]["kernel"]) == ("heads", "kv", "embed")


def test_mha_matches_manual_computation_and_drops_out_in_training():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((B, TQ, 16), np.float32))
  mha = MultiHeadAttention(num_heads=4, use_bias=False, dropout_rate=0.5)
  params = nn.meta.unbox(jax.jit(mha.init)(jax.random.key(0), x))["params"]
  mask = _key_padding((TQ, 2), TQ)
  q, k, v = (jnp.einsum("ble,ehd->blhd", x, params[n]["kernel"]) for n in ("query", "key", "value"))
  expected = jnp.einsum("blhd,hde->ble", jax.nn.dot_product_attention(q, k, v, mask=mask),
                        params["out"]["kernel"])
  apply = jax.jit(lambda p, deterministic, rng: mha.apply(
      {"params": p}, x, mask=mask, deterministic=deterministic, rngs={"dropout": rng}),
      static_argnums=1)
  chex.assert_trees_all_close(apply(params, True, jax.random.key(3)), expected, atol=1e-5)
  assert not np.allclose(apply(params, False, jax.random.key(3)), expected, atol=1e-3)


def test_kv_cache_decoding_equals_full_causal_forward():
  length, num_kv_heads = 6, 2   # GQA: the cache holds the 2 key/value heads only
  x = jnp.asarray(np.random.default_rng(1).standard_normal((B, length, 16), np.float32))
  full = MultiHeadAttention(num_heads=4, num_kv_heads=num_kv_heads)
  params = jax.jit(full.init)(jax.random.key(0), x)["params"]
  expected = jax.jit(lambda p: full.apply({"params": p}, x, is_causal=True))(params)

  decoder = MultiHeadAttention(num_heads=4, num_kv_heads=num_kv_heads, decode=True)
  init_cache = jax.jit(lambda: decoder.init(jax.random.key(0), x)["cache"])
  cache = init_cache()                                     # sized by the full-length input
  step = jax.jit(lambda cache, token: decoder.apply(
      {"params": params, "cache": cache}, token, mutable=["cache"]))
  outs = []
  for t in range(length):                                  # one token at a time
    out, variables = step(cache, x[:, t:t + 1])
    cache = variables["cache"]
    outs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), expected, atol=1e-5)
  assert int(cache["cache_index"]) == length
  assert cache["cached_key"].shape == (B, length, num_kv_heads, 4)

  # Prefill 4 tokens at once, then decode the rest: same result.
  prefill, variables = step(init_cache(), x[:, :4])
  rest, _ = step(variables["cache"], x[:, 4:])
  chex.assert_trees_all_close(jnp.concatenate([prefill, rest], axis=1), expected, atol=1e-5)


def test_mha_bad_inputs_raise():
  mha = MultiHeadAttention(num_heads=3)
  with pytest.raises(ValueError, match="divisible by num_heads; given 16 features, 3 heads"):
    mha.init(jax.random.key(0), jnp.ones((B, TQ, 16)))
  with pytest.raises(ValueError, match=r"rank 3 .*\(2, 16\)"):
    MultiHeadAttention(num_heads=2).init(jax.random.key(0), jnp.ones((B, 16)))
  with pytest.raises(ValueError, match="num_heads=4, num_kv_heads=3"):
    MultiHeadAttention(num_heads=4, num_kv_heads=3).init(jax.random.key(0), jnp.ones((B, TQ, 16)))
  with pytest.raises(ValueError, match="caches self-attention only"):
    MultiHeadAttention(num_heads=2, decode=True).init(
        jax.random.key(0), jnp.ones((B, TQ, 16)), jnp.ones((B, TK, 16)))


# ----------------------------------------------------------------------------------------
# Gemma 2: logit soft-capping and sliding windows.
# ----------------------------------------------------------------------------------------

def _capped_by_hand(q, k, v, cap, mask):
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
  logits = np.where(mask, cap * np.tanh(logits / cap), -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("implementation", ["reference", "chunked"])
def test_logit_soft_cap_is_the_definition(implementation):
  q, k, v = (3 * x for x in _qkv(tq=4))          # scores well beyond the cap
  mask = _key_padding()
  got = attend(q, k, v, mask=mask, logit_soft_cap=2.0, implementation=implementation)
  want = _capped_by_hand(*map(np.asarray, (q, k, v)), 2.0, mask)
  chex.assert_trees_all_close(got, want, atol=1e-5)
  uncapped = attend(q, k, v, mask=mask, implementation=implementation)
  assert np.max(np.abs(np.asarray(uncapped) - want)) > 1e-2


def test_splash_soft_cap_matches_reference_in_interpret_mode():
  q, k, v = (3 * x[:1] for x in _qkv(num_kv_heads=2, tq=128, tk=128))
  f = lambda impl: attend(q, k, v, is_causal=True, logit_soft_cap=2.0, implementation=impl)
  chex.assert_trees_all_close(f("splash"), f("reference"), atol=1e-5)


def test_soft_cap_is_refused_or_routed_never_ignored():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="'xla' does not support logit soft-capping"):
    dot_product_attention(q, k, v, logit_soft_cap=2.0, implementation="xla")
  with pytest.raises(ValueError, match="logit_soft_cap must be > 0"):
    dot_product_attention(q, k, v, logit_soft_cap=0.0)
  capped = functools.partial(attention.default_backend, soft_cap=True)
  assert capped(platform="gpu", dtype=jnp.bfloat16) == "reference"
  assert capped(platform="tpu", has_mask=True, q_length=256, kv_length=256) == "reference"
  assert capped(platform="tpu", q_length=256, kv_length=256) == "splash"
  assert capped(platform="cpu", q_length=2048, kv_length=2048) == "chunked"


def test_sliding_window_masks_by_position_and_holds_in_cached_decoding():
  length, window = 7, 3
  x = jnp.asarray(np.random.default_rng(2).standard_normal((B, length, 16), np.float32))
  positions = jnp.broadcast_to(jnp.arange(length), (B, length))
  make = functools.partial(MultiHeadAttention, num_heads=4, num_kv_heads=2, rope_base=1e4)
  params = jax.jit(lambda: make().init(jax.random.key(0), x, positions=positions))()["params"]
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  local = jnp.asarray((j <= i) & (i - j < window))
  run = lambda module, **kw: jax.jit(lambda p: module.apply(
      {"params": p}, x, positions=positions, **kw))(params)
  expected = run(make(), mask=local)
  got = run(make(sliding_window=window), is_causal=True)
  chex.assert_trees_all_close(got, expected, atol=1e-5)
  assert not np.allclose(got, run(make(), is_causal=True), atol=1e-3)

  decoder = make(sliding_window=window, decode=True)
  cache = jax.jit(lambda: decoder.init(jax.random.key(0), x, positions=positions))()["cache"]
  step = jax.jit(lambda cache, token, position: decoder.apply(
      {"params": params, "cache": cache}, token, positions=position, mutable=["cache"]))
  outs = []
  for t in range(length):
    out, variables = step(cache, x[:, t:t + 1], positions[:, t:t + 1])
    cache = variables["cache"]
    outs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), expected, atol=1e-5)
  np.testing.assert_array_equal(cache["cached_positions"], positions)
