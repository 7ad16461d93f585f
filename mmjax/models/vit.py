"""Vision Transformer (ViT, Dosovitskiy et al. 2021), registered as model "vit".

  image [B, H, W, C] -> PatchEmbed ("embedding") -> [class token ("cls")]
    -> + position embedding ("pos_embedding", learned; or fixed 2-D sin-cos)
    -> Dropout -> [LayerNorm ("pre_norm"; CLIP's pre_layrnorm, timm's norm_pre)]
    -> Encoder ("encoder", pre-LN, final LayerNorm)
    -> pool: "cls" token | "gap" mean of patch tokens | "map" attention pooling ("MAPHead")
             | "none" (all tokens)
    -> [pre-logits Dense + tanh ("pre_logits")] -> [classifier ("head")]

Sizes: a named `variant` "Ti/16", "S/32", "B/16", "L/14", ... (any patch size), where any
of `width`, `depth`, `mlp_dim`, `num_heads`, `patch_size` given explicitly overrides the
variant; or `variant=None` with all five given, for tiny test models:

    ViT(variant=None, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4,
        num_classes=10)

`num_classes=0` skips the head and returns the pooled representation [B, D] (with
`pool_type="none"`: all encoder tokens [B, prefix + N, D], the class token first).

The learned position embedding covers the class token too (as in the original ViT), so
parameter counts match the published ones; `position_grids` says how it is laid out, and
`resample_vit_posemb` moves it to a new image size (train at 224, fine-tune or evaluate
at 384).

`activation` / `layer_norm_epsilon` (mmjax.nn.transformer) default to big_vision's
tanh-GELU and 1e-6; checkpoint importers set their source's (e.g. exact GELU, 1e-12).

Model contract (mmjax/models/base.py): `loss(batch, train)` is the softmax cross-entropy of
`batch["label"]` given `batch["image"]`, with metric "accuracy"; `evaluate(batch)` returns
per-example "loss" and "accuracy".
"""
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax.models.base import Model
from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.embed import (PatchEmbed, PositionGrid, learned_posemb, posemb_sincos_2d,
                            resample_posemb)
from mmjax.nn.transformer import Encoder, Mlp
from mmjax.registry import MODELS

Array = jax.Array
Dtype = Any

# name: (width, depth, mlp_dim, num_heads), as in big_vision / the ViT papers.
VARIANTS: Dict[str, Tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}
POOL_TYPES = ("cls", "gap", "map", "none")
POSEMB_TYPES = ("learn", "sincos2d")


def decode_variant(variant: Optional[str]) -> Dict[str, Any]:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  if variant is None:
    return {}
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or (patch and not patch.isdigit()):
    raise ValueError(f"Unknown ViT variant {variant!r}; expected NAME or NAME/PATCH with NAME "
                     f"in {sorted(VARIANTS)} and PATCH an integer, e.g. 'B/16'.")
  sizes = dict(zip(("width", "depth", "mlp_dim", "num_heads"), VARIANTS[name]))
  if patch:
    sizes["patch_size"] = int(patch)
  return sizes


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends to all tokens; [B,N,D] -> [B,D]."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None
  activation: str = "gelu_tanh"
  layer_norm_epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    probe = self.param("probe", nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), (None, None, "embed")),
        (1, 1, x.shape[-1]), self.param_dtype)
    probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(self.dtype)
    x = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           implementation=self.implementation, name="attention")(probe, x)
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="norm")(x)
    x = x + Mlp(self.mlp_dim, activation=self.activation, dtype=self.dtype,
                param_dtype=self.param_dtype, name="mlp")(y)
    return x[:, 0]


