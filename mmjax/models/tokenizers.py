"""Modality tokenizers: raw batch arrays -> tokens of one shared width, plus a validity mask.

Every tokenizer returns (tokens [B, N, width], mask bool [B, N]) and adds
  * its own position embedding (`pos_embedding`, learned, [1, N, width]), and
  * a learned modality-type embedding (`type_embedding`, [width]) so that a joint
    encoder can tell the modalities apart after concatenation.

  TextTokenizer     token ids [B, L] (+ mask)        -> L tokens, mask = the given one,
                                                        else ids != pad_id (0 by default)
  ImageTokenizer    image [B, H, W, C]               -> (H/p)(W/p) patch tokens (ViT)
  VideoTokenizer    video [B, T, H, W, C]            -> tubelet tokens (ViViT)
  AudioTokenizer    waveform [B, S]                  -> log-mel spectrogram patches (AST)
  SensorTokenizer   series [B, T, C]                 -> one token per window of `window` steps

Image and audio position embeddings are stored on their patch grid ([1, rows, columns, D];
`grid(input shape)` gives it) and resampled (`mmjax.nn.embed.resample_posemb`) when the
input's grid differs from the one seen at initialisation, so a model trained at 32x32
evaluates at 48x48.
Bad input raises ValueError naming the expected shape or range. Token-id range checks
run when the ids are concrete (eager calls, e.g. the first batch); under `jit` values are
unknown at trace time and the data pipeline's tokenizer owns the range.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn import embed
from mmjax.nn.spectrogram import log_mel_spectrogram

Array = jax.Array


def check_token_ids(tokens: Array, vocab_size: int, name: str = "text") -> None:
  """Raises ValueError for a non-integer / non-2-D array or ids outside [0, vocab_size)."""
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name!r} must be integer token ids [batch, length]; got "
                     f"{tokens.dtype}{tuple(tokens.shape)}.")
  if isinstance(tokens, jax.core.Tracer):
    return
  ids = np.asarray(tokens)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"{name!r} token ids must be in [0, vocab_size={vocab_size}); got ids "
                     f"in [{ids.min()}, {ids.max()}].")


class _Embeddings(nn.Module):
  """Adds the learned position embedding and the modality-type embedding to [B, N, D].

  With a patch `grid` (images, audio) the position embedding is stored as [1, gh, gw, D]
  and resampled when the grid differs from the one seen at initialisation;
  otherwise it is [1, N, D] and the length must stay the same.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, grid: Optional[Tuple[int, int]] = None) -> Array:
    width = x.shape[-1]
    shape = (1,) + (tuple(grid) if grid else x.shape[1:2]) + (width,)
    axes = (None,) * (len(shape) - 1) + ("embed",)
    if self.has_variable("params", "pos_embedding") and not self.is_initializing():
      # Read as stored: its grid may differ from this input's (resampled below).
      posemb = nn.meta.unbox(self.get_variable("params", "pos_embedding"))
    else:
      posemb = self.param("pos_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), axes), shape)
    if grid and posemb.shape[1:3] != tuple(grid):
      posemb = embed.resample_posemb(posemb.reshape(1, -1, width), posemb.shape[1:3], grid)
    elif not grid and posemb.shape[1] != x.shape[1]:
      raise ValueError(f"This tokenizer was initialised for {posemb.shape[1]} tokens; got "
                       f"{x.shape[1]}. Keep the input length of this modality fixed.")
    type_embedding = self.param("type_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("embed",)), (width,))
    x = x + posemb.reshape(1, -1, width).astype(x.dtype) + type_embedding.astype(x.dtype)
    return nn.with_logical_constraint(x.astype(self.dtype), ("batch", "length", "embed"))


class TextTokenizer(nn.Module):
  """Token ids [B, L] -> embeddings; `shared_embedding` lets text modalities share a table."""
  vocab_size: int
  width: int
  max_len: int
  shared_embedding: Optional[nn.Module] = None
  type_embedding: bool = True         # False for a text-only tower (nothing to tell apart)
  dtype: Any = jnp.float32
  name_in_batch: str = "text"
  # Padding id when no mask is given; None: every position is real (CLIP's text tower,
  # whose causal attention and end-token pooling never look at padding after the end).
  pad_id: Optional[int] = 0

  @nn.compact
  def __call__(self, tokens: Array, mask: Optional[Array] = None) -> Tuple[Array, Array]:
    check_token_ids(tokens, self.vocab_size, self.name_in_batch)
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"{self.name_in_batch!r} has {tokens.shape[1]} tokens; at most "
                       f"max_len={self.max_len} are supported.")
    table = self.shared_embedding or embed.TokenEmbed(self.vocab_size, self.width, name="embedding")
    x = table(tokens.astype(jnp.int32))
    posemb = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, "length", "embed")), (1, self.max_len, self.width))
    x = x + posemb[:, :tokens.shape[1]]
    if self.type_embedding:
      x = x + self.param("type_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed",)), (self.width,))
    x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", "length", "embed"))
    if mask is not None:
      if mask.shape != tokens.shape:
        raise ValueError(f"{self.name_in_batch + '_mask'!r} must have the shape of the ids "
                         f"{tokens.shape}; got {mask.shape}.")
      return x, mask.astype(bool)
    if self.pad_id is None:
      return x, jnp.ones(tokens.shape, bool)
    return x, tokens != self.pad_id


