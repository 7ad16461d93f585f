"""One decoder-only language-model block, Gemma / Llama style; [B, L, D] -> [B, L, D].

    x += Attention(RMSNorm(x))     rotary positions, grouped-query heads, no biases
    x += GatedMlp(RMSNorm(x))      GeGLU (Gemma) or SwiGLU (Llama)

Gemma 2 adds (each a knob of `LMBlockConfig`, off by default): an RMSNorm on the output
of the attention and of the MLP before the residual sum (`post_norms`), attention scores
scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2 (`query_pre_attn_scalar`)
and capped at +-c by c * tanh(s / c) (`attn_logit_softcapping`), and on its local layers
a sliding window (`sliding_window`: keys within that many positions; see
MultiHeadAttention).

Which tokens see which is otherwise entirely the caller's `mask` (a prefix-LM mask,
causal, with padding), so the same block serves training, a full-attention prefill and
one-token decoding steps against the key/value cache (`decode=True`, see
MultiHeadAttention; the mask is then against the whole cache).

Settings come as one `LMBlockConfig`; parameter names: `attention_norm/scale`,
`attention/{query,key,value,out}/kernel`, `mlp_norm/scale`, `mlp/{gate,up,down}/kernel`,
and with `post_norms` also `post_attention_norm/scale`, `post_mlp_norm/scale`.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.gated_mlp import GatedMlp
from mmjax.nn.norms import RMSNorm


@dataclasses.dataclass(frozen=True)
class LMBlockConfig:
  """The architecture knobs shared by every block of a decoder-only LM."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_kv_heads: Optional[int] = None     # < num_heads: grouped-query attention
  activation: str = "gelu_tanh"          # "gelu_tanh": GeGLU (Gemma), "silu": SwiGLU (Llama)
  norm_epsilon: float = 1e-6
  norm_scale_offset: float = 1.0         # Gemma stores RMSNorm scale - 1; Llama: 0
  rope_base: float = 10_000.0
  implementation: Optional[str] = None   # attention backend, see mmjax.nn.attention
  # Gemma 2 (None / False: Gemma 1 and Llama behaviour).
  post_norms: bool = False               # RMSNorm after attention and after the MLP
  query_pre_attn_scalar: Optional[float] = None   # scores x this^-1/2 (None: head_dim)
  attn_logit_softcapping: Optional[float] = None  # scores -> c * tanh(scores / c)
  sliding_window: Optional[int] = None   # this block sees keys |p_q - p_k| < window


class LMBlock(nn.Module):
  """Pre-norm self-attention + gated MLP with residuals."""
  config: LMBlockConfig
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    norm = lambda name: RMSNorm(c.norm_epsilon, c.norm_scale_offset, dtype=self.dtype,
                                param_dtype=self.param_dtype, name=name)
    scale = None if c.query_pre_attn_scalar is None else float(c.query_pre_attn_scalar) ** -0.5
    y = MultiHeadAttention(
        c.num_heads, num_kv_heads=c.num_kv_heads, qkv_features=c.num_heads * c.head_dim,
        out_features=x.shape[-1], use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, implementation=c.implementation, decode=self.decode,
        rope_base=c.rope_base, scale=scale, logit_soft_cap=c.attn_logit_softcapping,
        sliding_window=c.sliding_window, kernel_init=nn.initializers.lecun_normal(),
        name="attention")(
            norm("attention_norm")(x), mask=mask, positions=positions, full_cache_mask=True)
    if c.post_norms:
      y = norm("post_attention_norm")(y)
    x = nn.with_logical_constraint(x + y, ("batch", "length", "embed"))
    y = GatedMlp(c.mlp_dim, c.activation, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="mlp")(norm("mlp_norm")(x))
    if c.post_norms:
      y = norm("post_mlp_norm")(y)
    return nn.with_logical_constraint(x + y, ("batch", "length", "embed"))
