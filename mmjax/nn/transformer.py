"""Pre-LayerNorm Transformer: the one block, its settings, and encoder / decoder stacks.

  EncoderBlock:  x += DropPath(Dropout(SelfAttention(LN(x))))
                 x += DropPath(Dropout(CrossAttention(LN(x), context)))   if a context is given
                 x += DropPath(Dropout(Mlp(LN(x))))
  DecoderBlock:  the same with causal self-attention (the context: the encoder output)
  Encoder / Decoder: `num_layers` blocks, then a final LayerNorm.

Every block of mmjax is this block: the stacks here, the text towers and every fusion
strategy (mmjax/models/fusion.py; co-attention passes a context, fusion-in-transformer
its own self-attention). Their shared settings (heads, MLP size, dropout, activation,
LayerNorm epsilon, dtypes, attention backend) are one frozen `BlockConfig`, passed as one
field; models build it from their flat config fields with `BlockConfig.of(model)`.

Stacks either unroll the blocks (parameters `encoderblock_0`, `encoderblock_1`, ...) or,
with `scan_layers=True`, run one block under `nn.scan` (parameters `encoderblock` with a
leading `layers` axis), so compile time does not grow with depth. `remat_policy`
rematerialises each block in the backward pass (names in `REMAT_POLICIES`). Both options
compute exactly the same function as the plain stack.

Stochastic depth drops a block's residual branch per example. As in ViT / MBT its rate
grows linearly with depth, from 0 in the first layer to `droppath_rate` in the last
(`droppath_schedule="linear"`); `"constant"` uses `droppath_rate` in every layer, which
scanned layers need (one block traced for all layers has one rate). It is a setting of
the stack, which gives each block its own `droppath_rate`.

`activation` (a name in `ACTIVATIONS`) and `layer_norm_epsilon` default to big_vision's
tanh-approximate GELU and 1e-6; imported checkpoints set what they were trained with
(Hugging Face ViT: exact GELU and 1e-12, CLIP: quick GELU and 1e-5).
"""
import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.attention import MultiHeadAttention

Array = jax.Array
Dtype = Any

# Name -> jax.checkpoint policy (what the backward pass may keep instead of recomputing).
REMAT_POLICIES = {
    "none": None,                                          # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,      # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,       # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}



def _quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


# Name -> MLP activation. "gelu_tanh" is flax's `nn.gelu` default (= HF "gelu_pytorch_tanh").
ACTIVATIONS = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),   # erf; torch nn.GELU()
    "quick_gelu": _quick_gelu,                               # OpenAI CLIP
    "silu": nn.silu,                                         # SwiGLU (Llama)
}


def activation_fn(activation: Union[str, Callable[[Array], Array]]) -> Callable[[Array], Array]:
  """An activation given by name (see `ACTIVATIONS`) or as a function."""
  if callable(activation):
    return activation
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[activation]


def rematerialized(module_cls, policy: str, *, static_argnums=(), prevent_cse: bool = True):
  """`module_cls` whose activations the backward pass recomputes as `policy` (a name in
  REMAT_POLICIES) says; `module_cls` itself for "none". Parameter names are unchanged."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {policy!r}; expected one of "
                     f"{sorted(REMAT_POLICIES)}.")
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse,
                  static_argnums=static_argnums)


def _check_tokens(module: str, x: Array):
  if x.ndim != 3:
    raise ValueError(f"{module}: inputs must have rank 3 [batch, length, width]; given shape "
                     f"{x.shape}.")


class Mlp(nn.Module):
  """Dense(mlp_dim) -> activation -> Dropout -> Dense(out_dim or input width)."""
  mlp_dim: int
  dropout_rate: float = 0.0
  out_dim: Optional[int] = None
  activation: Union[str, Callable[[Array], Array]] = "gelu_tanh"   # see ACTIVATIONS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    kernel_init = nn.initializers.xavier_uniform()
    bias_init = nn.initializers.normal(stddev=1e-6)
    width = self.out_dim or x.shape[-1]
    x = dense(self.mlp_dim, name="fc1",
              kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "mlp")),
              bias_init=nn.with_logical_partitioning(bias_init, ("mlp",)))(x)
    x = nn.with_logical_constraint(activation_fn(self.activation)(x), ("batch", "length", "mlp"))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return dense(width, name="fc2",
                 kernel_init=nn.with_logical_partitioning(kernel_init, ("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(bias_init, ("embed",)))(x)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """The settings every block of a stack shares: one object, passed as one field.

  A model builds it from its own flat config fields with `BlockConfig.of(model)`, so a
  field the model has (say `activation`) reaches every block it builds, encoder, decoder
  or fusion layer alike; a setting the model lacks keeps the default below.
  """
  num_heads: int
  mlp_dim: int
  num_kv_heads: Optional[int] = None       # < num_heads: grouped-query attention
  dropout_rate: float = 0.0                # on every residual branch and in the MLP
  attention_dropout_rate: float = 0.0      # on the attention weights
  activation: Union[str, Callable[[Array], Array]] = "gelu_tanh"   # see ACTIVATIONS
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32               # compute dtype
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None     # attention backend, see mmjax.nn.attention

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):   # configs spell dtypes as strings
      object.__setattr__(self, name, jnp.dtype(getattr(self, name)))

  @classmethod
  def of(cls, model: Any, **given) -> "BlockConfig":
    """The settings `model` has a field for (by name), updated with `given`."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: getattr(model, n) for n in names if hasattr(model, n)} | given)

  def norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

  def attention(self, name: str, **fields) -> MultiHeadAttention:
    return MultiHeadAttention(
        self.num_heads, num_kv_heads=self.num_kv_heads, dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype, implementation=self.implementation,
        name=name, **fields)

  def mlp(self, name: str) -> Mlp:
    return Mlp(self.mlp_dim, self.dropout_rate, activation=self.activation, dtype=self.dtype,
               param_dtype=self.param_dtype, name=name)


