"""Scaled dot-product attention and multi-head attention.

`dot_product_attention` is one pure function over `[batch, length, heads, head_dim]` with
interchangeable backends, registered by name in `mmjax.registry.ATTENTION_BACKENDS`:

  "reference"  plain einsum with a float32 softmax: the definition every other backend is
               tested against; supports everything (mask, bias, dropout, GQA).
  "xla"        `jax.nn.dot_product_attention(implementation="xla")`; no dropout.
  "cudnn"      `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only; no dropout.
  "splash"     Pallas TPU splash attention (runs in interpret mode off TPU, so it is
               unit-tested on CPU); `is_causal` only, no mask / bias / dropout.
  "chunked"    "reference" over chunks of queries, one chunk's weights live at a time
               (forward and backward): memory-efficient for long sequences; no dropout.

`implementation=None` picks the best backend for the platform (see `default_backend`).
A backend that cannot honour a mask, bias, dropout or a logit soft-cap raises
ValueError; none ignores one silently. Every backend returns zeros for a query whose
keys are all masked.

Masks are boolean, True = may attend, broadcastable to [batch, heads, q_length, kv_length];
biases are additive and broadcast the same way. Causal masks are aligned top-left
(query i sees keys 0..i), as in `jax.nn.dot_product_attention`. `logit_soft_cap` c
(Gemma 2) bounds the scaled scores before bias and mask, s -> c * tanh(s / c):
"reference", "chunked" and "splash" have it; jax.nn's "xla" / "cudnn" do not and refuse
it, and the default choice avoids them.

`MultiHeadAttention` (flax.linen) projects inputs to query / key / value heads (fewer
key/value heads gives grouped- or multi-query attention), attends, and projects back; with
`decode=True` it keeps a key/value cache in the "cache" collection for autoregressive
decoding, and with `sliding_window` each query sees only keys whose position is within the
window (Gemma 2's local layers). Parameter names (query, key, value, out; kernel, bias)
are the checkpoint format.
"""
import functools
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
from absl import logging
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mmjax.nn.rope import apply_rope
from mmjax.registry import ATTENTION_BACKENDS

Array = jax.Array
Dtype = Any

# Large finite negative logit for masked keys: unlike -inf it never produces NaN, even
# in a row where every key is masked (such rows are zeroed on the output).
_MASK_VALUE = float(np.finfo(np.float32).min)


# ----------------------------------------------------------------------------------------
# Validation shared by every backend.
# ----------------------------------------------------------------------------------------

def _check_inputs(query, key, value):
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.ndim != 4:
      raise ValueError(f"dot_product_attention: {name} must have rank 4 "
                       f"[batch, length, heads, head_dim]; given shape {x.shape}.")
  if key.shape != value.shape:
    raise ValueError(f"dot_product_attention: key and value shapes must be equal; given "
                     f"key {key.shape}, value {value.shape}.")
  if query.shape[0] != key.shape[0]:
    raise ValueError(f"dot_product_attention: query and key batch sizes differ; given "
                     f"query {query.shape}, key {key.shape}.")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"dot_product_attention: query and key head_dim must match; given "
                     f"query head_dim {query.shape[-1]}, key head_dim {key.shape[-1]}.")
  num_heads, num_kv_heads = query.shape[2], key.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"dot_product_attention: query heads must be a multiple of key/value "
                     f"heads; given {num_heads} query heads, {num_kv_heads} key/value heads.")


