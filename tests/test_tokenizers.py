"""Modality tokenizers and the JAX log-mel spectrogram."""
import flax.linen as nn
import jax
from flax import traverse_util
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import tokenizers
from mmjax.nn import spectrogram


def _np_log_mel(wave, sr, frame, hop, fft, mels):
  """Reference: explicit framing loop, numpy rfft, the same mel filters."""
  n = 1 + (len(wave) - frame) // hop
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame)
  power = np.stack([np.abs(np.fft.rfft(wave[i * hop:i * hop + frame] * window, n=fft)) ** 2
                    for i in range(n)])
  return np.log(power @ spectrogram.mel_filterbank(mels, fft // 2 + 1, sr) + 1e-6)


def test_log_mel_spectrogram_matches_numpy_and_finds_the_tone():
  sr = 8000
  t = np.arange(4000) / sr
  wave = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 2000 * t)]).astype(np.float32)
  got = spectrogram.log_mel_spectrogram(jnp.asarray(wave), sample_rate=sr, frame_length=200,
                                        hop_length=80, num_mel_bins=24)
  assert got.shape == (2, 1 + (4000 - 200) // 80, 24)
  want = _np_log_mel(wave[0].astype(np.float64), sr, 200, 80, 256, 24)
  np.testing.assert_allclose(got[0], want, atol=2e-3, rtol=1e-3)
  # The higher tone lights up a higher mel bin.
  assert int(jnp.argmax(got[1].mean(0))) > int(jnp.argmax(got[0].mean(0)))
  with pytest.raises(ValueError, match="shorter than one frame"):
    spectrogram.log_mel_spectrogram(jnp.zeros((1, 100)), frame_length=400)


def test_mel_filterbank_is_triangular_and_covers_the_range():
  fb = spectrogram.mel_filterbank(16, 129, 16000)
  assert fb.shape == (129, 16) and fb.min() >= 0 and fb.max() <= 1
  assert np.all(fb.sum(0) > 0)  # every filter sees some spectrum bin
  with pytest.raises(ValueError, match="upper_hz"):
    spectrogram.mel_filterbank(16, 129, 16000, upper_hz=9000)


def _apply(module, x):
  variables = jax.jit(module.init)(jax.random.key(0), x)
  return jax.jit(module.apply)(variables, x), variables


def test_every_tokenizer_gives_tokens_of_the_shared_width_with_type_embeddings():
  width = 16
  cases = [
      (tokenizers.TextTokenizer(50, width, max_len=8), jnp.array([[5, 6, 0, 0]]), 4),
      (tokenizers.ImageTokenizer(4, width), jnp.zeros((1, 16, 12, 3)), 12),
      (tokenizers.VideoTokenizer((2, 4, 4), width), jnp.zeros((1, 4, 8, 8, 3)), 8),
      (tokenizers.AudioTokenizer(4, width, num_mel_bins=16), jnp.ones((1, 4000)), 5 * 4),
      (tokenizers.SensorTokenizer(4, width), jnp.zeros((1, 12, 3)), 3),
  ]
  for module, x, n in cases:
    (tokens, mask), variables = _apply(module, x)
    assert tokens.shape == (1, n, width), type(module).__name__
    assert mask.shape == (1, n) and mask.dtype == jnp.bool_
    names = traverse_util.flatten_dict(nn.meta.unbox(variables["params"]), sep="/")
    assert any(name.endswith("type_embedding") for name in names), names.keys()
    if isinstance(module, tokenizers.TextTokenizer):
      np.testing.assert_array_equal(mask, [[True, True, False, False]])


def test_image_position_embedding_is_resampled_for_a_new_image_size():
  module = tokenizers.ImageTokenizer(8, 16)
  variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  posemb = nn.meta.unbox(variables)["params"]["embeddings"]["pos_embedding"]
  assert posemb.shape == (1, 4, 4, 16)
  tokens, _ = jax.jit(module.apply)(variables, jnp.zeros((2, 48, 40, 3)))
  assert tokens.shape == (2, 30, 16)


def test_bad_inputs_raise_naming_what_was_expected():
  text = tokenizers.TextTokenizer(10, 8, max_len=4)
  variables = text.init(jax.random.key(0), jnp.array([[1, 2]]))
  with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=10\)"):
    text.apply(variables, jnp.array([[1, 12]]))
  with pytest.raises(ValueError, match="at most max_len=4"):
    text.apply(variables, jnp.ones((1, 6), jnp.int32))
  with pytest.raises(ValueError, match="integer token ids"):
    text.apply(variables, jnp.ones((1, 2), jnp.float32))
  sensor = tokenizers.SensorTokenizer(4, 8)
  with pytest.raises(ValueError, match="multiple of the window 4"):
    sensor.init(jax.random.key(0), jnp.zeros((1, 10, 2)))
  with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
    tokenizers.ImageTokenizer(4, 8).init(jax.random.key(0), jnp.zeros((8, 8, 3)))
