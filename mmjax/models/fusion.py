"""Fusion strategies: how the token streams of several modalities meet.

Every strategy is a flax module with the same interface, registered by name in
`mmjax.registry.FUSIONS` and selected by `config.model.fusion`:

  fusion(tokens, masks, deterministic=...) -> {modality: encoded tokens}

`tokens` maps each modality to [B, N_m, D] (already embedded into the shared width D, see
tokenizers.py), `masks` to bool [B, N_m] (True = real token); the output has the same
keys and shapes, after a final LayerNorm. Any subset of the modalities may be passed:
a contrastive model encodes images alone and captions alone with the same module that
fuses them for VQA. Pooling and combining the outputs is the head's job (heads.py).

  early                  one joint encoder over the concatenation (single stream, ViLT)
  late                   one encoder per modality; they meet only in the head on top
  hybrid                 per-modality layers below `fusion_layer`, joint layers from
                         there on (fusion_layer=0 is early, =num_layers is late)
  bottleneck             per-modality layers below `fusion_layer`; from there on each
                         modality attends to its own tokens plus `num_bottlenecks` shared
                         latent tokens, averaged over modalities after every layer (MBT)
  cross                  per-modality layers below `fusion_layer`; from there on each
                         stream self-attends, then cross-attends to the other streams
                         (co-attention, LXMERT / ViLBERT)
  fusion_in_transformer  joint layers in which every head attends to each modality's keys
                         and values separately and mixes the per-modality results with
                         convex weights, learned per head (`fit_weights="head"`) or
                         computed from the query (`"query"`); one pass over the tokens

`shared_weights=True` makes the per-modality layers one set of weights shared by all
modalities (MBT's shared encoder); early and fusion_in_transformer share by construction.

Parameter names: per-modality layers `{modality}_block{i}` (shared: `block{i}`),
co-attention layers `{modality}_cross_block{i}` (shared: `cross_block{i}`), joint layers
`joint_block{i}`, final norms `{modality}_norm` (shared: `norm`) or `joint_norm`,
bottleneck tokens `bottleneck` [1, K, D]; blocks use nn.transformer's names
(attention_norm, attention/{query,key,value,out}, mlp_norm, mlp/{fc1,fc2}).
A fork adds a strategy by subclassing `FusionEncoder` in its own file and decorating it
with `@FUSIONS.register("name")`.
"""
import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.attention import MultiHeadAttention, dot_product_attention
from mmjax.nn.attention import Projection  # the same projections as MultiHeadAttention
from mmjax.nn.transformer import EncoderBlock, Mlp, droppath_rates
from mmjax.registry import FUSIONS

Array = jax.Array
FIT_WEIGHTS = ("head", "query")


def _key_mask(mask: Array) -> Array:
  """Token validity [B, N] -> attention mask [B, 1, 1, N] (every query, valid keys)."""
  return mask[:, None, None, :]


def _residual(dropout_rate: float, droppath_rate: float, deterministic: bool):
  """x + DropPath(Dropout(y)) for the blocks defined here (as in nn.transformer)."""
  def apply(x, y):
    y = nn.Dropout(dropout_rate, deterministic=deterministic)(y)
    # Stochastic depth: one draw per example, shared over tokens and features.
    y = nn.Dropout(droppath_rate, broadcast_dims=(1, 2), deterministic=deterministic)(y)
    return nn.with_logical_constraint(x + y, ("batch", "length", "embed"))
  return apply


def _concat(tokens: Mapping[str, Array], masks: Mapping[str, Array]):
  names = list(tokens)
  sizes = [tokens[m].shape[1] for m in names]
  joint = jnp.concatenate([tokens[m] for m in names], axis=1)
  mask = jnp.concatenate([masks[m] for m in names], axis=1)
  return joint, mask, names, sizes


def _split(joint: Array, names, sizes) -> Dict[str, Array]:
  out, start = {}, 0
  for name, size in zip(names, sizes):
    out[name] = joint[:, start:start + size]
    start += size
  return out


def check_streams(tokens: Mapping[str, Array], masks: Mapping[str, Array]) -> None:
  """Raises ValueError unless tokens/masks describe [B, N_m, D] / [B, N_m] streams."""
  if not tokens:
    raise ValueError("Fusion needs at least one modality; got none.")
  if set(tokens) != set(masks):
    raise ValueError(f"Fusion needs a mask for every modality; got tokens for "
                     f"{sorted(tokens)} and masks for {sorted(masks)}.")
  first = next(iter(tokens))
  batch, width = tokens[first].shape[0], tokens[first].shape[-1]
  for m, x in tokens.items():
    if x.ndim != 3 or x.shape[0] != batch or x.shape[-1] != width:
      raise ValueError(f"Fusion expects every modality as [batch={batch}, tokens, "
                       f"width={width}] (like {first!r}); got {m!r} with shape {x.shape}.")
    if masks[m].shape != x.shape[:2] or masks[m].dtype != jnp.bool_:
      raise ValueError(f"Fusion expects a bool mask {x.shape[:2]} for {m!r}; got "
                       f"{masks[m].dtype}{tuple(masks[m].shape)}.")