def _as_4d(name: str, x: Optional[Array], target: Tuple[int, ...]) -> Optional[Array]:
  """Left-pads `x` to rank 4 and checks that it broadcasts to `target`."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.ndim > 4:
    raise ValueError(f"dot_product_attention: {name} must broadcast to [batch, heads, "
                     f"q_length, kv_length] = {target}; given rank-{x.ndim} shape {x.shape}.")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  if any(d not in (1, t) for d, t in zip(x.shape, target)):
    raise ValueError(f"dot_product_attention: {name} must broadcast to [batch, heads, "
                     f"q_length, kv_length] = {target}; given shape {x.shape}.")
  return x


def _causal_mask(q_length: int, kv_length: int, q_offset: Any = 0) -> Array:
  """[1, 1, q, k]: query i (at position q_offset + i) sees keys 0..q_offset + i."""
  rows = q_offset + jnp.arange(q_length)[:, None]
  return (jnp.arange(kv_length)[None, :] <= rows)[None, None]


def _zero_fully_masked_rows(out: Array, mask: Optional[Array], is_causal: bool,
                            kv_length: int) -> Array:
  """Zeros outputs of queries with no visible key ([B,Tq,H,D] out, [b,h,q,k] mask)."""
  if mask is None:  # a causal mask alone always leaves key 0 visible.
    return out
  mask = jnp.broadcast_to(mask, mask.shape[:3] + (kv_length,))
  if is_causal:
    mask = mask & _causal_mask(out.shape[1], kv_length)
  visible = jnp.any(mask, axis=-1)                      # [b, h, Tq]
  return out * jnp.transpose(visible, (0, 2, 1))[..., None].astype(out.dtype)


# ----------------------------------------------------------------------------------------
# Backends. Each gets validated inputs: mask / bias already rank 4 (or None), scale a float.
# ----------------------------------------------------------------------------------------

@ATTENTION_BACKENDS.register("reference")
def reference_attention(query, key, value, *, bias=None, mask=None, is_causal=False,
                        scale: float, dropout_rate=0.0, dropout_rng=None,
                        logit_soft_cap=None) -> Array:
  """The definition: einsum logits, float32 softmax, masked keys get weight exactly 0."""
  q_length, num_heads = query.shape[1], query.shape[2]
  kv_length, num_kv_heads = key.shape[1], key.shape[2]
  if num_kv_heads != num_heads:
    # GQA: each key/value head serves num_heads // num_kv_heads consecutive query heads.
    # Repeating them for a 4-D einsum ran as fast as or faster than a grouped 5-D einsum
    # on XLA:CPU.
    key = jnp.repeat(key, num_heads // num_kv_heads, axis=2)
    value = jnp.repeat(value, num_heads // num_kv_heads, axis=2)
  query = query * jnp.asarray(scale, query.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
  if logit_soft_cap is not None:
    logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  logits_mask = mask
  if is_causal:
    causal = _causal_mask(q_length, kv_length)
    logits_mask = causal if mask is None else mask & causal
  if logits_mask is not None:
    # exp(_MASK_VALUE - max) == 0 exactly, so masked keys get weight 0 whenever the row
    # has a visible key; fully masked rows are zeroed on the output below.
    logits = jnp.where(logits_mask, logits, _MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
  return _zero_fully_masked_rows(out, mask, is_causal, kv_length)


def _refuse(backend: str, dropout_rate: float, logit_soft_cap=None, **unsupported):
  if dropout_rate > 0.0:
    raise ValueError(f"attention backend {backend!r} does not support dropout on the "
                     f"weights; given dropout_rate={dropout_rate}. Use 'reference'.")
  if logit_soft_cap is not None:
    raise ValueError(f"attention backend {backend!r} does not support logit soft-capping; "
                     f"given logit_soft_cap={logit_soft_cap}. Use 'reference' or 'chunked'.")
  for name, value in unsupported.items():
    if value is not None:
      raise ValueError(f"attention backend {backend!r} does not support `{name}`; given "
                       f"shape {jnp.shape(value)}. Use 'reference' or 'xla'.")


def _jax_nn_attention(implementation, query, key, value, *, bias=None, mask=None,
                      is_causal=False, scale: float, dropout_rate=0.0, dropout_rng=None,
                      logit_soft_cap=None):
  del dropout_rng
  _refuse(implementation, dropout_rate, logit_soft_cap)
  if bias is not None:
    bias = bias.astype(query.dtype)
  out = jax.nn.dot_product_attention(query, key, value, bias, mask, scale=scale,
                                     is_causal=is_causal, implementation=implementation)
  return _zero_fully_masked_rows(out, mask, is_causal, key.shape[1])


ATTENTION_BACKENDS.register("xla")(functools.partial(_jax_nn_attention, "xla"))


@ATTENTION_BACKENDS.register("cudnn")
def cudnn_attention(query, key, value, **kwargs):
  if target_platform() != "gpu":
    raise ValueError(f"attention backend 'cudnn' needs a GPU; this platform is "
                     f"{target_platform()!r}.")
  return _jax_nn_attention("cudnn", query, key, value, **kwargs)


_SPLASH_BLOCK = 128


def target_platform() -> str:
  """Platform of the devices the program is compiled for.

  The mesh set by `jax.set_mesh` names it (a TPU topology when `mmjax.aot` compiles on a
  CPU host); without a mesh, JAX's default backend.
  """
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return getattr(device, "platform", None) or jax.default_backend()


def _mesh_axes_that_divide(logical: str, size: int) -> Tuple[str, ...]:
  """Mesh axes the logical axis maps to under the active rules, if they divide `size`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = nn.logical_to_mesh_axes((logical,))[0]
  axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ()))
               if mesh.shape.get(a, 1) > 1)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  return axes if axes and size % shards == 0 else ()


