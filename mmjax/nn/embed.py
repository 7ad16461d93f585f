"""Token tables, tokenizers for images and video, and position embeddings.

  TokenEmbed      ids [B, L]      -> [B, L, D]; `attend` gives logits over the vocabulary

  PatchEmbed      [B, H, W, C]    -> [B, (H/ph)(W/pw), D]    non-overlapping patches
  TubeletEmbed    [B, T, H, W, C] -> [B, (T/pt)(H/ph)(W/pw), D]   space-time tubelets
  posemb_sincos_2d / posemb_sincos_1d   fixed sin-cos position embeddings [1, N, D]
  learned_posemb                        a learned [1, N, D] parameter
  PositionGrid                          how a learned table is laid out (prefix, h, w)
  resample_posemb                       a learned embedding moved to a new patch grid

Both patch embeddings are a strided convolution written as reshape + einsum (identical
maths, and the kernel layout [*patch, channels, width] is the conv layout big_vision /
scenic checkpoints use, so they load unchanged). Parameter names: `kernel`, `bias`.
"""
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
from flax.linen import dtypes
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Grid = Union[int, Sequence[int]]


VOCAB_MULTIPLE = 128
# Logit of the padding rows of a token table: exp() of it is exactly 0 in float32.
_PAD_LOGIT = -1e30


def padded_vocab_size(vocab_size: int) -> int:
  """Rows of a token table: `vocab_size` rounded up to a multiple of VOCAB_MULTIPLE."""
  return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class TokenEmbed(nn.Module):
  """A token table [padded vocab, D] (parameter `embedding`, logical axes vocab, embed).

  The rows are padded to a multiple of 128, as MaxText does, so the vocabulary axis
  shards over any tensor-parallel size; ids are checked to be < `vocab_size`, and
  `attend` gives the padding rows a logit of -1e30, so no loss, softmax or argmax ever
  sees them. Importers append zero rows to a table of `vocab_size` rows; exporters cut them.
  """
  vocab_size: int
  features: int
  embedding_init: Callable = nn.initializers.normal(0.02)
  dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (padded_vocab_size(self.vocab_size), self.features), jnp.float32)

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """x [..., D] -> float32 logits [..., padded vocab], padding columns at -1e30."""
    logits = jnp.dot(x.astype(self.dtype), self.embedding.T.astype(self.dtype),
                     preferred_element_type=jnp.float32)
    real = jnp.arange(logits.shape[-1]) < self.vocab_size
    return jnp.where(real, logits, _PAD_LOGIT)


def _as_tuple(name: str, value: Grid, rank: int) -> Tuple[int, ...]:
  value = (value,) * rank if isinstance(value, int) else tuple(value)
  if len(value) != rank or any(int(v) <= 0 for v in value):
    raise ValueError(f"{name} must be a positive int or {rank} positive ints; given {value}.")
  return tuple(int(v) for v in value)


def _embed_patches(module: nn.Module, x: Array, patch: Tuple[int, ...], what: str) -> Array:
  """Shared by Patch/TubeletEmbed: x [B, *spatial, C] -> [B, N, width] by patch einsum."""
  spatial = x.shape[1:-1]
  if x.ndim != len(patch) + 2:
    raise ValueError(f"{what} expects rank {len(patch) + 2} inputs [batch, "
                     f"{', '.join(['t', 'h', 'w'][-len(patch):])}, channels]; given shape "
                     f"{x.shape}.")
  if any(s % p for s, p in zip(spatial, patch)):
    raise ValueError(f"{what}: input size {spatial} must be divisible by the patch size "
                     f"{patch}; given shape {x.shape}.")
  channels = x.shape[-1]
  kernel = module.param(
      "kernel",
      nn.with_logical_partitioning(module.kernel_init, (None,) * (len(patch) + 1) + ("embed",)),
      patch + (channels, module.width), module.param_dtype)
  grid = tuple(s // p for s, p in zip(spatial, patch))
  # [B, g0, p0, g1, p1, ..., C] -> [B, g0, g1, ..., p0, p1, ..., C]
  x = x.reshape((x.shape[0],) + sum(((g, p) for g, p in zip(grid, patch)), ()) + (channels,))
  rank = len(patch)
  x = x.transpose((0,) + tuple(range(1, 2 * rank, 2)) + tuple(range(2, 2 * rank + 1, 2))
                  + (2 * rank + 1,))
  x = x.reshape((x.shape[0], int(np.prod(grid)), int(np.prod(patch)) * channels))
  x, kernel = dtypes.promote_dtype(x, kernel, dtype=module.dtype)
  x = x @ kernel.reshape(-1, module.width)
  if module.use_bias:
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (module.width,), module.param_dtype)
    x = x + bias.astype(x.dtype)
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class PatchEmbed(nn.Module):
  """Images [B, H, W, C] -> patch tokens [B, (H/ph)*(W/pw), width], row-major grid."""
  patch_size: Grid
  width: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, images: Array) -> Array:
    patch = _as_tuple("PatchEmbed patch_size", self.patch_size, 2)
    return _embed_patches(self, images, patch, "PatchEmbed")