class FusionEncoder(nn.Module):
  """The fields every strategy receives; subclasses implement `__call__`.

  A strategy ignores fields that do not apply to it (e.g. `num_bottlenecks` outside
  `bottleneck`), so one config can sweep `fusion` over all strategies.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0             # of the last layer (see droppath_schedule)
  droppath_schedule: str = "linear"      # as mmjax.nn.transformer's stacks
  fusion_layer: Optional[int] = None     # None: the strategy's default
  num_bottlenecks: int = 4
  shared_weights: bool = False
  fit_weights: str = "head"
  dtype: Any = jnp.float32
  implementation: Optional[str] = None

  def default_fusion_layer(self) -> int:
    return self.num_layers // 2  # mid fusion, as MBT

  def resolved_fusion_layer(self) -> int:
    layer = self.default_fusion_layer() if self.fusion_layer is None else self.fusion_layer
    if not 0 <= layer <= self.num_layers:
      raise ValueError(f"fusion_layer must be in [0, num_layers={self.num_layers}]; "
                       f"got {layer}.")
    return layer

  def layer_droppath(self, layer: int) -> float:
    """Stochastic-depth rate of layer `layer` (counted over all `num_layers`)."""
    return droppath_rates(self.droppath_rate, self.num_layers, self.droppath_schedule)[layer]

  def block(self, name: str, layer: int) -> nn.Module:
    return EncoderBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                        dropout_rate=self.dropout_rate,
                        attention_dropout_rate=self.attention_dropout_rate,
                        droppath_rate=self.layer_droppath(layer), dtype=self.dtype,
                        implementation=self.implementation, name=name)

  def stream_module(self, modules: Dict[str, nn.Module], modality: str, suffix: str,
                    factory) -> nn.Module:
    """The per-modality module `{modality}_{suffix}`, or with shared_weights the one
    module `{suffix}` that every modality uses (built once, memoised in `modules`)."""
    name = suffix if self.shared_weights else f"{modality}_{suffix}"
    if name not in modules:
      modules[name] = factory(name)
    return modules[name]

  def separate_layers(self, modules, tokens, masks, layers, deterministic) -> Dict[str, Array]:
    """Runs each modality alone through `layers` (its own weights, or shared ones)."""
    out = {}
    for m, x in tokens.items():
      for i in layers:
        x = self.stream_module(modules, m, f"block{i}", functools.partial(self.block, layer=i))(
            x, mask=_key_mask(masks[m]), deterministic=deterministic)
      out[m] = x
    return out

  def final_norms(self, modules, tokens) -> Dict[str, Array]:
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    return {m: self.stream_module(modules, m, "norm", norm)(x) for m, x in tokens.items()}


@FUSIONS.register("hybrid")
class HybridFusion(FusionEncoder):
  """Separate layers [0, fusion_layer), joint layers [fusion_layer, num_layers)."""

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array], *,
               deterministic: bool = True) -> Dict[str, Array]:
    check_streams(tokens, masks)
    fusion_layer = self.resolved_fusion_layer()
    modules = {}
    x = self.separate_layers(modules, tokens, masks, range(fusion_layer), deterministic)
    if fusion_layer == self.num_layers:
      return self.final_norms(modules, x)
    joint, mask, names, sizes = _concat(x, masks)
    for i in range(fusion_layer, self.num_layers):
      joint = self.block(f"joint_block{i}", i)(joint, mask=_key_mask(mask),
                                               deterministic=deterministic)
    joint = nn.LayerNorm(dtype=self.dtype, name="joint_norm")(joint)
    return _split(joint, names, sizes)


@FUSIONS.register("early")
class EarlyFusion(HybridFusion):
  """All layers joint: one encoder over the concatenated tokens of every modality."""

  def resolved_fusion_layer(self) -> int:
    return 0


@FUSIONS.register("late")
class LateFusion(HybridFusion):
  """All layers separate: the modalities meet only in the head (heads.Combine)."""

  def resolved_fusion_layer(self) -> int:
    return self.num_layers


@FUSIONS.register("bottleneck")
class BottleneckFusion(FusionEncoder):
  """Attention bottlenecks (Nagrani et al. 2021, MBT): from `fusion_layer` on, modality m
  updates [own tokens; bottlenecks]; the new bottlenecks are the mean over modalities.
  With num_bottlenecks=0 the modalities never meet (late fusion)."""

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array], *,
               deterministic: bool = True) -> Dict[str, Array]:
    check_streams(tokens, masks)
    fusion_layer = self.resolved_fusion_layer()
    if self.num_bottlenecks < 0:
      raise ValueError(f"num_bottlenecks must be >= 0; got {self.num_bottlenecks}.")
    modules = {}
    x = self.separate_layers(modules, tokens, masks, range(fusion_layer), deterministic)
    first = next(iter(x.values()))
    batch, width = first.shape[0], first.shape[-1]
    k = self.num_bottlenecks
    shared = self.param("bottleneck", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, k, width))
    shared = jnp.broadcast_to(shared.astype(first.dtype), (batch, k, width))
    for i in range(fusion_layer, self.num_layers):
      updates = []
      for m in x:
        n = x[m].shape[1]
        y = jnp.concatenate([x[m], shared.astype(x[m].dtype)], axis=1)
        mask = jnp.concatenate([masks[m], jnp.ones((batch, k), bool)], axis=1)
        y = self.stream_module(modules, m, f"block{i}", functools.partial(self.block, layer=i))(
            y, mask=_key_mask(mask), deterministic=deterministic)
        x[m], bottleneck = y[:, :n], y[:, n:]
        updates.append(bottleneck)
      shared = sum(updates) / len(updates)
    return self.final_norms(modules, x)


class CrossBlock(nn.Module):
  """Co-attention block (pre-LN): self-attention, cross-attention to `context`, MLP."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  dtype: Any = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, mask: Array, context: Optional[Array],
               context_mask: Optional[Array], *, deterministic: bool = True) -> Array:
    def attention(name):
      return MultiHeadAttention(num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
                                dtype=self.dtype, implementation=self.implementation, name=name)
    residual = _residual(self.dropout_rate, self.droppath_rate, deterministic)
    y = nn.LayerNorm(dtype=self.dtype, name="attention_norm")(x)
    x = residual(x, attention("attention")(y, mask=_key_mask(mask),
                                           deterministic=deterministic))
    if context is not None:  # a stream alone (e.g. for contrastive encoding) skips it
      y = nn.LayerNorm(dtype=self.dtype, name="cross_attention_norm")(x)
      c = nn.LayerNorm(dtype=self.dtype, name="context_norm")(context)
      x = residual(x, attention("cross_attention")(y, c, mask=_key_mask(context_mask),
                                                   deterministic=deterministic))
    y = nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(x)
    return residual(x, Mlp(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                           dtype=self.dtype, name="mlp")(y, deterministic=deterministic))


