"""Rotary position embeddings (RoPE, Su et al. 2021), as Gemma and Llama apply them.

Each head vector [head_dim] is split into two halves (x1, x2) that rotate together by
the angle position * base^(-2i / head_dim):

    rope(x) = concat(x1 cos - x2 sin, x2 cos + x1 sin)

This is the "rotate half" layout of Hugging Face transformers and big_vision's Gemma
(not the interleaved pairs of the original paper), so imported weights need no
permutation. Positions are explicit per token, so padding inside a sequence does not
consume positions and a decoding step knows where it is.
"""
import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """x [batch, length, heads, head_dim] rotated by `positions` [batch, length]."""
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"apply_rope needs an even head_dim; given {head_dim}.")
  if positions.shape != x.shape[:2]:
    raise ValueError(f"apply_rope: positions must be [batch, length] = {x.shape[:2]}; given "
                     f"{positions.shape}.")
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq        # [B, L, head_dim / 2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
