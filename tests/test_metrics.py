"""Retrieval recall, accuracy and token metrics against brute-force definitions."""
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import metrics


def test_retrieval_recall_matches_brute_force_both_directions():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(50, 8)).astype(np.float32)
  txt = img + rng.normal(size=(50, 8)).astype(np.float32) * 1.5
  got = metrics.retrieval_recall(img, txt)
  sims = img @ txt.T
  for k in (1, 5, 10):
    i2t = np.mean([i in np.argsort(-sims[i])[:k] for i in range(50)])
    t2i = np.mean([i in np.argsort(-sims[:, i])[:k] for i in range(50)])
    assert got[f"i2t_recall@{k}"] == pytest.approx(i2t)
    assert got[f"t2i_recall@{k}"] == pytest.approx(t2i)
  assert 0 < got["i2t_recall@1"] < got["i2t_recall@10"] <= 1


def test_retrieval_is_chunk_independent_and_perfect_for_identical_pairs():
  img = np.random.default_rng(1).normal(size=(30, 4))
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  np.testing.assert_array_equal(metrics.retrieval_ranks(img, img * 2, chunk=7),
                                metrics.retrieval_ranks(img, img * 2))
  assert metrics.retrieval_recall(img, img)["t2i_recall@1"] == 1.0
  with pytest.raises(ValueError, match="equal shape"):
    metrics.retrieval_recall(img, img[:5])


def test_token_statistics_and_summary():
  logits = jnp.asarray(np.log(np.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1, 1, 1]]])),
                       jnp.float32)
  targets = jnp.array([[0, 2, 0]])  # only the middle token is real
  stats = metrics.token_statistics(logits, targets)
  assert float(stats["num_tokens"][0]) == 1 and float(stats["correct_tokens"][0]) == 1
  summary = metrics.summarize_tokens({k: np.asarray(v) for k, v in stats.items()})
  assert summary["token_accuracy"] == 1.0
  assert summary["perplexity"] == pytest.approx(1 / 0.8, rel=1e-5)


def test_correct():
  np.testing.assert_array_equal(
      metrics.correct(jnp.array([[0.1, 0.9], [0.8, 0.2]]), jnp.array([1, 1])), [1.0, 0.0])