@FUSIONS.register("cross")
class CrossFusion(FusionEncoder):
  """Separate layers below `fusion_layer` (default 0), then co-attention layers in which
  every stream attends to the concatenation of all other streams of the previous layer."""

  def default_fusion_layer(self) -> int:
    return 0

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array], *,
               deterministic: bool = True) -> Dict[str, Array]:
    check_streams(tokens, masks)
    fusion_layer = self.resolved_fusion_layer()
    modules = {}
    x = self.separate_layers(modules, tokens, masks, range(fusion_layer), deterministic)
    cross_block = lambda name, layer: CrossBlock(
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        droppath_rate=self.layer_droppath(layer), dtype=self.dtype,
        implementation=self.implementation, name=name)
    for i in range(fusion_layer, self.num_layers):
      previous = dict(x)
      for m in x:
        others = [o for o in previous if o != m]
        context = context_mask = None
        if others:
          context, context_mask, _, _ = _concat({o: previous[o] for o in others},
                                                {o: masks[o] for o in others})
        x[m] = self.stream_module(modules, m, f"cross_block{i}",
                                  functools.partial(cross_block, layer=i))(
            x[m], masks[m], context, context_mask, deterministic=deterministic)
    return self.final_norms(modules, x)


class FusionInTransformerAttention(nn.Module):
  """Multi-head attention that attends to each modality separately and mixes the results.

  For query token t, head h: out = sum_m w[m] * attention(q, K_m, V_m) with w a softmax
  over the modalities present (those with at least one valid key for this example):
    "head":  w[h, m] learned per head (param `weight_{m}` [heads], init 0 = uniform);
    "query": w[t, h, m] = softmax_m(<q_th, g_{m,h}> + c_{m,h}) computed from the query
             (params `gate_{m}` [heads, head_dim] and `gate_bias_{m}` [heads]).
  Attention over a modality's keys costs the same as its slice of full attention, so
  there is no extra pass. With one modality w == 1 and this is ordinary attention
  (same parameter names as MultiHeadAttention: query, key, value, out).
  The weights are sown as intermediates['fusion_weights'] [B, T, H, M].
  """
  num_heads: int
  weights: str = "head"
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, mask: Array, segments: Tuple[Tuple[str, int], ...], *,
               deterministic: bool = True) -> Array:
    if self.weights not in FIT_WEIGHTS:
      raise ValueError(f"Unknown fit_weights {self.weights!r}; expected one of {FIT_WEIGHTS}.")
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"Width {width} must be divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    # The same projections (names, shapes, init) as nn.attention.MultiHeadAttention.
    dense = functools.partial(
        Projection, use_bias=True, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros)
    projection = lambda name: dense((self.num_heads, head_dim), ("embed", "heads", "kv"),
                                    name=name)(x)
    query, key, value = projection("query"), projection("key"), projection("value")

    dropout_rate = 0.0 if deterministic else self.dropout_rate
    results, logits, present, start = [], [], [], 0
    for name, size in segments:
      stop = start + size
      rng = self.make_rng("dropout") if dropout_rate > 0.0 else None
      results.append(dot_product_attention(
          query, key[:, start:stop], value[:, start:stop], mask=_key_mask(mask[:, start:stop]),
          dropout_rate=dropout_rate, dropout_rng=rng, implementation=self.implementation))
      present.append(jnp.any(mask[:, start:stop], axis=1))                      # [B]
      zeros = nn.initializers.zeros
      if self.weights == "head":
        logits.append(self.param(f"weight_{name}", zeros, (self.num_heads,))[None, None])
      else:
        gate = self.param(f"gate_{name}", zeros, (self.num_heads, head_dim))
        bias = self.param(f"gate_bias_{name}", zeros, (self.num_heads,))
        logits.append(jnp.einsum("bthd,hd->bth", query.astype(jnp.float32), gate) + bias)
      start = stop
    batch, length = x.shape[:2]
    logits = jnp.stack([jnp.broadcast_to(l, (batch, length, self.num_heads)) for l in logits],
                       axis=-1).astype(jnp.float32)                          # [B, T, H, M]
    present = jnp.stack(present, axis=-1)[:, None, None, :]                  # [B, 1, 1, M]
    # Absent modalities get weight 0 (an example without any such keys: all weights 0).
    weights = jax.nn.softmax(jnp.where(present, logits, jnp.finfo(jnp.float32).min), axis=-1)
    weights = jnp.where(present, weights, 0.0)
    if not self.is_initializing():  # init would return it as a variable collection
      self.sow("intermediates", "fusion_weights", weights)
    mixed = jnp.einsum("bthm,mbthd->bthd", weights.astype(query.dtype), jnp.stack(results))
    out = dense((width,), ("heads", "kv", "embed"), name="out")(mixed)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class FusionInTransformerBlock(nn.Module):
  """Pre-LN block whose attention is FusionInTransformerAttention."""
  num_heads: int
  mlp_dim: int
  weights: str = "head"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  dtype: Any = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x, mask, segments, *, deterministic: bool = True):
    residual = _residual(self.dropout_rate, self.droppath_rate, deterministic)
    y = nn.LayerNorm(dtype=self.dtype, name="attention_norm")(x)
    x = residual(x, FusionInTransformerAttention(
        num_heads=self.num_heads, weights=self.weights, dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, implementation=self.implementation, name="attention")(
            y, mask, segments, deterministic=deterministic))
    y = nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(x)
    return residual(x, Mlp(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                           dtype=self.dtype, name="mlp")(y, deterministic=deterministic))


@FUSIONS.register("fusion_in_transformer")
class FusionInTransformer(FusionEncoder):
  """Joint layers whose heads mix per-modality attention with convex weights."""

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array], *,
               deterministic: bool = True) -> Dict[str, Array]:
    check_streams(tokens, masks)
    joint, mask, names, sizes = _concat(tokens, masks)
    segments = tuple(zip(names, sizes))
    for i in range(self.num_layers):
      joint = FusionInTransformerBlock(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim, weights=self.fit_weights,
          dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
          droppath_rate=self.layer_droppath(i), dtype=self.dtype,
          implementation=self.implementation, name=f"joint_block{i}")(
              joint, mask, segments, deterministic=deterministic)
    joint = nn.LayerNorm(dtype=self.dtype, name="joint_norm")(joint)
    return _split(joint, names, sizes)
