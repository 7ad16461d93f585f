"""Tests for mmjax.nn.embed: patch/tubelet embeddings are convolutions; posemb utilities."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn.embed import (PatchEmbed, TubeletEmbed, posemb_sincos_1d, posemb_sincos_2d,
                            resample_posemb)


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _strided_conv(x, kernel, bias):
  """The definition: a VALID convolution with stride = kernel size."""
  spatial = "THW"[-(x.ndim - 2):]
  out = jax.lax.conv_general_dilated(
      x, kernel, window_strides=kernel.shape[:-2], padding="VALID",
      dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  return (out + bias).reshape(x.shape[0], -1, kernel.shape[-1])


def test_patch_embed_is_a_strided_conv():
  images = _normal((2, 8, 12, 3))
  embed = PatchEmbed(patch_size=4, width=16)
  variables = jax.jit(embed.init)(jax.random.key(0), images)
  params = nn.meta.unbox(variables)["params"]
  assert params["kernel"].shape == (4, 4, 3, 16)
  assert tuple(nn.get_partition_spec(variables)["params"]["kernel"])[-1] == "embed"
  tokens = jax.jit(embed.apply)(variables, images)
  assert tokens.shape == (2, 2 * 3, 16)
  chex.assert_trees_all_close(tokens, _strided_conv(images, params["kernel"], params["bias"]),
                              atol=1e-5)


def test_patch_embed_rectangular_patches_and_bf16():
  images = _normal((1, 8, 12, 3))
  embed = PatchEmbed(patch_size=(2, 3), width=8, dtype=jnp.bfloat16)
  variables = jax.jit(embed.init)(jax.random.key(0), images)
  tokens = jax.jit(embed.apply)(variables, images)
  assert tokens.shape == (1, 4 * 4, 8) and tokens.dtype == jnp.bfloat16
  assert nn.meta.unbox(variables)["params"]["kernel"].dtype == jnp.float32


def test_tubelet_embed_is_a_3d_strided_conv():
  videos = _normal((2, 4, 8, 8, 3))
  embed = TubeletEmbed(patch_size=(2, 4, 4), width=16)
  variables = jax.jit(embed.init)(jax.random.key(0), videos)
  params = nn.meta.unbox(variables)["params"]
  tokens = jax.jit(embed.apply)(variables, videos)
  assert tokens.shape == (2, 2 * 2 * 2, 16)
  chex.assert_trees_all_close(tokens, _strided_conv(videos, params["kernel"], params["bias"]),
                              atol=1e-5)


@pytest.mark.parametrize("method", ["central_frame", "average"])
def test_inflated_kernel_embeds_static_video_like_its_frame(method):
  frame = _normal((2, 8, 8, 3), seed=1)
  patch = PatchEmbed(patch_size=4, width=16)
  params_2d = nn.meta.unbox(jax.jit(patch.init)(jax.random.key(0), frame))["params"]
  kernel = TubeletEmbed.inflate_kernel(params_2d["kernel"], 3, method=method)
  assert kernel.shape == (3, 4, 4, 3, 16)
  if method == "central_frame":
    np.testing.assert_array_equal(kernel[1], params_2d["kernel"])
    np.testing.assert_array_equal(kernel[0], 0.0)
  video = jnp.repeat(frame[:, None], 3, axis=1)          # a static 3-frame video
  tubelet = TubeletEmbed(patch_size=(3, 4, 4), width=16)
  video_tokens = jax.jit(tubelet.apply)(
      {"params": {"kernel": kernel, "bias": params_2d["bias"]}}, video)
  chex.assert_trees_all_close(video_tokens, patch.apply({"params": params_2d}, frame),
                              atol=1e-5)


def test_posemb_sincos():
  pe = posemb_sincos_2d(3, 4, 16)
  assert pe.shape == (1, 12, 16)
  # Position (0, 0): sin terms 0, cos terms 1.
  np.testing.assert_allclose(pe[0, 0], np.repeat([0.0, 1.0, 0.0, 1.0], 4), atol=1e-7)
  # Row-major grid: token 1 is (y=0, x=1), so its y half equals token 0's.
  np.testing.assert_allclose(pe[0, 1, 8:], pe[0, 0, 8:])
  assert not np.allclose(pe[0, 1, :8], pe[0, 0, :8])
  assert len(np.unique(np.round(np.asarray(pe[0]), 5), axis=0)) == 12   # all distinct
  pe1 = posemb_sincos_1d(5, 8)
  assert pe1.shape == (1, 5, 8)
  np.testing.assert_allclose(pe1[0, :, 0], np.sin(np.arange(5)), atol=1e-6)
  with pytest.raises(ValueError, match="divisible by 4; given 10"):
    posemb_sincos_2d(2, 2, 10)


def test_resample_posemb_keeps_prefix_and_interpolates_grid():
  posemb = _normal((1, 1 + 4 * 4, 8))
  same = resample_posemb(posemb, 4, 4, num_prefix_tokens=1)
  chex.assert_trees_all_close(same, posemb, atol=1e-6)
  bigger = resample_posemb(posemb, (4, 4), (6, 8), num_prefix_tokens=1)
  assert bigger.shape == (1, 1 + 6 * 8, 8)
  np.testing.assert_array_equal(bigger[:, :1], posemb[:, :1])        # class token kept
  # A linear ramp along x stays a linear ramp (bilinear), with the same range inside.
  ramp = jnp.tile(jnp.linspace(0.0, 1.0, 4)[None, :, None], (4, 1, 2)).reshape(1, 16, 2)
  resampled = resample_posemb(ramp, 4, (4, 8)).reshape(4, 8, 2)
  np.testing.assert_allclose(resampled[0], resampled[3], atol=1e-6)  # constant along y
  assert np.all(np.diff(resampled[0, 1:-1, 0]) > 0)                # increasing along x
  with pytest.raises(ValueError, match=r"\[1, 1 \+ 4\*4, width\] = \[1, 17, width\]; given "
                                       r"\(1, 16, 8\)"):
    resample_posemb(posemb[:, 1:], 4, 6, num_prefix_tokens=1)


@pytest.mark.parametrize("old, new", [((4, 4), (6, 6)), ((14, 14), (24, 24)),
                                      ((7, 7), (3, 3)), ((4, 4), (6, 8))])
def test_resample_posemb_is_big_vision_high_res_finetuning(old, new):
  """big_vision / the original ViT resample with scipy.ndimage.zoom(grid, order=1) and keep
  the class token: the same numbers here (also for a non-square target grid)."""
  scipy_ndimage = pytest.importorskip("scipy.ndimage")  # a jax dependency
  posemb = np.asarray(_normal((1, 1 + old[0] * old[1], 8)))
  tok, grid = posemb[:, :1], posemb[0, 1:].reshape(old + (8,))
  zoomed = scipy_ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
  expected = np.concatenate([tok, zoomed.reshape(1, -1, 8)], axis=1)
  got = jax.jit(resample_posemb, static_argnums=(1, 2, 3))(posemb, old, new, 1)
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("module, shape, message", [
    (PatchEmbed(4, 8), (2, 8, 10, 3),
     r"size \(8, 10\) must be divisible by the patch size \(4, 4\)"),
    (PatchEmbed(4, 8), (8, 8, 3),
     r"rank 4 inputs \[batch, h, w, channels\]; given shape \(8, 8, 3\)"),
    (TubeletEmbed((2, 4, 4), 8), (1, 3, 8, 8, 3), r"size \(3, 8, 8\) must be divisible"),
    (PatchEmbed((4, 4, 4), 8), (2, 8, 8, 3), "positive int or 2 positive ints; given"),
])
def test_bad_inputs_raise(module, shape, message):
  with pytest.raises(ValueError, match=message):
    module.init(jax.random.key(0), jnp.zeros(shape))