@MODELS.register("vit")
class ViT(Model):
  """Vision Transformer classifier; see the module docstring for sizes and outputs."""
  variant: Optional[str] = "B/16"
  width: Optional[int] = None
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None
  num_heads: Optional[int] = None
  patch_size: Optional[Union[int, Sequence[int]]] = None
  num_classes: int = 1000
  pool_type: str = "cls"
  class_token: Optional[bool] = None      # default: True iff pool_type == "cls"
  posemb: str = "learn"
  representation_size: Optional[int] = None
  head_zeroinit: bool = True
  pre_norm: bool = False                  # LayerNorm between the embeddings and the encoder
  activation: str = "gelu_tanh"           # MLP activation, see mmjax.nn.transformer
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0              # of the last layer; 0 in the first ("linear")
  droppath_schedule: str = "linear"       # or "constant" (see mmjax.nn.transformer)
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  def sizes(self) -> Dict[str, Any]:
    """The resolved width, depth, mlp_dim, num_heads and (h, w) patch_size."""
    sizes = decode_variant(self.variant)
    for name in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
      if getattr(self, name) is not None:
        sizes[name] = getattr(self, name)
    missing = [n for n in ("width", "depth", "mlp_dim", "num_heads", "patch_size")
               if n not in sizes]
    if missing:
      raise ValueError(f"ViT(variant={self.variant!r}) leaves {missing} unset; give a variant "
                       "like 'B/16' or set them explicitly.")
    patch = sizes["patch_size"]
    sizes["patch_size"] = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if sizes["width"] % sizes["num_heads"]:
      raise ValueError(f"ViT width must be divisible by num_heads; given width "
                       f"{sizes['width']}, num_heads {sizes['num_heads']}.")
    return sizes

  def num_prefix_tokens(self) -> int:
    return int(self.pool_type == "cls" if self.class_token is None else self.class_token)

  def patch_grid(self, image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(rows, columns) of patches of an image of `image_size` (int or (height, width))."""
    patch = {**decode_variant(self.variant),
             **({"patch_size": self.patch_size} if self.patch_size is not None else {})}
    if "patch_size" not in patch:
      raise ValueError(f"ViT(variant={self.variant!r}) has no patch_size; set it.")
    patch = _pair(patch["patch_size"])
    size = _pair(image_size)
    if size[0] % patch[0] or size[1] % patch[1]:
      raise ValueError(f"Image size {size} is not divisible by the patch size {patch}.")
    return size[0] // patch[0], size[1] // patch[1]

  @nn.nowrap  # plain arithmetic: callable on an unbound model
  def position_grids(self, batch: Mapping[str, Any]) -> Dict[str, PositionGrid]:
    """{'pos_embedding': (class tokens, grid)} for batch['image'] [B, H, W, C]; none for
    fixed sin-cos embeddings (they follow the image already)."""
    if self.posemb != "learn":
      return {}
    return {"pos_embedding": PositionGrid(self.num_prefix_tokens(),
                                          *self.patch_grid(batch["image"].shape[1:3]))}

  @nn.compact
  def __call__(self, image: Array, *, train: bool = False) -> Array:
    sizes = self.sizes()
    name = f"ViT({self.variant or 'custom'})"
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"{name}: unknown pool_type {self.pool_type!r}; expected one of "
                       f"{POOL_TYPES}.")
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f"{name}: unknown posemb {self.posemb!r}; expected one of "
                       f"{POSEMB_TYPES}.")
    if image.ndim != 4:
      raise ValueError(f"{name} expects images [batch, height, width, channels]; given shape "
                       f"{image.shape}.")
    patch = sizes["patch_size"]
    if image.shape[1] % patch[0] or image.shape[2] % patch[1]:
      raise ValueError(f"{name}: image size {image.shape[1:3]} is not divisible by the patch "
                       f"size {patch}.")
    if self.pool_type == "cls" and not self.num_prefix_tokens():
      raise ValueError(f"{name}: pool_type='cls' needs class_token=True; given False.")
    width, deterministic = sizes["width"], not train

    x = PatchEmbed(patch, width, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="embedding")(image)
    batch, num_patches = x.shape[:2]
    prefix = self.num_prefix_tokens()
    if prefix:
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (None, None, "embed")),
                       (1, 1, width), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)
    if self.posemb == "learn":
      posemb = learned_posemb(self, "pos_embedding", prefix + num_patches, width,
                              self.param_dtype)
    else:  # fixed sin-cos over the patch grid; the class token gets no position.
      grid = (image.shape[1] // patch[0], image.shape[2] // patch[1])
      posemb = jnp.pad(posemb_sincos_2d(*grid, width), ((0, 0), (prefix, 0), (0, 0)))
    x = x + posemb.astype(x.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="pre_norm")(x)

    x = Encoder(sizes["depth"], sizes["num_heads"], sizes["mlp_dim"],
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                droppath_rate=self.droppath_rate, droppath_schedule=self.droppath_schedule,
                scan_layers=self.scan_layers,
                remat_policy=self.remat_policy, dtype=self.dtype,
                param_dtype=self.param_dtype, implementation=self.implementation,
                activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
                name="encoder")(x, deterministic=deterministic)

    if self.pool_type == "cls":
      x = x[:, 0]
    elif self.pool_type == "gap":
      x = jnp.mean(x[:, prefix:], axis=1)
    elif self.pool_type == "map":
      x = MAPHead(sizes["num_heads"], sizes["mlp_dim"], dtype=self.dtype,
                  param_dtype=self.param_dtype, implementation=self.implementation,
                  activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
                  name="MAPHead")(x)
    if self.representation_size:
      x = nn.tanh(nn.Dense(
          self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   ("embed", "mlp")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
          name="pre_logits")(x))
    if self.num_classes:
      kernel_init = (nn.initializers.zeros if self.head_zeroinit
                     else nn.initializers.lecun_normal())
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "vocab")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                   name="head")(x)
    return x.astype(jnp.float32)

  def _per_example(self, batch: Mapping[str, Array], train: bool) -> Dict[str, Array]:
    if not self.num_classes or self.pool_type == "none":
      raise ValueError(f"ViT.loss needs a classifier: num_classes > 0 and a pooled output; "
                       f"given num_classes={self.num_classes}, pool_type={self.pool_type!r}.")
    for key in ("image", "label"):
      if key not in batch:
        raise ValueError(f"ViT.loss needs batch[{key!r}]; given keys {sorted(batch)}.")
    labels = batch["label"]
    if labels.shape != batch["image"].shape[:1]:
      raise ValueError(f"ViT.loss expects labels [batch] = {batch['image'].shape[:1]}; given "
                       f"shape {labels.shape}.")
    logits = self(batch["image"], train=train)
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        "accuracy": (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32),
    }

  def loss(self, batch: Mapping[str, Array], train: bool) -> Tuple[Array, Dict[str, Array]]:
    per_example = self._per_example(batch, train)
    return jnp.mean(per_example["loss"]), {"accuracy": jnp.mean(per_example["accuracy"])}

  def evaluate(self, batch: Mapping[str, Array]) -> Dict[str, Array]:
    return self._per_example(batch, train=False)


def resample_vit_posemb(model: ViT, params: Mapping[str, Any],
                        old_image_size: Union[int, Sequence[int]],
                        new_image_size: Union[int, Sequence[int]]) -> Dict[str, Any]:
  """`params` with `pos_embedding` interpolated from one image size to another.

  Only the patch grid is resampled; class-token positions are kept.
  """
  if model.posemb != "learn":
    raise ValueError(f"Only learned position embeddings are resampled; given posemb="
                     f"{model.posemb!r} (sin-cos embeddings follow the image size already).")
  params = dict(params)
  params["pos_embedding"] = resample_posemb(
      params["pos_embedding"], model.patch_grid(old_image_size),
      model.patch_grid(new_image_size), model.num_prefix_tokens())
  return params


def _pair(value: Union[int, Sequence[int]]) -> Tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)
