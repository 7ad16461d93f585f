"""Metrics: per-example values computed in the model, split-level summaries in numpy.

Per-example functions (jnp, used inside `evaluate`) return one value per row so the
trainer can drop padding rows before `summarize`; split-level functions (numpy, used in
`summarize`) see the whole evaluation split at once, which retrieval needs: recall@K
ranks every query against *all* candidates of the split, not of one batch.

Text-level metrics the papers print live in their own modules and are re-exported here:
`caption_scores` (COCO caption evaluation: BLEU, ROUGE-L, CIDEr-D, METEOR, SPICE) and
`vqa_accuracy` (the official VQAv2 accuracy).
"""
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import losses
from mmjax.metrics.captions import caption_scores  # noqa: F401  (re-exported)
from mmjax.metrics.vqa import vqa_accuracy  # noqa: F401  (re-exported)


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where argmax(logits) == label, per example (float32 [B])."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def token_statistics(logits: jax.Array, targets: jax.Array) -> Dict[str, jax.Array]:
  """Per-example sums for caption token accuracy and perplexity (targets 0 = padding).

  Returns {'nll_sum', 'correct_tokens', 'num_tokens'}, each [B]; `summarize_tokens`
  turns them into split-level token accuracy and perplexity.
  """
  nll_sum, num_tokens = losses.token_cross_entropy(logits, targets)
  hits = (jnp.argmax(logits, axis=-1) == targets) & (targets != 0)
  return {"nll_sum": nll_sum, "correct_tokens": jnp.sum(hits, axis=-1).astype(jnp.float32),
          "num_tokens": num_tokens}


def summarize_tokens(outputs: Dict[str, np.ndarray]) -> Dict[str, float]:
  """Token accuracy and perplexity over the whole split (token-weighted, not per row)."""
  count = max(float(np.sum(outputs["num_tokens"])), 1.0)
  return {"token_accuracy": float(np.sum(outputs["correct_tokens"]) / count),
          "perplexity": float(np.exp(np.sum(outputs["nll_sum"]) / count))}


def retrieval_ranks(queries: np.ndarray, candidates: np.ndarray,
                    chunk: int = 1024) -> np.ndarray:
  """Rank of the matching candidate (candidate i for query i) among all candidates.

  Rank 0 is best; rank = number of candidates scored strictly higher than the match.
  Computed in chunks of queries so a large split never builds the full N x N matrix.
  """
  queries, candidates = np.asarray(queries, np.float32), np.asarray(candidates, np.float32)
  if queries.ndim != 2 or queries.shape != candidates.shape:
    raise ValueError("Retrieval expects paired embeddings of equal shape [N, D]; got "
                     f"{queries.shape} and {candidates.shape}.")
  ranks = []
  for start in range(0, len(queries), chunk):
    sims = queries[start:start + chunk] @ candidates.T
    rows = np.arange(sims.shape[0])
    positive = sims[rows, start + rows]
    ranks.append(np.sum(sims > positive[:, None], axis=1))
  return np.concatenate(ranks) if ranks else np.zeros((0,), np.int64)


def retrieval_recall(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
  """Recall@K in both directions for paired embeddings (row i of each is one pair).

  Returns {'i2t_recall@K', 't2i_recall@K'} for every K: the fraction of images whose
  caption is among their K most similar captions, and vice versa.
  """
  i2t = retrieval_ranks(image_embeddings, text_embeddings)
  t2i = retrieval_ranks(text_embeddings, image_embeddings)
  out = {}
  for k in ks:
    out[f"i2t_recall@{k}"] = float(np.mean(i2t < k))
    out[f"t2i_recall@{k}"] = float(np.mean(t2i < k))
  return out
