"""Losses shared by the models: classification, contrastive, token-level and matching.

Every function takes logits / embeddings in any dtype and computes in float32 (softmax
and log-sigmoid in low precision lose the small probabilities that carry the gradient).

Contrastive losses and the global batch: inside `jax.jit` a sharded input *is* the
global array, so `clip_loss(zimg, ztxt, ...)` on a batch sharded over 8 devices compares
every image with every text of the global batch; XLA inserts the all-gather. There is
nothing to gather by hand (tests/test_losses.py checks 8 devices == 1 device).

  cross_entropy         per-example softmax cross-entropy with integer labels
  weighted_mean         mean over the entries with non-zero weight (padding excluded)
  clip_loss             CLIP: symmetric softmax cross-entropy over the similarity matrix
  siglip_loss           SigLIP: independent sigmoid per image-text pair
  token_cross_entropy   language-model loss over non-padding tokens
  per_example_keys      one rng key per example, so draws do not depend on batch splits
  mask_tokens           BERT masking (80% [MASK], 10% random, 10% kept) for MLM
  hard_negatives        ITM negatives sampled from the contrastive similarities

The ring versions of the contrastive losses (same values, no [N, N] matrix) are in
mmjax/ring_loss.py.
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Softmax cross-entropy per example: logits [..., C], integer labels [...] -> [...]."""
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"cross_entropy expects labels of shape {logits.shape[:-1]} for logits "
                     f"{logits.shape}; got labels {labels.shape}.")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def weighted_mean(values: Array, weights: Optional[Array] = None) -> Array:
  """Mean of `values` weighted by `weights` (e.g. a padding mask); 0 when all weights are 0."""
  values = values.astype(jnp.float32)
  if weights is None:
    return jnp.mean(values)
  weights = jnp.broadcast_to(weights.astype(jnp.float32), values.shape)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _similarities(zimg: Array, ztxt: Array) -> Array:
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError("Contrastive losses expect image and text embeddings of the same shape "
                     f"[batch, dim]; got {zimg.shape} and {ztxt.shape}.")
  return jnp.einsum("id,jd->ij", zimg.astype(jnp.float32), ztxt.astype(jnp.float32))


def clip_loss(zimg: Array, ztxt: Array, logit_scale: Array) -> Tuple[Array, Array]:
  """CLIP loss on L2-normalised embeddings [N, D]; `logit_scale` is log(1 / temperature).

  Returns (loss, logits [N, N]); row i of the logits scores image i against every text.
  """
  logits = _similarities(zimg, ztxt) * jnp.exp(logit_scale.astype(jnp.float32))
  labels = jnp.arange(logits.shape[0])
  loss = 0.5 * (jnp.mean(cross_entropy(logits, labels)) + jnp.mean(cross_entropy(logits.T, labels)))
  return loss, logits


def siglip_loss(zimg: Array, ztxt: Array, logit_scale: Array,
                logit_bias: Array) -> Tuple[Array, Array]:
  """SigLIP loss: -mean_i sum_j log sigmoid(z_ij * (t <img_i, txt_j> + b)), z = +1 iff i == j."""
  logits = (_similarities(zimg, ztxt) * jnp.exp(logit_scale.astype(jnp.float32))
            + logit_bias.astype(jnp.float32))
  signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
  return loss, logits


def token_cross_entropy(logits: Array, targets: Array) -> Tuple[Array, Array]:
  """Per-example summed cross-entropy and token count over non-padding (id != 0) targets.

  logits [B, L, V], targets [B, L] -> (nll_sum [B], num_tokens [B]); the loss is
  `sum(nll_sum) / sum(num_tokens)`, perplexity `exp` of it.
  """
  weights = (targets != 0).astype(jnp.float32)
  nll = cross_entropy(logits, targets) * weights
  return jnp.sum(nll, axis=-1), jnp.sum(weights, axis=-1)


def per_example_keys(rng: Array, example_ids: Array) -> Array:
  """One key per example, `fold_in(rng, id)`: draws that follow the example, not its row."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_ids)


def mask_tokens(rng: Array, tokens: Array, *, mask_id: int, vocab_size: int,
                rate: float = 0.15, example_ids: Optional[Array] = None) -> Tuple[Array, Array]:
  """BERT corruption: choose `rate` of the non-padding tokens; of those 80% -> mask_id,
  10% -> a random token, 10% unchanged. Returns (corrupted tokens, targets) where targets
  are the original ids at chosen positions and 0 (ignored) elsewhere.

  With `example_ids` [B], row b's draws come from `fold_in(rng, example_ids[b])` alone, so
  an example's mask does not depend on the other rows of its batch (or how it is split).
  """
  if example_ids is not None:
    mask_row = lambda key, row: mask_tokens(key, row[None], mask_id=mask_id,
                                            vocab_size=vocab_size, rate=rate)
    corrupted, targets = jax.vmap(mask_row)(per_example_keys(rng, example_ids), tokens)
    return corrupted[:, 0], targets[:, 0]
  k_choose, k_kind, k_random = jax.random.split(rng, 3)
  chosen = (jax.random.uniform(k_choose, tokens.shape) < rate) & (tokens != 0)
  kind = jax.random.uniform(k_kind, tokens.shape)
  random_ids = jax.random.randint(k_random, tokens.shape, 1, vocab_size, dtype=tokens.dtype)
  corrupted = jnp.where(chosen & (kind < 0.8), mask_id, tokens)
  corrupted = jnp.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, corrupted)
  return corrupted, jnp.where(chosen, tokens, 0)


def hard_negatives(similarities: Array, rng: Optional[Array] = None, *,
                   example_ids: Optional[Array] = None,
                   candidates: Optional[Array] = None) -> Tuple[Array, Array]:
  """Hard negatives for image-text matching (as in ALBEF), from a similarity matrix [N, N].

  For every image, a text index j != i drawn with probability softmax(similarities[i])
  (the most similar wrong text when `rng` is None, i.e. at evaluation); likewise for
  every text an image. Returns (negative text per image [N], negative image per text [N]).
  With `example_ids` [N] each row draws with its own key (`per_example_keys`), so a draw
  depends on the similarities, not on the row's position; `candidates` (bool [N], e.g.
  the eval batch's `valid`) excludes rows from being anyone's negative.
  """
  n = similarities.shape[0]
  if n < 2:
    raise ValueError(f"Hard negatives need a batch of at least 2 pairs; got {n}.")
  sim = jax.lax.stop_gradient(similarities.astype(jnp.float32))
  sim = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, sim)
  if candidates is not None:
    allowed = jnp.asarray(candidates, bool)
    sim = jnp.where(allowed[None, :] & allowed[:, None], sim, -jnp.inf)
  if rng is None:
    return jnp.argmax(sim, axis=1), jnp.argmax(sim, axis=0)
  k_txt, k_img = jax.random.split(rng)
  if example_ids is None:
    return (jax.random.categorical(k_txt, sim, axis=1),
            jax.random.categorical(k_img, sim, axis=0))
  draw = jax.vmap(jax.random.categorical)
  return (draw(per_example_keys(k_txt, example_ids), sim),
          draw(per_example_keys(k_img, example_ids), sim.T))
