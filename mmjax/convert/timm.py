"""timm VisionTransformer state dicts -> mmjax "vit" params.

Works on the state dict alone (timm itself is not imported: it needs torchvision), so any
file `torch.save(model.state_dict())` or `safetensors` wrote for a timm ViT loads. timm's
names (timm/models/vision_transformer.py):

  cls_token [1, 1, D], pos_embed [1, 1 + N, D], patch_embed.proj.{weight [D, 3, p, p], bias}
  blocks.{i}.norm1, blocks.{i}.attn.qkv.{weight [3D, D], bias [3D]}  (fused q, k, v)
  blocks.{i}.attn.proj, blocks.{i}.norm2, blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2
  norm, head                                   (class-token pooling: global_pool="token")

  norm_pre                                     (optional: CLIP-style LayerNorm before blocks)

timm ViTs compute exact GELU (torch nn.GELU) and LayerNorm epsilon 1e-6, which the derived
model config sets. The patch grid of the position embedding is resampled to the model's
image size. Features mmjax's ViT does not have (layer scale `ls1/ls2`, register tokens,
q/k norms, `fc_norm` average pooling) are refused by name rather than dropped.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from mmjax.convert import common
from mmjax.convert import layout
from mmjax.convert.common import LINEAR_IN, LINEAR_OUT, VECTOR, Flat
from mmjax.errors import ConfigError

# After `split_qkv`, {mmjax name under the block: (timm name under `blocks.{i}.`, rule)}.
BLOCK = {
    "attention_norm/scale": ("norm1.weight", VECTOR),
    "attention_norm/bias": ("norm1.bias", VECTOR),
    "attention/query/kernel": ("attn.q.weight", LINEAR_IN),
    "attention/query/bias": ("attn.q.bias", VECTOR),
    "attention/key/kernel": ("attn.k.weight", LINEAR_IN),
    "attention/key/bias": ("attn.k.bias", VECTOR),
    "attention/value/kernel": ("attn.v.weight", LINEAR_IN),
    "attention/value/bias": ("attn.v.bias", VECTOR),
    "attention/out/kernel": ("attn.proj.weight", LINEAR_OUT),
    "attention/out/bias": ("attn.proj.bias", VECTOR),
    "mlp_norm/scale": ("norm2.weight", VECTOR),
    "mlp_norm/bias": ("norm2.bias", VECTOR),
    "mlp/fc1/kernel": ("mlp.fc1.weight", LINEAR_IN),
    "mlp/fc1/bias": ("mlp.fc1.bias", VECTOR),
    "mlp/fc2/kernel": ("mlp.fc2.weight", LINEAR_IN),
    "mlp/fc2/bias": ("mlp.fc2.bias", VECTOR),
}
layout.check_block_table(BLOCK)

# What every timm VisionTransformer computes: nn.GELU (exact) and LayerNorm(eps=1e-6).
NUMERICS = dict(activation="gelu", layer_norm_epsilon=1e-6)

_UNSUPPORTED = re.compile(
    r"(^reg_token$|^fc_norm\.|^attn_pool\.|\.ls[12]\.|\.q_norm\.|\.k_norm\.|"
    r"^patch_embed\.norm\.)")


def split_qkv(weights: Mapping[str, np.ndarray]) -> Flat:
  """blocks.{i}.attn.qkv.{weight,bias} ([3D, ...], rows q then k then v) -> attn.{q,k,v}."""
  out = {}
  for name, value in weights.items():
    match = re.match(r"^(blocks\.\d+\.attn\.)qkv\.(weight|bias)$", name)
    if not match:
      out[name] = value
      continue
    if value.shape[0] % 3:
      raise common.ConversionError(f"{name} has {value.shape[0]} rows, not 3 x width.")
    for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
      out[f"{match.group(1)}{part}.{match.group(2)}"] = chunk
  return out


def normalize(weights: Mapping[str, np.ndarray]) -> Flat:
  weights = common.strip_prefix(weights, ("module.", "model."))
  unsupported = sorted(k for k in weights if _UNSUPPORTED.search(k))
  if unsupported:
    raise common.ConversionError(
        f"This timm ViT uses features the mmjax ViT does not have: {unsupported}.")
  return split_qkv(weights)


def vit_model_config(weights: Mapping[str, np.ndarray], num_heads: int
                     ) -> ml_collections.ConfigDict:
  """The mmjax "vit" config of a timm state dict (the head count is not in the weights)."""
  width, _, patch, _ = weights["patch_embed.proj.weight"].shape
  depth = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
  return ml_collections.ConfigDict(dict(
      name="vit", num_classes=int(weights["head.weight"].shape[0]) if "head.weight" in weights
      else 0, patch_size=int(patch), width=int(width), depth=depth, num_heads=int(num_heads),
      mlp_dim=int(weights["blocks.0.mlp.fc1.weight"].shape[0]), variant=None,
      pool_type="cls" if "cls_token" in weights else "gap",
      class_token="cls_token" in weights, representation_size=None,
      pre_norm="norm_pre.weight" in weights, **NUMERICS))


def fill(m: common.Mapper) -> None:
  """timm ViT (after `normalize`) -> mmjax ViT."""
  m.move("patch_embed.proj.weight", layout.PATCH_KERNEL, common.conv)
  m.move("patch_embed.proj.bias", layout.PATCH_BIAS)
  m.move("cls_token", layout.CLS)
  common.move_posemb(m, "pos_embed", "", source_prefix_tokens=int(m.has("cls_token")))
  if m.has("norm_pre.weight"):
    m.move("norm_pre.weight", layout.PRE_NORM + "/scale")
    m.move("norm_pre.bias", layout.PRE_NORM + "/bias")
  depth = len({k.split(".")[1] for k in m.source if k.startswith("blocks.")})
  for i in range(depth):
    common.move_block(m, f"blocks.{i}.", layout.block(layout.ENCODER, i), BLOCK)
  m.move("norm.weight", layout.ENCODER_NORM + "/scale")
  m.move("norm.bias", layout.ENCODER_NORM + "/bias")
  m.move("head.weight", layout.HEAD + "/kernel", common.dense)
  m.move("head.bias", layout.HEAD + "/bias")


def load(path: str, model_config: Optional[ml_collections.ConfigDict] = None, *,
         num_heads: Optional[int] = None, image_size: Optional[int] = None,
         skip: Sequence[str] = (), allow_approximate: bool = False, strict: bool = True
         ) -> Tuple[Dict[str, Any], ml_collections.ConfigDict, common.Report]:
  """Imports a timm ViT state dict (.pth/.bin/.safetensors).

  `model_config` or `num_heads` must be given (timm files do not record the head count);
  `image_size` defaults to the checkpoint's grid times the patch size. A given
  `model_config` computing another activation / LayerNorm epsilon than timm's is refused
  unless `allow_approximate=True`.
  Returns (params, model_config, report).
  """
  weights = normalize(common.read_checkpoint(path))
  if model_config is None:
    if not num_heads:
      raise ConfigError("A timm state dict does not record the number of attention heads: "
                        "pass the mmjax model config (--model-config) or num_heads.")
    model_config = vit_model_config(weights, num_heads)
  approximate = common.numerics_differences(
      model_config, NUMERICS["activation"], NUMERICS["layer_norm_epsilon"], "timm's ViT")
  if approximate and not allow_approximate:
    raise ConfigError("Loading would change the outputs: " + "; ".join(approximate) + ". Pass "
                      "allow_approximate=True (--allow-approximate) to accept the difference.")
  if not image_size:
    patches = weights["pos_embed"].shape[1] - ("cls_token" in weights)
    image_size = int(round(np.sqrt(patches))) * weights["patch_embed.proj.weight"].shape[-1]
  target = common.model_param_shapes(model_config, image_size=int(image_size))
  params, report = common.convert(weights, target, fill, skip=skip, strict=strict)
  report.notes.extend(f"approximate: {a}" for a in approximate)
  report.notes.append("a timm state dict does not record its pixel normalisation: set "
                      "config.data.image_normalization to the model's (timm's pretrained_cfg "
                      "mean / std); unset, the data are normalised to [-1, 1]")
  return params, model_config, report