class TubeletEmbed(nn.Module):
  """Videos [B, T, H, W, C] -> tubelet tokens [B, (T/pt)*(H/ph)*(W/pw), width] (ViViT)."""
  patch_size: Sequence[int]
  width: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, videos: Array) -> Array:
    patch = _as_tuple("TubeletEmbed patch_size", self.patch_size, 3)
    return _embed_patches(self, videos, patch, "TubeletEmbed")

  @staticmethod
  def inflate_kernel(kernel_2d: Array, temporal_size: int,
                     method: str = "central_frame") -> Array:
    """A [t, h, w, C, D] tubelet kernel from an image [h, w, C, D] patch kernel (ViViT).

    "central_frame": the 2-D kernel on the middle frame, zeros elsewhere, so a static
      video embeds exactly like its frame. "average": the 2-D kernel / t on every frame,
      which also reproduces the image embedding for static video.
    """
    kernel_2d = jnp.asarray(kernel_2d)
    if kernel_2d.ndim != 4:
      raise ValueError(f"inflate_kernel expects a [h, w, channels, width] kernel; given "
                       f"shape {kernel_2d.shape}.")
    if temporal_size <= 0:
      raise ValueError(f"inflate_kernel: temporal_size must be positive; given {temporal_size}.")
    if method == "central_frame":
      kernel = jnp.zeros((temporal_size,) + kernel_2d.shape, kernel_2d.dtype)
      return kernel.at[temporal_size // 2].set(kernel_2d)
    if method == "average":
      return jnp.broadcast_to(kernel_2d / temporal_size, (temporal_size,) + kernel_2d.shape)
    raise ValueError(f"Unknown inflation method {method!r}; expected 'central_frame' or "
                     "'average'.")


def posemb_sincos_1d(length: int, width: int, temperature: float = 10_000.,
                     dtype: Dtype = jnp.float32) -> Array:
  """Fixed 1-D sin-cos position embedding [1, length, width] (Transformer)."""
  if width % 2:
    raise ValueError(f"posemb_sincos_1d needs an even width; given {width}.")
  omega = 1.0 / temperature ** (np.arange(width // 2) / max(width // 2 - 1, 1))
  angles = np.arange(length)[:, None] * omega[None, :]
  return jnp.asarray(np.concatenate([np.sin(angles), np.cos(angles)], axis=1)[None], dtype)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype: Dtype = jnp.float32) -> Array:
  """Fixed 2-D sin-cos position embedding [1, h*w, width] over a row-major patch grid.

  A quarter of the channels each: sin(x), cos(x), sin(y), cos(y) (MoCo v3 / big_vision).
  """
  if width % 4:
    raise ValueError(f"posemb_sincos_2d needs a width divisible by 4; given {width}.")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / max(width // 4 - 1, 1))
  y = y.reshape(-1)[:, None] * omega[None, :]
  x = x.reshape(-1)[:, None] * omega[None, :]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe[None], dtype)


def learned_posemb(module: nn.Module, name: str, length: int, width: int,
                   param_dtype: Dtype = jnp.float32) -> Array:
  """A learned [1, length, width] position embedding parameter of `module`."""
  return module.param(
      name, nn.with_logical_partitioning(nn.initializers.normal(stddev=1 / np.sqrt(width)),
                                         (None, None, "embed")),
      (1, length, width), param_dtype)


class PositionGrid(NamedTuple):
  """How a learned position table is laid out: `prefix_tokens` rows (class / register
  tokens) and then a row-major `height` x `width` patch grid. Models say this of their
  tables (`Model.position_grids`), so no one guesses it from a table's length."""
  prefix_tokens: int
  height: int
  width: int


def resample_posemb(posemb: Array, old_grid: Grid, new_grid: Grid,
                    num_prefix_tokens: int = 0) -> Array:
  """Interpolates a [1, prefix + oh*ow, D] embedding to [1, prefix + nh*nw, D].

  The patch grid is resized by linear interpolation with the grid's corners aligned,
  which is what big_vision / the original ViT do (`scipy.ndimage.zoom(grid, order=1)`);
  the first `num_prefix_tokens` rows (class / register tokens) are kept as they are.
  Lets a model trained at 224x224 run at 384x384. The one resampler of mmjax: models,
  converters and `init_from` all call it. Traceable (jit) and exact for an equal grid.
  """
  old_grid = _as_tuple("resample_posemb old_grid", old_grid, 2)
  new_grid = _as_tuple("resample_posemb new_grid", new_grid, 2)
  posemb = jnp.asarray(posemb)
  expected = num_prefix_tokens + old_grid[0] * old_grid[1]
  if posemb.ndim != 3 or posemb.shape[0] != 1 or posemb.shape[1] != expected:
    raise ValueError(f"resample_posemb expects shape [1, {num_prefix_tokens} + "
                     f"{old_grid[0]}*{old_grid[1]}, width] = [1, {expected}, width]; given "
                     f"{posemb.shape}.")
  if old_grid == new_grid:
    return posemb
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  width = posemb.shape[-1]
  grid = grid.reshape(old_grid + (width,)).astype(jnp.float32)
  # Output pixel i samples input coordinate i * (old - 1) / (new - 1): corners aligned.
  axes = [jnp.arange(new, dtype=jnp.float32) * ((old - 1) / max(new - 1, 1))
          for old, new in zip(old_grid, new_grid)]
  coords = jnp.meshgrid(*axes, indexing="ij")
  channels = jnp.moveaxis(grid, -1, 0)
  zoomed = jax.vmap(lambda c: jax.scipy.ndimage.map_coordinates(
      c, coords, order=1, mode="nearest"))(channels)
  grid = jnp.moveaxis(zoomed, 0, -1).reshape(1, new_grid[0] * new_grid[1], width)
  return jnp.concatenate([prefix, grid.astype(posemb.dtype)], axis=1)
