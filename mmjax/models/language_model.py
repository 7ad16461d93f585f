"""A decoder-only Transformer language model of the Gemma / Llama family.

    tokens -> embedding (x sqrt(width) for Gemma) -> `depth` LMBlocks -> RMSNorm
           -> logits (the embedding transposed when tied, else a `head` kernel)

Gemma 2: the block knobs of mmjax.nn.lm_block (post-norms, query_pre_attn_scalar,
attention soft-cap), a sliding window on the local layers (`block.sliding_window`; every
`sliding_window_pattern`-th layer, the 2nd, 4th, ... for Gemma 2's 2, attends globally,
the others locally; transformers' `layer_types`) and `final_logit_softcapping` c on the
logits, c * tanh(logits / c).

The LM does not decide who attends to whom: the caller passes positions and the mask
(causal, prefix-LM, padding), so one module serves text-only LMs and VLMs alike. With
`decode=True` every block keeps a key/value cache (see MultiHeadAttention).

Parameter tree (what the Hugging Face importer fills): `embedding/embedding` [vocab,
width], `layers_{i}/...` (see mmjax.nn.lm_block), `final_norm/scale`, `head/kernel`
[width, vocab] when the embeddings are not tied.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn.lm_block import LMBlock, LMBlockConfig
from mmjax.nn.norms import RMSNorm
from mmjax.nn.transformer import rematerialized


class DecoderLM(nn.Module):
  """Token embedding, `depth` Gemma / Llama blocks, final norm and logits."""
  vocab_size: int
  width: int
  depth: int
  block: LMBlockConfig
  embed_scale: bool = True        # Gemma multiplies embeddings by sqrt(width); Llama not
  tie_embeddings: bool = True     # Gemma: logits = x @ embedding.T; Llama: a `head`
  sliding_window_pattern: int = 2  # block.sliding_window: layer i global iff (i+1) % n == 0
  final_logit_softcapping: Optional[float] = None  # Gemma 2: logits -> c * tanh(logits / c)
  remat_policy: str = "none"      # blocks recomputed in the backward pass (REMAT_POLICIES)
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")))
    block_cls = rematerialized(LMBlock, "none" if self.decode else self.remat_policy)
    self.layers = [block_cls(self.layer_config(i), decode=self.decode, dtype=self.dtype,
                             param_dtype=self.param_dtype) for i in range(self.depth)]
    self.final_norm = RMSNorm(self.block.norm_epsilon, self.block.norm_scale_offset,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    if not self.tie_embeddings:
      self.head = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype,
                           kernel_init=nn.with_logical_partitioning(
                               nn.initializers.normal(0.02), ("embed", "vocab")))

  def layer_config(self, i: int) -> LMBlockConfig:
    """Block i's settings: global layers drop the sliding window."""
    if self.block.sliding_window is None:
      return self.block
    if self.sliding_window_pattern < 2:
      raise ValueError(f"sliding_window_pattern must be >= 2 (every n-th layer global); "
                       f"given {self.sliding_window_pattern}.")
    is_global = (i + 1) % self.sliding_window_pattern == 0
    return dataclasses.replace(self.block, sliding_window=None) if is_global else self.block

  def embed(self, tokens: jax.Array) -> jax.Array:
    """Token ids [B, L] -> embeddings [B, L, width] (scaled as the family does)."""
    x = self.embedding(tokens)
    if self.embed_scale:  # in the compute dtype, as Gemma does
      x = x * jnp.asarray(np.sqrt(self.width), x.dtype)
    return x

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """Embeddings [B, L, width] -> float32 logits [B, L, vocab].

    `positions` [B, L] are the rotary positions; `mask` bool [B, 1, L, L] (or against the
    whole cache [B, 1, L, cache_length] when decoding), True = may attend.
    """
    x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", "length", "embed"))
    for layer in self.layers:
      x = layer(x, positions, mask)
    x = self.final_norm(x)
    logits = self.embedding.attend(x) if self.tie_embeddings else self.head(x)
    logits = logits.astype(jnp.float32)
    if self.final_logit_softcapping is not None:
      cap = float(self.final_logit_softcapping)
      logits = cap * jnp.tanh(logits / cap)
    return logits
