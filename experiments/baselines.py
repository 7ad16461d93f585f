"""Stock-flax baselines the benchmark measures mmjax against, at identical shapes.

`StockViT` is a ViT written only with `flax.linen` layers, the way a newcomer would write
it from the flax docs: `nn.Conv` patch embedding, class token, learned position
embeddings, pre-LayerNorm blocks of `nn.MultiHeadDotProductAttention` + a GELU MLP, a
final LayerNorm and a linear head on the class token. With the same width, depth, heads,
MLP size, patch size and classes it has exactly the parameter count of the mmjax ViT
(`tests/test_benchmark.py` checks that), so their step times compare like for like.

`ImageClassifier` wraps any image -> logits module in the model contract
(`mmjax.models.base`: a `loss(batch, train)` method), so both ViTs run through the same
mmjax train step (same optimizer, same loss, same jit) and only the network differs.
"""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax.models.base import Model

Array = jax.Array


class StockBlock(nn.Module):
  """Pre-LN encoder block from stock flax layers."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(y))
    return x + y


class StockViT(nn.Module):
  """A class-token ViT classifier from stock flax.linen layers; images [B, H, W, C] -> logits."""
  num_classes: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    del train  # no dropout: the benchmark compares compute, not regularisation
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embedding")(images)
    batch, h, w, width = x.shape
    x = x.reshape(batch, h * w, width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
    x = jnp.concatenate([jnp.tile(cls, (batch, 1, 1)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, width))
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = StockBlock(self.num_heads, self.mlp_dim, self.dtype, name=f"block_{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0])


class ImageClassifier(Model):
  """Softmax cross-entropy on batch['label'] over `encoder(batch['image'])` logits."""
  encoder: nn.Module

  def loss(self, batch: Dict[str, Array], train: bool = False) -> Tuple[Array, Dict[str, Array]]:
    logits = self.encoder(batch["image"], train=train).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"accuracy": accuracy}