class ImageTokenizer(nn.Module):
  """Images [B, H, W, C] -> ViT patch tokens (parameter `patch_embed` from nn.embed)."""
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Tuple[Array, Array]:
    if images.ndim != 4:
      raise ValueError(f"'image' must be [batch, height, width, channels]; got shape "
                       f"{images.shape}.")
    x = embed.PatchEmbed(self.patch_size, self.width, dtype=self.dtype,
                         name="patch_embed")(images)
    x = _Embeddings(self.dtype, name="embeddings")(x, self.grid(images.shape))
    return x, jnp.ones(x.shape[:2], bool)

  def grid(self, image_shape: Sequence[int]) -> Tuple[int, int]:
    """The patch grid of images [B, H, W, C]: its position table's shape [1, *grid, D]."""
    return image_shape[1] // self.patch_size, image_shape[2] // self.patch_size


class VideoTokenizer(nn.Module):
  """Videos [B, T, H, W, C] -> tubelet tokens (parameter `tubelet_embed`)."""
  patch_size: Sequence[int]  # (time, height, width)
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, video: Array) -> Tuple[Array, Array]:
    if video.ndim != 5:
      raise ValueError(f"'video' must be [batch, time, height, width, channels]; got shape "
                       f"{video.shape}.")
    x = embed.TubeletEmbed(tuple(self.patch_size), self.width, dtype=self.dtype,
                           name="tubelet_embed")(video)
    x = _Embeddings(self.dtype, name="embeddings")(x)
    return x, jnp.ones(x.shape[:2], bool)


class AudioTokenizer(nn.Module):
  """Waveforms [B, S] -> log-mel spectrogram [B, frames, mels] -> patches (AST / MBT).

  The spectrogram is standardised per example (zero mean, unit variance), which makes
  the patch embedding independent of loudness and recording gain.
  """
  patch_size: int
  width: int
  sample_rate: int = 16000
  frame_length: int = 400
  hop_length: int = 160
  num_mel_bins: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, waveform: Array) -> Tuple[Array, Array]:
    if waveform.ndim != 2:
      raise ValueError(f"'audio' must be a waveform [batch, samples]; got shape "
                       f"{waveform.shape}.")
    spec = log_mel_spectrogram(waveform, sample_rate=self.sample_rate,
                               frame_length=self.frame_length, hop_length=self.hop_length,
                               num_mel_bins=self.num_mel_bins)
    if spec.shape[1] < self.patch_size or spec.shape[2] < self.patch_size:
      raise ValueError(f"The audio spectrogram [frames={spec.shape[1]}, mels={spec.shape[2]}] "
                       f"is smaller than one {self.patch_size}x{self.patch_size} patch; use "
                       "longer audio or a smaller patch_size / hop_length.")
    if self.num_mel_bins % self.patch_size:
      raise ValueError(f"num_mel_bins={self.num_mel_bins} must be a multiple of "
                       f"patch_size={self.patch_size}.")
    grid = self.grid(waveform.shape)
    frames = grid[0] * self.patch_size  # drop the ragged tail
    spec = spec[:, :frames]
    mean = jnp.mean(spec, axis=(1, 2), keepdims=True)
    std = jnp.std(spec, axis=(1, 2), keepdims=True)
    spec = ((spec - mean) / (std + 1e-5))[..., None]
    x = embed.PatchEmbed(self.patch_size, self.width, dtype=self.dtype,
                         name="patch_embed")(spec)
    x = _Embeddings(self.dtype, name="embeddings")(x, grid)
    return x, jnp.ones(x.shape[:2], bool)

  def grid(self, waveform_shape: Sequence[int]) -> Tuple[int, int]:
    """The (time, mel) patch grid of waveforms [B, S]: its position table's shape [1, *grid, D]."""
    frames = 1 + (waveform_shape[1] - self.frame_length) // self.hop_length
    return frames // self.patch_size, self.num_mel_bins // self.patch_size


class SensorTokenizer(nn.Module):
  """Time series [B, T, C] -> one token per window of `window` steps (a linear projection)."""
  window: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, series: Array) -> Tuple[Array, Array]:
    if series.ndim != 3:
      raise ValueError(f"'sensor' must be [batch, time, channels]; got shape {series.shape}.")
    batch, steps, channels = series.shape
    if steps % self.window:
      raise ValueError(f"'sensor' length {steps} must be a multiple of the window "
                       f"{self.window}.")
    windows = series.reshape(batch, steps // self.window, self.window * channels)
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("patch", "embed"))
    x = nn.Dense(self.width, dtype=self.dtype, name="proj", kernel_init=kernel_init)(windows)
    x = _Embeddings(self.dtype, name="embeddings")(x)
    return x, jnp.ones(x.shape[:2], bool)