class _Residual(nn.Module):
  """x + DropPath(Dropout(y)), then the activation constraint."""
  dropout_rate: float
  droppath_rate: float

  @nn.compact
  def __call__(self, x: Array, y: Array, deterministic: bool) -> Array:
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    # Stochastic depth = dropout with one draw per example, shared over all other axes.
    y = nn.Dropout(self.droppath_rate, broadcast_dims=tuple(range(1, y.ndim)))(
        y, deterministic=deterministic)
    return nn.with_logical_constraint(x + y, ("batch", "length", "embed"))


class EncoderBlock(nn.Module):
  """The Transformer block, pre-LN; [B, L, D] -> [B, L, D]:

    x += SelfAttention(LN(x), mask)                          `attention_norm`, `attention`
    x += CrossAttention(LN(x), [LN](context), context_mask)  `cross_attention_norm`,
                                                             [`context_norm`], `cross_attention`
    x += Mlp(LN(x))                                          `mlp_norm`, `mlp`

  each branch through dropout and stochastic depth (`droppath_rate`, this block's).
  The cross-attention runs only when a `context` is given.

  `attention` replaces the self-attention: a factory (a module class, a
  `functools.partial`) called as `attention(name="attention")`, whose module is called
  as `module(y, mask=mask, deterministic=...)`, e.g. fusion-in-transformer's per-modality
  attention. None: `config`'s MultiHeadAttention (causal with `causal=True`, with a
  key/value cache with `decode=True`).
  """
  config: BlockConfig
  droppath_rate: float = 0.0
  attention: Optional[Callable[..., nn.Module]] = None
  causal: bool = False
  decode: bool = False
  context_norm: bool = False    # LayerNorm the context before cross-attending to it

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None, context: Optional[Array] = None,
               context_mask: Optional[Array] = None, deterministic: bool = True) -> Array:
    _check_tokens(type(self).__name__, x)
    c = self.config
    residual = functools.partial(_Residual, c.dropout_rate, self.droppath_rate)
    if self.attention is None:
      attention = c.attention("attention", decode=self.decode)
    else:
      attention = self.attention(name="attention")
    causal = {"is_causal": True} if self.causal else {}
    y = attention(c.norm("attention_norm")(x), mask=mask, deterministic=deterministic,
                  **causal)
    x = residual()(x, y, deterministic)
    if context is not None:
      _check_tokens(f"{type(self).__name__} (context)", context)
      if self.context_norm:
        context = c.norm("context_norm")(context)
      y = c.attention("cross_attention")(c.norm("cross_attention_norm")(x), context,
                                         mask=context_mask, deterministic=deterministic)
      x = residual()(x, y, deterministic)
    y = c.mlp("mlp")(c.norm("mlp_norm")(x), deterministic=deterministic)
    return residual()(x, y, deterministic)


