"""Log-mel spectrogram in JAX, so audio models read raw waveforms (batch key `audio`).

waveform [B, S] -> frames of `frame_length` samples every `hop_length` samples -> periodic
Hann window -> |rFFT|^2 -> triangular mel filters (HTK mel scale) -> log(x + eps)
-> [B, num_frames, num_mel_bins], with num_frames = 1 + (S - frame_length) // hop_length.

The defaults are the AST / MBT front end (16 kHz, 25 ms windows, 10 ms hop); the audio
tokenizer then treats [num_frames, num_mel_bins] as a one-channel image.
Everything is a fixed linear map plus elementwise ops: jit-able, differentiable, and
cheap next to the transformer.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def hz_to_mel(hz):
  return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)


def mel_filterbank(num_mel_bins: int, num_spectrum_bins: int, sample_rate: float,
                   lower_hz: float = 20.0, upper_hz: Optional[float] = None) -> np.ndarray:
  """Triangular mel filters, [num_spectrum_bins, num_mel_bins] (float32, numpy).

  Filter m rises linearly from mel edge m to m+1 and falls to m+2, with
  num_mel_bins + 2 edges spaced evenly in mel between lower_hz and upper_hz.
  """
  upper_hz = sample_rate / 2.0 if upper_hz is None else upper_hz
  if not 0.0 <= lower_hz < upper_hz <= sample_rate / 2.0:
    raise ValueError(f"mel_filterbank expects 0 <= lower_hz < upper_hz <= sample_rate / 2 "
                     f"= {sample_rate / 2}; got lower_hz={lower_hz}, upper_hz={upper_hz}.")
  spectrum_mel = hz_to_mel(np.linspace(0.0, sample_rate / 2.0, num_spectrum_bins))
  edges = np.linspace(hz_to_mel(lower_hz), hz_to_mel(upper_hz), num_mel_bins + 2)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (spectrum_mel[:, None] - lower) / (center - lower)
  falling = (upper - spectrum_mel[:, None]) / (upper - center)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def log_mel_spectrogram(waveform: jax.Array, *, sample_rate: int = 16000,
                        frame_length: int = 400, hop_length: int = 160,
                        fft_length: Optional[int] = None, num_mel_bins: int = 64,
                        lower_hz: float = 20.0, upper_hz: Optional[float] = None,
                        eps: float = 1e-6) -> jax.Array:
  """Log-mel spectrogram of mono waveforms [B, S] -> [B, num_frames, num_mel_bins] float32."""
  if waveform.ndim != 2:
    raise ValueError(f"log_mel_spectrogram expects a waveform [batch, samples]; got shape "
                     f"{waveform.shape}.")
  num_samples = waveform.shape[1]
  if num_samples < frame_length:
    raise ValueError(f"Audio of {num_samples} samples is shorter than one frame "
                     f"(frame_length={frame_length}).")
  fft_length = fft_length or int(2 ** np.ceil(np.log2(frame_length)))
  num_frames = 1 + (num_samples - frame_length) // hop_length
  index = np.arange(num_frames)[:, None] * hop_length + np.arange(frame_length)[None, :]
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame_length) / frame_length)
  frames = waveform.astype(jnp.float32)[:, index] * window.astype(np.float32)
  power = jnp.abs(jnp.fft.rfft(frames, n=fft_length, axis=-1)) ** 2
  filters = mel_filterbank(num_mel_bins, fft_length // 2 + 1, sample_rate, lower_hz, upper_hz)
  return jnp.log(power @ filters + eps)
