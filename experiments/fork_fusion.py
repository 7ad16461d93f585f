"""A research fork's fusion strategy: defined outside mmjax, trained by the unchanged trainer.

Gated cross-attention fusion (as in Flamingo, Alayrac et al. 2022): every modality keeps
its own Transformer stack, and from `fusion_layer` on each layer first lets a stream
cross-attend to the other streams through a tanh gate that starts at zero. Training thus
starts from exact late fusion and opens each gate only as far as it helps.

Nothing in mmjax/ knows this file. It registers the strategy by name; the config imports
it and selects it:

    python -m mmjax.main --config configs/demo.py --workdir /tmp/gated \
        --config.imports='("experiments.fork_fusion",)' --config.model.fusion=gated_xattn

(run from the repository root, so `experiments` is importable), and the same two
overrides put it into a sweep next to the built-in strategies. The contract it meets is
mmjax.models.fusion's: `fusion(tokens, masks, deterministic=) -> {modality: tokens}` with
[B, N_m, D] tokens and bool [B, N_m] masks, any subset of modalities (a stream alone, as
in contrastive encoding, skips the cross-attention).

Parameters: `{modality}_block{i}` (self-attention blocks, as the built-in strategies),
`{modality}_xattn{i}` (gated cross-attention, from `fusion_layer` on) and
`{modality}_norm`; with `shared_weights=True` one set for all modalities.
"""
from typing import Dict, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.fusion import FusionEncoder, check_streams
from mmjax.nn.transformer import BlockConfig
from mmjax.registry import FUSIONS

Array = jax.Array


class GatedCrossAttention(nn.Module):
  """x + tanh(gate) * CrossAttention(LN(x), LN(context)); `gate` is a scalar, init 0."""
  config: BlockConfig   # the fusion's block settings (heads, dropout, dtypes, ...)

  @nn.compact
  def __call__(self, x: Array, context: Array, context_mask: Array, *,
               deterministic: bool = True) -> Array:
    c = self.config
    gate = self.param("gate", nn.initializers.zeros, ())
    attended = c.attention("attention")(
        c.norm("query_norm")(x), c.norm("context_norm")(context),
        mask=context_mask[:, None, None, :], deterministic=deterministic)
    return x + jnp.tanh(gate).astype(attended.dtype) * attended


@FUSIONS.register("gated_xattn")
class GatedCrossAttentionFusion(FusionEncoder):
  """Per-modality stacks joined by zero-initialised gated cross-attention."""
  uses = ("fusion_layer", "shared_weights")   # setting num_bottlenecks or fit_weights: error

  @nn.compact
  def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array], *,
               deterministic: bool = True) -> Dict[str, Array]:
    check_streams(tokens, masks)
    fusion_layer = self.resolved_fusion_layer()
    gated_xattn = lambda name: GatedCrossAttention(self.block, name=name)
    modules = {}  # per-modality modules by name (one shared set with shared_weights)
    x = dict(tokens)
    for i in range(self.num_layers):
      if i >= fusion_layer and len(x) > 1:
        previous = dict(x)  # every stream reads the others' state before this layer
        for m in x:
          others = [o for o in previous if o != m]
          x[m] = self.stream_module(modules, m, f"xattn{i}", gated_xattn)(
              x[m], jnp.concatenate([previous[o] for o in others], axis=1),
              jnp.concatenate([masks[o] for o in others], axis=1),
              deterministic=deterministic)
      x = self.separate_layers(modules, x, masks, [i], deterministic)
    return self.final_norms(modules, x)
