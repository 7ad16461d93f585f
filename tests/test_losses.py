"""Losses equal plain NumPy definitions; contrastive losses see the global batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import losses


def _embeddings(n=16, d=8, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(2, n, d)).astype(np.float32)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _np_clip(zimg, ztxt, scale):
  logits = zimg @ ztxt.T * np.exp(scale)
  idx = np.arange(len(zimg))
  i2t = -_np_log_softmax(logits, 1)[idx, idx].mean()
  t2i = -_np_log_softmax(logits, 0)[idx, idx].mean()
  return (i2t + t2i) / 2


def _np_siglip(zimg, ztxt, scale, bias):
  logits = zimg @ ztxt.T * np.exp(scale) + bias
  z = 2 * np.eye(len(zimg)) - 1
  return np.sum(np.log1p(np.exp(-z * logits))) / len(zimg)


def test_clip_loss_equals_numpy():
  zimg, ztxt = _embeddings()
  loss, logits = losses.clip_loss(jnp.asarray(zimg), jnp.asarray(ztxt), jnp.float32(2.3))
  np.testing.assert_allclose(loss, _np_clip(zimg, ztxt, 2.3), rtol=1e-5)
  assert logits.shape == (16, 16)


def test_siglip_loss_equals_numpy():
  zimg, ztxt = _embeddings()
  loss, _ = losses.siglip_loss(jnp.asarray(zimg), jnp.asarray(ztxt), jnp.float32(2.3),
                               jnp.float32(-10.0))
  np.testing.assert_allclose(loss, _np_siglip(zimg, ztxt, 2.3, -10.0), rtol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_contrastive_loss_sharded_over_8_devices_equals_single_device(kind):
  assert jax.device_count() == 8
  zimg, ztxt = _embeddings(n=32)
  fn = {"softmax": lambda a, b: losses.clip_loss(a, b, jnp.float32(2.0))[0],
        "sigmoid": lambda a, b: losses.siglip_loss(a, b, jnp.float32(2.0),
                                                   jnp.float32(-5.0))[0]}[kind]
  single = jax.jit(fn)(jnp.asarray(zimg), jnp.asarray(ztxt))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  a, b = jax.device_put(zimg, sharding), jax.device_put(ztxt, sharding)
  assert len(a.addressable_shards) == 8 and a.addressable_shards[0].data.shape == (4, 8)
  sharded = jax.jit(fn)(a, b)
  np.testing.assert_allclose(sharded, single, rtol=1e-6)
  # The per-device loss (each device only seeing its 4 pairs) is a different number.
  local = np.mean([fn(jnp.asarray(zimg[i:i + 4]), jnp.asarray(ztxt[i:i + 4]))
                   for i in range(0, 32, 4)])
  assert abs(local - float(single)) > 1e-3


def test_cross_entropy_and_weighted_mean():
  logits = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  labels = np.array([0, 6, 3, 3, 1])
  want = -_np_log_softmax(logits, 1)[np.arange(5), labels]
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                             want, rtol=1e-5)
  w = np.array([1, 0, 1, 0, 0], np.float32)
  np.testing.assert_allclose(losses.weighted_mean(jnp.asarray(want), jnp.asarray(w)),
                             (want[0] + want[2]) / 2, rtol=1e-5)
  with pytest.raises(ValueError, match="labels of shape"):
    losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels[:3]))


def test_token_cross_entropy_ignores_padding():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 6)), jnp.float32)
  targets = jnp.array([[1, 2, 0, 0], [3, 0, 0, 0]])
  nll_sum, count = losses.token_cross_entropy(logits, targets)
  np.testing.assert_array_equal(count, [2, 1])
  ce = losses.cross_entropy(logits, targets)
  np.testing.assert_allclose(nll_sum, [ce[0, 0] + ce[0, 1], ce[1, 0]], rtol=1e-6)


def test_mask_tokens_chooses_only_real_tokens_at_the_rate():
  tokens = jnp.asarray(np.random.default_rng(2).integers(1, 50, (64, 32)), jnp.int32)
  tokens = tokens.at[:, 24:].set(0)
  corrupted, targets = losses.mask_tokens(jax.random.key(0), tokens, mask_id=99, vocab_size=50)
  chosen = np.asarray(targets != 0)
  assert not chosen[:, 24:].any() and np.all(np.asarray(corrupted)[:, 24:] == 0)
  assert 0.12 < chosen[:, :24].mean() < 0.18
  np.testing.assert_array_equal(np.asarray(targets)[chosen], np.asarray(tokens)[chosen])
  masked = np.asarray(corrupted)[chosen] == 99
  assert 0.7 < masked.mean() < 0.9
  np.testing.assert_array_equal(np.asarray(corrupted)[~chosen], np.asarray(tokens)[~chosen])


def test_hard_negatives_never_pick_the_positive():
  sim = jnp.asarray(np.random.default_rng(3).normal(size=(6, 6)), jnp.float32) + 5 * jnp.eye(6)
  for rng in (None, jax.random.key(1)):
    neg_txt, neg_img = losses.hard_negatives(sim, rng)
    assert np.all(np.asarray(neg_txt) != np.arange(6))
    assert np.all(np.asarray(neg_img) != np.arange(6))
  neg_txt, _ = losses.hard_negatives(sim)
  off = np.where(np.eye(6, dtype=bool), -np.inf, np.asarray(sim))
  np.testing.assert_array_equal(neg_txt, off.argmax(1))  # the hardest wrong text
  with pytest.raises(ValueError, match="at least 2"):
    losses.hard_negatives(jnp.ones((1, 1)))
