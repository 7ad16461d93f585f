"""Task heads on top of encoders: pooling, modality combination, classifiers, projections,
retrieval and zero-shot scoring.

  masked_mean / pool      token sequences [B, N, D] (+ validity mask) -> one vector [B, D]
  Combine                 per-modality pooled vectors -> one vector ("concat", "sum", "gate")
  ClassifierHead          vector -> class logits (classification, VQA over answers, ITM)
  ContrastiveHead         learnable temperature (+ bias) and the CLIP / SigLIP loss
  l2_normalize            embeddings for contrastive losses and retrieval
  retrieval_scores        cosine similarity matrix between two sets of embeddings
  zero_shot_logits        image embeddings vs class embeddings averaged over text prompts

Parameter names: Combine has `gate` (Dense, gating only); ClassifierHead has `pre_logits`
(Dense, only with hidden_dim) and `head` (Dense, zero-initialised by default so training
starts from uniform predictions, as big_vision's head_zeroinit); ContrastiveHead has
`logit_scale` (log of the inverse temperature) and, for the sigmoid loss, `logit_bias`.
"""
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import losses, metrics, ring_loss

Array = jax.Array

COMBINE_METHODS = ("concat", "sum", "gate")
CONTRASTIVE_LOSSES = ("softmax", "sigmoid")
CONTRASTIVE_IMPLS = ("dense", "ring")
POOL_METHODS = ("mean", "first", "last")


def masked_mean(x: Array, mask: Optional[Array] = None) -> Array:
  """Mean over the valid tokens: x [B, N, D], mask bool [B, N] -> [B, D] (0 if none valid)."""
  if mask is None:
    return jnp.mean(x, axis=1)
  weights = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)


def pool(x: Array, mask: Optional[Array] = None, method: str = "mean") -> Array:
  """Pools [B, N, D] -> [B, D]: 'mean' over valid tokens, 'first' token, or 'last' valid token."""
  if method == "mean":
    return masked_mean(x, mask)
  if method == "first":
    return x[:, 0]
  if method == "last":
    last = (jnp.sum(mask, axis=1) - 1 if mask is not None
            else jnp.full((x.shape[0],), x.shape[1] - 1))
    return jnp.take_along_axis(x, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
  raise ValueError(f"Unknown pooling {method!r}; expected one of {POOL_METHODS}.")


class Combine(nn.Module):
  """Combines per-modality vectors [B, D] into one (the top of late fusion).

  "concat" -> [B, M * D]; "sum" -> [B, D]; "gate" -> [B, D], a convex combination whose
  weights a Dense layer computes from all modalities (a learned, input-dependent mix).
  """
  method: str = "concat"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, vectors: Sequence[Array]) -> Array:
    if not vectors:
      raise ValueError("Combine needs at least one modality vector; got none.")
    if self.method == "concat":
      return jnp.concatenate(vectors, axis=-1)
    if self.method == "sum":
      return sum(vectors)
    if self.method == "gate":
      stacked = jnp.stack(vectors, axis=1)                               # [B, M, D]
      logits = nn.Dense(len(vectors), dtype=self.dtype, name="gate")(
          jnp.concatenate(vectors, axis=-1))
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      return jnp.einsum("bm,bmd->bd", weights.astype(stacked.dtype), stacked)
    raise ValueError(f"Unknown combine method {self.method!r}; expected one of "
                     f"{COMBINE_METHODS}.")


class ClassifierHead(nn.Module):
  """[B, D] -> logits [B, num_classes] (float32), with an optional GELU hidden layer."""
  num_classes: int
  hidden_dim: int = 0
  zero_init: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.hidden_dim:
      x = nn.gelu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="pre_logits")(x))
    kernel_init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init,
                      name="head")(x)
    return logits.astype(jnp.float32)


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def retrieval_scores(queries: Array, candidates: Array) -> Array:
  """Cosine similarities [Nq, Nc] (row i scores query i against every candidate)."""
  return l2_normalize(queries) @ l2_normalize(candidates).T


def zero_shot_logits(image_embeddings: Array, class_embeddings: Array,
                     logit_scale: float = 100.0) -> Array:
  """Zero-shot classification: images [B, D] vs classes [C, D] or [C, prompts, D].

  Several prompts per class ("a photo of a {}", "a drawing of a {}") are averaged after
  normalisation and renormalised (CLIP's prompt ensembling). Returns logits [B, C].
  """
  classes = l2_normalize(class_embeddings)
  if classes.ndim == 3:
    classes = l2_normalize(jnp.mean(classes, axis=1))
  return logit_scale * l2_normalize(image_embeddings) @ classes.T


class ContrastiveHead(nn.Module):
  """Contrastive loss with a learnable temperature: "softmax" (CLIP) or "sigmoid" (SigLIP).

  Takes L2-normalised embeddings [N, D] of N matching pairs (row i of each is a pair);
  returns (loss, i2t_correct [N]: 1.0 where image i scores its own text highest). The
  logit scale starts at `scale_init` (None: CLIP's 1 / 0.07 for softmax, SigLIP's 10
  for sigmoid) and is capped at `max_scale` (CLIP's 100, as OpenAI's training clamps it; None: no cap, as big_vision's
  SigLIP) for stability; the SigLIP bias starts at `bias_init` = -10 so that the many
  negatives do not dominate early training. `impl` "dense" compares the gathered global
  batch at once; "ring" passes text blocks around the data-parallel devices and never
  holds more than [N / devices, N / devices] logits (mmjax/ring_loss.py); same values.
  """
  loss: str = "softmax"
  scale_init: Optional[float] = None
  bias_init: float = -10.0
  max_scale: Optional[float] = 100.0
  impl: str = "dense"

  @nn.compact
  def __call__(self, zimg: Array, ztxt: Array) -> Tuple[Array, Array]:
    if self.loss not in CONTRASTIVE_LOSSES:
      raise ValueError(f"Unknown contrastive loss {self.loss!r}; expected one of "
                       f"{CONTRASTIVE_LOSSES}.")
    if self.impl not in CONTRASTIVE_IMPLS:
      raise ValueError(f"Unknown contrastive_impl {self.impl!r}; expected one of "
                       f"{CONTRASTIVE_IMPLS}.")
    scale_init = self.scale_init or (1 / 0.07 if self.loss == "softmax" else 10.0)
    scale = self.param("logit_scale", nn.initializers.constant(math.log(scale_init)), ())
    if self.max_scale is not None:
      scale = jnp.minimum(scale, math.log(self.max_scale))
    bias = None
    if self.loss == "sigmoid":
      bias = self.param("logit_bias", nn.initializers.constant(self.bias_init), ())
    if self.impl == "ring":
      return ring_loss.ring_contrastive_loss(zimg, ztxt, scale, bias, kind=self.loss)
    if self.loss == "softmax":
      loss, logits = losses.clip_loss(zimg, ztxt, scale)
    else:
      loss, logits = losses.siglip_loss(zimg, ztxt, scale, bias)
    return loss, metrics.correct(logits, jnp.arange(logits.shape[0]))
