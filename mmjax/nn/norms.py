"""RMSNorm (Zhang & Sennrich 2019): the normalisation of the Gemma / Llama family.

    y = x / sqrt(mean(x^2) + epsilon) * (scale_offset + scale)

computed in float32 whatever the input dtype (as both reference implementations do).
Gemma stores the scale minus one (`scale_offset=1`, parameters initialised to 0);
Llama stores it as is (`scale_offset=0`, initialised to 1). Parameter: `scale` [width]
with logical axis ('embed',).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """Root-mean-square normalisation over the last axis, with a learned scale."""
  epsilon: float = 1e-6
  scale_offset: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.scale_offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * (self.scale_offset + scale.astype(jnp.float32))).astype(self.dtype)