class DecoderBlock(EncoderBlock):
  """EncoderBlock with causal self-attention, cross-attending to the encoder output."""
  causal: bool = True


DROPPATH_SCHEDULES = ("linear", "constant")


def droppath_rates(rate: float, num_layers: int, schedule: str = "linear") -> Tuple[float, ...]:
  """Stochastic-depth rate of each layer: `rate * i / (num_layers - 1)` for layer i
  ("linear", ViT / MBT), or `rate` everywhere ("constant")."""
  if schedule not in DROPPATH_SCHEDULES:
    raise ValueError(f"droppath_schedule={schedule!r}; expected one of {DROPPATH_SCHEDULES}.")
  if schedule == "constant" or num_layers < 2:
    return (float(rate),) * num_layers
  return tuple(float(rate) * i / (num_layers - 1) for i in range(num_layers))


def _stack(stack: nn.Module, block_cls, prefix: str, x: Array, *args, **extra_fields) -> Array:
  """Applies `stack.num_layers` blocks to `x`, plain or scanned, optionally rematerialised.

  Each block is `block_cls(stack.block, droppath_rate=..., **extra_fields)`, called as
  `block(x, *args)`; `args` are the same for every layer, the last one being the Python
  bool `deterministic`. Called from the stack's compact `__call__`.
  """
  fields = {"config": stack.block} | extra_fields
  rates = droppath_rates(stack.droppath_rate, stack.num_layers, stack.droppath_schedule)
  # `deterministic` is static for tracing (argument numbers count `self` as 0).
  num_args = len(inspect.signature(block_cls.__call__).parameters)
  block_cls = rematerialized(block_cls, stack.remat_policy, prevent_cse=not stack.scan_layers,
                             static_argnums=(num_args - 1,))
  if not stack.scan_layers:
    for i in range(stack.num_layers):
      x = block_cls(name=f"{prefix}_{i}", droppath_rate=rates[i], **fields)(x, *args)
    return x
  if len(set(rates)) > 1:
    raise ValueError(f"scan_layers=True traces one block for all layers, so it cannot grow "
                     f"stochastic depth with depth (droppath_rate={stack.droppath_rate}); set "
                     "droppath_schedule='constant' or scan_layers=False.")
  fields["droppath_rate"] = rates[0] if rates else 0.0
  scanned = nn.scan(
      lambda block, carry, *xs: (block(carry, *xs), None),
      variable_axes={"params": 0, "cache": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * len(args),
      length=stack.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"})
  x, _ = scanned(block_cls(name=prefix, **fields), x, *args)
  return x


class _Stack(nn.Module):
  """The fields of a stack of blocks (Encoder, Decoder)."""
  num_layers: int
  block: BlockConfig
  droppath_rate: float = 0.0            # of the last layer (see droppath_schedule)
  droppath_schedule: str = "linear"     # or "constant"
  scan_layers: bool = False
  remat_policy: str = "none"


class Encoder(_Stack):
  """`num_layers` EncoderBlocks and a final LayerNorm (`encoder_norm`); [B, L, D] -> [B, L, D].

  `mask`: bool, broadcastable to [B, heads, L, L], True = may attend (e.g. key padding
  `tokens_valid[:, None, None, :]`).
  """

  @nn.compact
  def __call__(self, x: Array, *, mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    _check_tokens("Encoder", x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = _stack(self, EncoderBlock, "encoderblock", x, mask, None, None, deterministic)
    return self.block.norm("encoder_norm")(x)


class Decoder(_Stack):
  """`num_layers` DecoderBlocks and a final LayerNorm (`decoder_norm`); [B, L, D] -> [B, L, D].

  Self-attention is always causal; `self_mask` (e.g. padding) is combined with it.
  `cross_mask`: bool, broadcastable to [B, heads, L, L_encoded]. With `decode=True` the
  self-attention keeps a key/value cache ("cache" collection, mutable): initialise with
  the full-length target to size it, then feed one (or more) new tokens per call.
  """

  @nn.compact
  def __call__(self, x: Array, encoded: Array, *, cross_mask: Optional[Array] = None,
               self_mask: Optional[Array] = None, deterministic: bool = True,
               decode: bool = False) -> Array:
    _check_tokens("Decoder", x)
    _check_tokens("Decoder (encoded)", encoded)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = _stack(self, DecoderBlock, "decoderblock", x, self_mask, encoded, cross_mask,
               deterministic, decode=decode)
    return self.block.norm("decoder_norm")(x)
