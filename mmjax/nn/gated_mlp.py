"""Gated MLP (Shazeer 2020): down(activation(gate(x)) * up(x)), no biases.

With the tanh-GELU it is GeGLU (Gemma), with SiLU it is SwiGLU (Llama); `activation`
names one of mmjax.nn.transformer.ACTIVATIONS. Parameters: `gate/kernel`, `up/kernel`
[embed, mlp] and `down/kernel` [mlp, embed] (the Hugging Face gate_proj / up_proj /
down_proj, transposed).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.transformer import activation_fn


class GatedMlp(nn.Module):
  """[..., embed] -> [..., embed] through a gated hidden layer of `mlp_dim` units."""
  mlp_dim: int
  activation: str = "gelu_tanh"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.lecun_normal()
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    into = nn.with_logical_partitioning(init, ("embed", "mlp"))
    gate = dense(self.mlp_dim, kernel_init=into, name="gate")(x)
    up = dense(self.mlp_dim, kernel_init=into, name="up")(x)
    h = nn.with_logical_constraint(activation_fn(self.activation)(gate) * up,
                                   ("batch", "length", "mlp"))
    return dense(x.shape[-1], kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
                 name="down")(h)
