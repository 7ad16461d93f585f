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

Every layer is mmjax.nn.transformer's `EncoderBlock`, built from one `BlockConfig` (heads,
MLP size, key/value heads, dropout, activation, LayerNorm epsilon, dtypes, attention
backend), so a setting reaches every strategy's layers alike: co-attention layers pass a
context (the block's optional cross-attention), fusion-in-transformer layers their own
self-attention. The fields only some strategies read (`STRATEGY_FIELDS`: fusion_layer,
num_bottlenecks, shared_weights, fit_weights) default to None; a strategy given one it
does not use (its `uses`) raises, e.g. `fusion_layer` for early, late or
fusion_in_transformer.

Parameter names: per-modality layers `{modality}_block{i}` (shared: `block{i}`),
co-attention layers `{modality}_cross_block{i}` (shared: `cross_block{i}`), joint layers
`joint_block{i}`, final norms `{modality}_norm` (shared: `norm`) or `joint_norm`,
bottleneck tokens `bottleneck` [1, K, D]; blocks use nn.transformer's names
(attention_norm, attention/{query,key,value,out}, [cross_attention_norm, context_norm,
cross_attention/...,] mlp_norm, mlp/{fc1,fc2}).
A fork adds a strategy by subclassing `FusionEncoder` in its own file, decorating it
with `@FUSIONS.register("name")` and listing the strategy fields it reads in `uses`.
"""
import functools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.attention import dot_product_attention
from mmjax.nn.attention import Projection  # the same projections as MultiHeadAttention
from mmjax.nn.transformer import BlockConfig, EncoderBlock, droppath_rates
from mmjax.registry import FUSIONS

Array = jax.Array
FIT_WEIGHTS = ("head", "query")


def _key_mask(mask: Array) -> Array:
  """Token validity [B, N] -> attention mask [B, 1, 1, N] (every query, valid keys)."""
  return mask[:, None, None, :]


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


# The fields only some strategies use, and their values when left unset (None);
# fusion_layer's default is the strategy's (`default_fusion_layer`).
STRATEGY_FIELDS = {"fusion_layer": None, "num_bottlenecks": 4, "shared_weights": False,
                   "fit_weights": "head"}


def check_fields(fusion: str, uses: Sequence[str], fields: Mapping[str, Any]) -> None:
  """Raises naming a field of `STRATEGY_FIELDS` set (not None) that strategy `fusion`
  does not use (it is not in `uses`): it would silently do nothing."""
  for field in STRATEGY_FIELDS:
    value = fields.get(field)
    if value is not None and field not in uses:
      raise ValueError(f"fusion {fusion!r} does not use {field} (given {value!r}); it uses "
                       f"{', '.join(uses) or 'none of ' + ', '.join(STRATEGY_FIELDS)}. "
                       f"Leave {field} unset (None; on the command line --config.model.{field}=None).")


def fields_for(fusion: str, fields: Mapping[str, Any]) -> Dict[str, Any]:
  """`fields` less the `STRATEGY_FIELDS` that strategy `fusion` does not use: one set of
  fields (e.g. a test's or a table's) for every strategy."""
  uses = FUSIONS.get(fusion).uses
  return {k: v for k, v in fields.items() if k not in STRATEGY_FIELDS or k in uses}


class FusionEncoder(nn.Module):
  """The fields every strategy receives; subclasses implement `__call__`.

  `block` holds the settings of every block (heads, MLP size, dropout, activation,
  LayerNorm epsilon, dtypes, attention backend); stochastic depth grows over all
  `num_layers` as in mmjax.nn.transformer's stacks. Of `STRATEGY_FIELDS`, a strategy
  reads those it lists in `uses`; setting another one (not None) is an error naming it,
  since it would silently do nothing. A fork's strategy that does not declare `uses`
  accepts them all.
  """
  num_layers: int
  block: BlockConfig
  droppath_rate: float = 0.0             # of the last layer (see droppath_schedule)
  droppath_schedule: str = "linear"      # as mmjax.nn.transformer's stacks
  fusion_layer: Optional[int] = None     # None: the strategy's default
  num_bottlenecks: Optional[int] = None  # None: 4
  shared_weights: Optional[bool] = None  # None: False
  fit_weights: Optional[str] = None      # None: "head"

  uses = tuple(STRATEGY_FIELDS)          # (a class attribute, not a field)

  def __post_init__(self):
    super().__post_init__()
    name = next((n for n in FUSIONS if FUSIONS.get(n) is type(self)), type(self).__name__)
    check_fields(name, self.uses, {field: getattr(self, field) for field in STRATEGY_FIELDS})

  def setting(self, field: str) -> Any:
    """The value of one of `STRATEGY_FIELDS`: as given, or its default when unset."""
    value = getattr(self, field)
    return STRATEGY_FIELDS[field] if value is None else value

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

  def make_block(self, name: str, layer: int, **fields) -> EncoderBlock:
    """Layer `layer`'s block (`fields`: EncoderBlock's, e.g. a self-attention)."""
    return EncoderBlock(self.block, droppath_rate=self.layer_droppath(layer), name=name,
                        **fields)

  def stream_module(self, modules: Dict[str, nn.Module], modality: str, suffix: str,
                    factory) -> nn.Module:
    """The per-modality module `{modality}_{suffix}`, or with shared_weights the one
    module `{suffix}` that every modality uses (built once, memoised in `modules`)."""
    name = suffix if self.setting("shared_weights") else f"{modality}_{suffix}"
    if name not in modules:
      modules[name] = factory(name)
    return modules[name]

  def separate_layers(self, modules, tokens, masks, layers, deterministic) -> Dict[str, Array]:
    """Runs each modality alone through `layers` (its own weights, or shared ones)."""
    out = {}
    for m, x in tokens.items():
      for i in layers:
        block = self.stream_module(modules, m, f"block{i}",
                                   functools.partial(self.make_block, layer=i))
        x = block(x, _key_mask(masks[m]), deterministic=deterministic)
      out[m] = x
    return out

  def layers_below_fusion(self, tokens, masks, deterministic):
    """Checks the streams, runs the per-modality layers below `fusion_layer`; returns
    (fusion_layer, the per-modality modules by name, {modality: tokens})."""
    check_streams(tokens, masks)
    fusion_layer, modules = self.resolved_fusion_layer(), {}
    x = self.separate_layers(modules, tokens, masks, range(fusion_layer), deterministic)
    return fusion_layer, modules, x

  def final_norms(self, modules, tokens) -> Dict[str, Array]:
    return {m: self.stream_module(modules, m, "norm", self.block.norm)(x)
            for m, x in tokens.items()}


@FUSIONS.register("hybrid")
class HybridFusion(FusionEncoder):
  """Separate layers [0, fusion_layer), joint layers [fusion_layer, num_layers)."""
  uses = ("fusion_layer", "shared_weights")

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array], *,
               deterministic: bool = True) -> Dict[str, Array]:
    fusion_layer, modules, x = self.layers_below_fusion(tokens, masks, deterministic)
    if fusion_layer == self.num_layers:
      return self.final_norms(modules, x)
    joint, mask, names, sizes = _concat(x, masks)
    for i in range(fusion_layer, self.num_layers):
      joint = self.make_block(f"joint_block{i}", i)(joint, _key_mask(mask),
                                                    deterministic=deterministic)
    joint = self.block.norm("joint_norm")(joint)
    return _split(joint, names, sizes)


@FUSIONS.register("early")
class EarlyFusion(HybridFusion):
  """All layers joint: one encoder over the concatenated tokens of every modality."""
  uses = ()

  def resolved_fusion_layer(self) -> int:
    return 0


@FUSIONS.register("late")
class LateFusion(HybridFusion):
  """All layers separate: the modalities meet only in the head (heads.Combine)."""
  uses = ("shared_weights",)

  def resolved_fusion_layer(self) -> int:
    return self.num_layers


@FUSIONS.register("bottleneck")
class BottleneckFusion(FusionEncoder):
  """Attention bottlenecks (Nagrani et al. 2021, MBT): from `fusion_layer` on, modality m
  updates [own tokens; bottlenecks]; the new bottlenecks are the mean over modalities.
  With num_bottlenecks=0 the modalities never meet (late fusion)."""
  uses = ("fusion_layer", "num_bottlenecks", "shared_weights")

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array], *,
               deterministic: bool = True) -> Dict[str, Array]:
    k = self.setting("num_bottlenecks")
    if k < 0:
      raise ValueError(f"num_bottlenecks must be >= 0; got {k}.")
    fusion_layer, modules, x = self.layers_below_fusion(tokens, masks, deterministic)
    first = next(iter(x.values()))
    batch, width = first.shape[0], first.shape[-1]
    shared = self.param("bottleneck", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, k, width),
        self.block.param_dtype)
    shared = jnp.broadcast_to(shared.astype(first.dtype), (batch, k, width))
    for i in range(fusion_layer, self.num_layers):
      updates = []
      for m in x:
        n = x[m].shape[1]
        y = jnp.concatenate([x[m], shared.astype(x[m].dtype)], axis=1)
        mask = jnp.concatenate([masks[m], jnp.ones((batch, k), bool)], axis=1)
        block = self.stream_module(modules, m, f"block{i}",
                                   functools.partial(self.make_block, layer=i))
        y = block(y, _key_mask(mask), deterministic=deterministic)
        x[m], bottleneck = y[:, :n], y[:, n:]
        updates.append(bottleneck)
      shared = sum(updates) / len(updates)
    return self.final_norms(modules, x)


@FUSIONS.register("cross")
class CrossFusion(FusionEncoder):
  """Separate layers below `fusion_layer` (default 0), then co-attention layers in which
  every stream attends to itself, then to the concatenation of all other streams of the
  previous layer (the block's cross-attention, its context LayerNorm-ed: `context_norm`)."""
  uses = ("fusion_layer", "shared_weights")

  def default_fusion_layer(self) -> int:
    return 0

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array], *,
               deterministic: bool = True) -> Dict[str, Array]:
    fusion_layer, modules, x = self.layers_below_fusion(tokens, masks, deterministic)
    for i in range(fusion_layer, self.num_layers):
      previous = dict(x)
      for m in x:
        others = [o for o in previous if o != m]
        context = context_mask = None
        if others:  # a stream alone (e.g. for contrastive encoding) skips cross-attention
          context, context_mask, _, _ = _concat({o: previous[o] for o in others},
                                                {o: masks[o] for o in others})
          context_mask = _key_mask(context_mask)
        block = self.stream_module(modules, m, f"cross_block{i}", functools.partial(
            self.make_block, layer=i, context_norm=True))
        x[m] = block(x[m], _key_mask(masks[m]), context, context_mask,
                     deterministic=deterministic)
    return self.final_norms(modules, x)