def _splash_kernel(query, key, value, *, is_causal, interpret, logit_soft_cap=None):
  """Splash on local arrays: q [B, Tq, H, D] (already scaled), k / v [B, Tk, K, D]."""
  # Imported lazily: Pallas TPU kernels are only needed by this backend.
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)
  batch, q_length, num_heads, head_dim = query.shape
  kv_length, num_kv_heads = key.shape[1], key.shape[2]
  groups = num_heads // num_kv_heads
  blocks = splash.BlockSizes(*(_SPLASH_BLOCK,) * 8)
  shape = (q_length, kv_length)
  head_mask = masks.CausalMask(shape) if is_causal else masks.FullMask(shape)
  # One multi-query kernel per key/value head serves its group of query heads (GQA).
  kernel = splash.make_splash_mqa(
      masks.MultiHeadMask([head_mask] * groups), block_sizes=blocks, head_shards=1,
      q_seq_shards=1, interpret=interpret, attn_logits_soft_cap=logit_soft_cap)
  q = query.reshape(batch, q_length, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)   # [B, K, Tk, D]
  out = jax.vmap(jax.vmap(kernel))(q, k, v)                        # [B, K, G, Tq, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_length, num_heads, head_dim)


@ATTENTION_BACKENDS.register("splash")
def splash_attention(query, key, value, *, bias=None, mask=None, is_causal=False,
                     scale: float, dropout_rate=0.0, dropout_rng=None,
                     logit_soft_cap=None) -> Array:
  """Pallas TPU splash attention; causal or full attention only (with a soft-cap).

  XLA cannot partition a Pallas kernel, so under a mesh it runs in `shard_map`: the batch
  split like the activations' `batch` axis (data x fsdp), heads like `heads` (tensor),
  each over the axes that divide it (others replicated). Key/value heads are split with
  the query heads when they divide too (GQA kept); otherwise they are repeated to one
  per query head first. Interpret mode wherever the target is not a TPU.
  """
  del dropout_rng
  _refuse("splash", dropout_rate, bias=bias, mask=mask)
  batch, q_length, num_heads, _ = query.shape
  kv_length, num_kv_heads = key.shape[1], key.shape[2]
  if q_length % _SPLASH_BLOCK or kv_length % _SPLASH_BLOCK:
    raise ValueError(f"attention backend 'splash' needs lengths divisible by "
                     f"{_SPLASH_BLOCK} (its TPU lane width); given q_length {q_length}, "
                     f"kv_length {kv_length}.")
  query = query * jnp.asarray(scale, query.dtype)  # splash does not scale the logits itself
  kernel = functools.partial(_splash_kernel, is_causal=is_causal,
                             interpret=target_platform() != "tpu",
                             logit_soft_cap=logit_soft_cap)
  batch_axes = _mesh_axes_that_divide("batch", batch)
  head_axes = _mesh_axes_that_divide("heads", num_heads)
  if not batch_axes and not head_axes:
    return kernel(query, key, value)
  if head_axes and _mesh_axes_that_divide("heads", num_kv_heads) != head_axes:
    key = jnp.repeat(key, num_heads // num_kv_heads, axis=2)
    value = jnp.repeat(value, num_heads // num_kv_heads, axis=2)
  spec = P(batch_axes or None, None, head_axes or None, None)
  return jax.shard_map(kernel, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(query, key, value)


def _query_chunk(q_length: int) -> int:
  """Queries per chunk of the "chunked" backend: 256 at L=1024, 512 at L=4096 (best
  measured there); at most 8 chunks, so the loop's per-step overhead stays small."""
  return max(min(256, q_length // 2), q_length // 8, 1)


@ATTENTION_BACKENDS.register("chunked")
def chunked_attention(query, key, value, *, bias=None, mask=None, is_causal=False,
                      scale: float, dropout_rate=0.0, dropout_rng=None,
                      logit_soft_cap=None) -> Array:
  """"reference" over query chunks: one [chunk, kv_length] block of weights per head live.

  `lax.map` attends `_query_chunk(q_length)` queries at a time to every key, and
  `jax.checkpoint` makes the backward pass recompute each chunk's weights instead of
  storing all of them, so scratch memory is O(chunk x kv_length), not O(q x kv_length).
  Mask / bias rows are sliced per chunk (broadcast rows are shared); causal rows are offset
  by the chunk's position.
  """
  del dropout_rng
  _refuse("chunked", dropout_rate)
  batch, q_length, num_heads, head_dim = query.shape
  kv_length = key.shape[1]
  chunk = _query_chunk(q_length)
  if q_length % chunk:
    raise ValueError(f"attention backend 'chunked' needs q_length divisible by its query "
                     f"chunk max(min(256, q_length // 2), q_length // 8) = {chunk}; given "
                     f"q_length {q_length}. Use 'reference'.")
  num_chunks = q_length // chunk

  queries = query.reshape(batch, num_chunks, chunk, num_heads, head_dim).swapaxes(0, 1)
  # Per-query mask / bias rows travel with their chunk; broadcast ones ([b, h, 1, k]) are
  # shared by every chunk.
  shared = {"mask": mask, "bias": bias}
  per_chunk = {
      name: jnp.moveaxis(x.reshape(x.shape[:2] + (num_chunks, chunk, x.shape[3])), 2, 0)
      for name, x in shared.items() if x is not None and x.shape[2] == q_length}

  def one_chunk(inputs):
    index, q, rows = inputs
    arrays = {**shared, **rows}
    chunk_mask = arrays["mask"]
    if is_causal:
      causal = _causal_mask(chunk, kv_length, index * chunk)
      chunk_mask = causal if chunk_mask is None else chunk_mask & causal
    return reference_attention(q, key, value, bias=arrays["bias"], mask=chunk_mask,
                               scale=scale, logit_soft_cap=logit_soft_cap)

  out = jax.lax.map(jax.checkpoint(one_chunk), (jnp.arange(num_chunks), queries, per_chunk))
  return out.swapaxes(0, 1).reshape(batch, q_length, num_heads, head_dim)


def default_backend(*, platform: Optional[str] = None, dtype: Dtype = jnp.float32,
                    has_mask: bool = False, has_bias: bool = False, dropout: bool = False,
                    q_length: int = 0, kv_length: int = 0, head_dim: int = 64,
                    soft_cap: bool = False) -> str:
  """The fastest backend that honours the request on `platform` (default: the target's).

  CPU: "chunked" from q_length 1024 on (when its query chunk divides q_length), else
    "reference" (both faster than jax.nn's "xla" on XLA:CPU, and "chunked" keeps scratch
    memory O(chunk x length); measured in experiments/results/benchmark.md).
  GPU: "cudnn" (fused flash attention) for bf16/fp16 with head_dim a multiple of 8 up to
    128, its supported range, else "xla"; a request cuDNN refuses when traced falls back
    to "xla" (see `dot_product_attention`), so the default never fails where jax.nn's own
    default (XLA) works.
  TPU: "splash" for full or causal attention on 128-multiple lengths, else "xla".
  Dropout on the weights: "reference" everywhere (the only backend that has it).
  Logit soft-capping: on GPU and TPU, where jax.nn's kernels lack it, the CPU choice
  ("chunked" or "reference", plain XLA) unless splash fits on a TPU.
  """
  platform = platform or target_platform()
  if dropout:
    return "reference"
  if platform == "gpu" and not soft_cap:
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if half and head_dim % 8 == 0 and head_dim <= 128 else "xla"
  if platform == "tpu":
    lengths_fit = q_length % _SPLASH_BLOCK == 0 and kv_length % _SPLASH_BLOCK == 0
    if lengths_fit and not has_mask and not has_bias:
      return "splash"
    if not soft_cap:
      return "xla"
  if q_length >= 1024 and q_length % _query_chunk(q_length) == 0:
    return "chunked"
  return "reference"


def dot_product_attention(query: Array, key: Array, value: Array, *,
                          bias: Optional[Array] = None, mask: Optional[Array] = None,
                          is_causal: bool = False, scale: Optional[float] = None,
                          dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None,
                          logit_soft_cap: Optional[float] = None,
                          implementation: Optional[str] = None) -> Array:
  """softmax(cap(q k^T * scale) + bias, masked) v over [batch, length, heads, head_dim].

  Args:
    query: [B, Tq, H, D].
    key, value: [B, Tk, K, D] with H % K == 0 (K < H: grouped / multi-query attention).
    bias: additive logits bias broadcastable to [B, H, Tq, Tk].
    mask: bool, broadcastable to [B, H, Tq, Tk]; True = may attend.
    is_causal: query i attends keys 0..i only (combined with `mask`).
    scale: logits scale; default 1 / sqrt(D).
    dropout_rate: dropout on the attention weights; needs `dropout_rng` when > 0.
    dropout_rng: PRNG key for the dropout.
    logit_soft_cap: c > 0 caps the scaled scores at +-c: cap(s) = c * tanh(s / c)
      (Gemma 2); None leaves them as they are.
    implementation: a name in `mmjax.registry.ATTENTION_BACKENDS`, or None for
      `default_backend()`.

  Returns:
    [B, Tq, H, D] in value's dtype; zeros for queries whose keys are all masked.
  """
  _check_inputs(query, key, value)
  batch, q_length, num_heads, head_dim = query.shape
  kv_length = key.shape[1]
  target = (batch, num_heads, q_length, kv_length)
  mask = _as_4d("mask", mask, target)
  bias = _as_4d("bias", bias, target)
  if mask is not None and mask.dtype != jnp.bool_:
    raise ValueError(f"dot_product_attention: mask must be bool (True = may attend); given "
                     f"dtype {mask.dtype}. Pass additive values as `bias`.")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dot_product_attention: dropout_rate must be in [0, 1); given "
                     f"{dropout_rate}.")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError(f"dot_product_attention: dropout_rate={dropout_rate} needs a "
                     "dropout_rng; given None.")
  if logit_soft_cap is not None and not logit_soft_cap > 0:
    raise ValueError(f"dot_product_attention: logit_soft_cap must be > 0 or None; given "
                     f"{logit_soft_cap}.")
  if scale is None:
    scale = 1.0 / float(np.sqrt(head_dim))
  chosen = implementation or default_backend(
      dtype=query.dtype, has_mask=mask is not None, has_bias=bias is not None,
      dropout=dropout_rate > 0.0, q_length=q_length, kv_length=kv_length,
      head_dim=head_dim, soft_cap=logit_soft_cap is not None)
  kwargs = dict(bias=bias, mask=mask, is_causal=is_causal, scale=scale,
                dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  if logit_soft_cap is not None:  # only then: backends registered by forks need not know it
    kwargs["logit_soft_cap"] = float(logit_soft_cap)
  if implementation is None and chosen == "cudnn":
    try:
      return cudnn_attention(query, key, value, **kwargs)
    except (ValueError, NotImplementedError, RuntimeError) as e:
      # cuDNN checks shapes, masks, its version and the GPU when traced; XLA takes the rest.
      logging.log_first_n(logging.INFO, "cuDNN attention refused (%s); using 'xla'.", 1, e)
      chosen = "xla"
  return ATTENTION_BACKENDS.get(chosen)(query, key, value, **kwargs)


# ----------------------------------------------------------------------------------------
# Multi-head attention module.
# ----------------------------------------------------------------------------------------

def _flat_init(init: Callable, num_in: int) -> Callable:
  """`init` applied to the 2-D [fan_in, fan_out] view of a multi-axis kernel."""
  def init_fn(key, shape, dtype=jnp.float32):
    flat = (int(np.prod(shape[:num_in])), int(np.prod(shape[num_in:])))
    return init(key, flat, dtype).reshape(shape)
  return init_fn


class Projection(nn.Module):
  """Contracts the last `len(kernel_axes) - len(features)` input axes into `features`.

  Like nn.DenseGeneral, but the kernel is created in its final shape, so its logical
  axis names apply from the start (DenseGeneral initialises a flattened 2-D kernel, which
  a 3-name sharding constraint rejects under a mesh).
  """
  features: Tuple[int, ...]
  kernel_axes: Tuple[str, ...]
  use_bias: bool
  dtype: Dtype
  param_dtype: Dtype
  kernel_init: Callable
  bias_init: Callable

  @nn.compact
  def __call__(self, x: Array) -> Array:
    num_in = len(self.kernel_axes) - len(self.features)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(_flat_init(self.kernel_init, num_in),
                                               self.kernel_axes),
        x.shape[x.ndim - num_in:] + tuple(self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jnp.tensordot(x, kernel, axes=num_in)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          self.bias_init, self.kernel_axes[num_in:]), self.features, self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y


def _within_window(mask: Optional[Array], query_positions: Array, key_positions: Array,
                   window: int) -> Array:
  """`mask` & (|query position - key position| < window), [B, 1 or H, Tq, Tk]."""
  distance = query_positions[:, :, None] - key_positions[:, None, :]
  local = (jnp.abs(distance) < window)[:, None]
  return local if mask is None else jnp.logical_and(mask, local)


class MultiHeadAttention(nn.Module):
  """Multi-head (or grouped-/multi-query) dot-product attention with a decoding cache.

  Parameters: `query`, `key`, `value` kernels [embed, heads, head_dim] with logical axes
  ('embed', 'heads', 'kv'), `out` kernel [heads, head_dim, embed] with ('heads', 'kv',
  'embed'); biases when `use_bias`.

  Decoding (`decode=True`, self-attention only): initialise with an input of the full
  maximum length to size the cache, then call with the next token(s) [B, L, E]; they are
  written at `cache_index` and attend to every cached position up to their own. A `mask`
  given while decoding is against the whole cache: broadcastable to [B, H, L, max_length].
  The cache index is a traced value, so it cannot be checked at trace time: the caller
  keeps the total number of decoded tokens <= max_length (XLA clamps writes past it).
  With `full_cache_mask=True` the given mask alone decides what each new token sees (a
  prefix-LM prefill attends to the whole prefix in both directions); it must then hide
  the cache positions not written yet.

  Rotary position embeddings (`rope_base` set, see mmjax.nn.rope): queries and keys are
  rotated by `positions` [B, L] before attention (and before caching).

  Gemma 2 knobs: `scale` replaces the 1 / sqrt(head_dim) logits scale;
  `logit_soft_cap` caps the scaled scores (see `dot_product_attention`);
  `sliding_window` W (self-attention with `positions`) keeps a key visible only when its
  position is within W - 1 of the query's, |p_q - p_k| < W, on top of `mask` (the window
  of google-deepmind/gemma; over the causal part it is Hugging Face's q - k < W). Key
  positions come from `positions`, or while decoding from the cache, which then also
  holds them (`cached_positions`), so padding never counts against the window.
  """
  num_heads: int
  num_kv_heads: Optional[int] = None
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  dropout_rate: float = 0.0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None
  decode: bool = False
  rope_base: Optional[float] = None
  scale: Optional[float] = None
  logit_soft_cap: Optional[float] = None
  sliding_window: Optional[int] = None
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array] = None, *,
               mask: Optional[Array] = None, bias: Optional[Array] = None,
               is_causal: bool = False, deterministic: bool = True,
               positions: Optional[Array] = None, full_cache_mask: bool = False) -> Array:
    if self.decode and inputs_kv is not None:
      raise ValueError("MultiHeadAttention(decode=True) caches self-attention only; given "
                       "inputs_kv for cross-attention. Build cross-attention with decode=False.")
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    for name, x in (("inputs_q", inputs_q), ("inputs_kv", inputs_kv)):
      if x.ndim != 3:
        raise ValueError(f"MultiHeadAttention: {name} must have rank 3 [batch, length, "
                         f"features]; given shape {x.shape}.")
    features = self.qkv_features or inputs_q.shape[-1]
    num_kv_heads = self.num_kv_heads or self.num_heads
    if features % self.num_heads:
      raise ValueError(f"MultiHeadAttention: qkv_features must be divisible by num_heads; "
                       f"given {features} features, {self.num_heads} heads.")
    if self.num_heads % num_kv_heads:
      raise ValueError(f"MultiHeadAttention: num_heads must be a multiple of num_kv_heads; "
                       f"given num_heads={self.num_heads}, num_kv_heads={num_kv_heads}.")
    head_dim = features // self.num_heads

    projection = functools.partial(
        Projection, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, bias_init=self.bias_init)
    heads_axes = ("embed", "heads", "kv")
    query = projection((self.num_heads, head_dim), heads_axes, name="query")(inputs_q)
    key = projection((num_kv_heads, head_dim), heads_axes, name="key")(inputs_kv)
    value = projection((num_kv_heads, head_dim), heads_axes, name="value")(inputs_kv)
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
    key = nn.with_logical_constraint(key, ("batch", "length", "heads", "kv"))
    value = nn.with_logical_constraint(value, ("batch", "length", "heads", "kv"))
    if self.rope_base is not None or self.sliding_window is not None:
      if positions is None or inputs_kv is not inputs_q:
        raise ValueError("MultiHeadAttention(rope_base=... or sliding_window=...) is "
                         "self-attention with explicit `positions` [batch, length]; given "
                         f"positions={None if positions is None else positions.shape}"
                         f"{'' if inputs_kv is inputs_q else ' and cross-attention inputs'}.")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"MultiHeadAttention: sliding_window must be >= 1 or None; given "
                       f"{self.sliding_window}.")
    if self.rope_base is not None:
      query = apply_rope(query, positions, self.rope_base)
      key = apply_rope(key, positions, self.rope_base)

    key_positions = positions
    if self.decode:
      key, value, mask, is_causal, key_positions = self._use_cache(
          key, value, mask, is_causal, full_cache_mask, positions)
    if self.sliding_window is not None:
      mask = _within_window(mask, positions, key_positions, self.sliding_window)

    dropout_rate = 0.0 if deterministic else self.dropout_rate
    dropout_rng = self.make_rng("dropout") if dropout_rate > 0.0 else None
    x = dot_product_attention(query, key, value, bias=bias, mask=mask, is_causal=is_causal,
                              scale=self.scale, dropout_rate=dropout_rate,
                              dropout_rng=dropout_rng, logit_soft_cap=self.logit_soft_cap,
                              implementation=self.implementation)
    out = projection((self.out_features or inputs_q.shape[-1],), ("heads", "kv", "embed"),
                     name="out")(x)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))

  def _use_cache(self, key, value, mask, is_causal, full_cache_mask=False, positions=None):
    """Writes this step's keys/values (and positions, with a sliding window) into the
    cache; returns the cached K/V, mask, is_causal and key positions."""
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    cached_positions = None
    if self.sliding_window is not None:
      cached_positions = self.variable("cache", "cached_positions", jnp.zeros,
                                       positions.shape, jnp.int32)
    if not initialized:  # Initialisation only sizes the cache: attend as usual.
      return key, value, mask, is_causal, positions
    batch, max_length, num_kv_heads, head_dim = cached_key.value.shape
    if key.shape[0] != batch or key.shape[2:] != (num_kv_heads, head_dim):
      raise ValueError(f"MultiHeadAttention decode: step keys {key.shape} do not match the "
                       f"cache [batch, max_length, heads, head_dim] = {cached_key.value.shape}.")
    step_length = key.shape[1]
    if step_length > max_length:
      raise ValueError(f"MultiHeadAttention decode: {step_length} new tokens exceed the "
                       f"cache length {max_length}.")
    index = cache_index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value, (0, index, 0, 0))
    cache_index.value = index + step_length
    key_positions = None
    if cached_positions is not None:
      cached_positions.value = jax.lax.dynamic_update_slice(
          cached_positions.value, positions.astype(jnp.int32), (0, index))
      key_positions = cached_positions.value
    del is_causal  # The cache mask is already causal over absolute positions.
    if full_cache_mask:
      if mask is None:
        raise ValueError("MultiHeadAttention decode: full_cache_mask=True needs a mask "
                         "[B, H, L, max_length]; given None.")
      return cached_key.value, cached_value.value, mask, False, key_positions
    # New token t (at absolute position index + t) sees cached positions 0..index + t.
    query_position = index + jnp.arange(step_length)
    visible = jnp.arange(max_length)[None, :] <= query_position[:, None]
    visible = visible[None, None]                                   # [1, 1, L, max_length]
    mask = visible if mask is None else jnp.logical_and(mask, visible)
    return cached_key.value, cached_value.value, mask, False, key_positions