class FusionInTransformerAttention(nn.Module):
  """Multi-head attention that attends to each modality separately and mixes the results.

  For query token t, head h: out = sum_m w[m] * attention(q, K_m, V_m) with w a softmax
  over the modalities present (those with at least one valid key for this example):
    "head":  w[h, m] learned per head (param `weight_{m}` [heads], init 0 = uniform);
    "query": w[t, h, m] = softmax_m(<q_th, g_{m,h}> + c_{m,h}) computed from the query
             (params `gate_{m}` [heads, head_dim] and `gate_bias_{m}` [heads]).
  `segments` names the modalities of the joint sequence in order, with their lengths.
  Attention over a modality's keys costs the same as its slice of full attention, so
  there is no extra pass. With one modality w == 1 and this is ordinary attention
  (same parameter names as MultiHeadAttention: query, key, value, out).
  The weights are sown as intermediates['fusion_weights'] [B, T, H, M].
  """
  config: BlockConfig
  segments: Tuple[Tuple[str, int], ...]
  weights: str = "head"

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, deterministic: bool = True) -> Array:
    c = self.config
    if self.weights not in FIT_WEIGHTS:
      raise ValueError(f"Unknown fit_weights {self.weights!r}; expected one of {FIT_WEIGHTS}.")
    batch, length, width = x.shape
    if mask.shape != (batch, 1, 1, length):
      raise ValueError(f"FusionInTransformerAttention expects a key mask [batch, 1, 1, "
                       f"length] = {(batch, 1, 1, length)}; got shape {mask.shape}.")
    if width % c.num_heads:
      raise ValueError(f"Width {width} must be divisible by num_heads={c.num_heads}.")
    head_dim = width // c.num_heads
    # The same projections (names, shapes, init) as nn.attention.MultiHeadAttention.
    dense = functools.partial(
        Projection, use_bias=True, dtype=c.dtype, param_dtype=c.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros)
    projection = lambda name, heads: dense((heads, head_dim), ("embed", "heads", "kv"),
                                           name=name)(x)
    query = projection("query", c.num_heads)
    key = projection("key", c.num_kv_heads or c.num_heads)
    value = projection("value", c.num_kv_heads or c.num_heads)

    dropout_rate = 0.0 if deterministic else c.attention_dropout_rate
    results, logits, present, start = [], [], [], 0
    for name, size in self.segments:
      stop = start + size
      rng = self.make_rng("dropout") if dropout_rate > 0.0 else None
      results.append(dot_product_attention(
          query, key[:, start:stop], value[:, start:stop], mask=mask[..., start:stop],
          dropout_rate=dropout_rate, dropout_rng=rng, implementation=c.implementation))
      present.append(jnp.any(mask[:, 0, 0, start:stop], axis=-1))                # [B]
      param = lambda n, shape: self.param(n, nn.initializers.zeros, shape, c.param_dtype)
      if self.weights == "head":
        logits.append(param(f"weight_{name}", (c.num_heads,))[None, None])
      else:
        gate = param(f"gate_{name}", (c.num_heads, head_dim))
        bias = param(f"gate_bias_{name}", (c.num_heads,))
        logits.append(jnp.einsum("bthd,hd->bth", query.astype(jnp.float32), gate) + bias)
      start = stop
    logits = jnp.stack([jnp.broadcast_to(l, (batch, length, c.num_heads)) for l in logits],
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


@FUSIONS.register("fusion_in_transformer")
class FusionInTransformer(FusionEncoder):
  """Joint layers whose heads mix per-modality attention with convex weights (the block's
  self-attention is FusionInTransformerAttention)."""
  uses = ("fit_weights",)

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array], *,
               deterministic: bool = True) -> Dict[str, Array]:
    check_streams(tokens, masks)
    joint, mask, names, sizes = _concat(tokens, masks)
    attention = functools.partial(FusionInTransformerAttention, self.block,
                                  tuple(zip(names, sizes)), self.setting("fit_weights"))
    for i in range(self.num_layers):
      joint = self.make_block(f"joint_block{i}", i, attention=attention)(
          joint, _key_mask(mask), deterministic=deterministic)
    joint = self.block.norm("joint_norm")(joint)
    return _split(joint, names, sizes)
