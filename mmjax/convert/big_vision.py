"""big_vision ViT and SigLIP `.npz` checkpoints -> mmjax "vit" / "two_tower" params.

big_vision saves the flax parameter tree flattened with "/" (`params/...`; the original
vision_transformer checkpoints have no prefix or `opt/target/`). Its modules are flax's,
so tensors keep their layout and only names change:

  embedding/{kernel, bias}, cls, pos_embedding [1, N, D] (patches only)
  Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0/{query, key,
      value, out}, LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}}   (or scanned: encoderblock)
  Transformer/encoder_norm, MAPHead_0/..., pre_logits, head
  SigLIP: img/<ViT, MAP pooling>, txt/{Embed_0/embedding, pos_embedding, Encoder_0/...,
          head}, t (log scale), b (bias)

big_vision computes what mmjax does (tanh-approximate GELU, LayerNorm epsilon 1e-6), so
outputs agree to float32 rounding.

Older checkpoints (google-research/vision_transformer) name the blocks LayerNorm_0,
MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3 and keep the position embedding
in `Transformer/posembed_input/pos_embedding` with a class-token row; mmjax's table has
that row too (zero when converting big_vision, whose class token has no position).
"""
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from mmjax.convert import common
from mmjax.convert import layout
from mmjax.convert.common import Flat
from mmjax.errors import ConfigError

# flax modules on both sides: every tensor is copied (reshaped to the mmjax shape).
COPY = common.Rule(common.copy, np.asarray)


def block_table(attention: int, norm2: int, mlp: int) -> Dict[str, Tuple[str, common.Rule]]:
  """{mmjax name under the block: (big_vision name, rule)} for the given module indices."""
  a, m = f"MultiHeadDotProductAttention_{attention}/", f"MlpBlock_{mlp}/"
  table = {"attention_norm/scale": ("LayerNorm_0/scale", COPY),
           "attention_norm/bias": ("LayerNorm_0/bias", COPY),
           "mlp_norm/scale": (f"LayerNorm_{norm2}/scale", COPY),
           "mlp_norm/bias": (f"LayerNorm_{norm2}/bias", COPY),
           "mlp/fc1/kernel": (m + "Dense_0/kernel", COPY), "mlp/fc1/bias": (m + "Dense_0/bias", COPY),
           "mlp/fc2/kernel": (m + "Dense_1/kernel", COPY), "mlp/fc2/bias": (m + "Dense_1/bias", COPY)}
  for proj in ("query", "key", "value", "out"):
    for leaf in ("kernel", "bias"):
      table[f"attention/{proj}/{leaf}"] = (f"{a}{proj}/{leaf}", COPY)
  layout.check_block_table(table)
  return table


BLOCK = block_table(attention=0, norm2=1, mlp=0)         # big_vision
OLD_BLOCK = block_table(attention=1, norm2=2, mlp=3)     # google-research/vision_transformer


def normalize(weights: Mapping[str, np.ndarray]) -> Flat:
  """Drops the checkpoint prefix and unrolls scanned encoders (`encoderblock` with a
  leading layer axis) into `encoderblock_{i}`."""
  weights = common.strip_prefix(weights, ("params/", "opt/target/"))
  return common.unscan_params(weights)


def _depth(weights: Mapping[str, Any], encoder: str) -> int:
  return len({k[len(encoder):].split("/")[0] for k in weights
              if k.startswith(encoder + "encoderblock_")})


def fill_vit(m: common.Mapper, src: str = "", dst: str = "") -> None:
  """big_vision ViT under `src` -> mmjax ViT under `dst`."""
  m.move(src + "embedding/kernel", dst + layout.PATCH_KERNEL)
  m.move(src + "embedding/bias", dst + layout.PATCH_BIAS)
  m.move(src + "cls", dst + layout.CLS)
  if m.has(src + "pos_embedding"):  # big_vision: the class token has no position
    common.move_posemb(m, src + "pos_embedding", dst, source_prefix_tokens=0)
  else:  # the original ViT: a class-token row leads the table
    common.move_posemb(m, src + "Transformer/posembed_input/pos_embedding", dst,
                       source_prefix_tokens=int(m.has(src + "cls")))
  encoder = src + "Transformer/"
  old = m.has(encoder + "encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
  for i in range(_depth(m.source, encoder)):
    common.move_block(m, f"{encoder}encoderblock_{i}/", layout.block(dst + layout.ENCODER, i),
                      OLD_BLOCK if old else BLOCK)
  for leaf in ("scale", "bias"):
    m.move(f"{encoder}encoder_norm/{leaf}", f"{dst}{layout.ENCODER_NORM}/{leaf}")
  fill_map_head(m, src + "MAPHead_0/", dst + layout.MAP_HEAD)
  for leaf in ("kernel", "bias"):
    m.move(f"{src}pre_logits/{leaf}", f"{dst}{layout.PRE_LOGITS}/{leaf}")
    m.move(f"{src}head/{leaf}", f"{dst}{layout.HEAD}/{leaf}")


def fill_map_head(m: common.Mapper, src: str, dst: str) -> None:
  """big_vision MAPHead_0 -> mmjax MAPHead (same modules, other names)."""
  for proj in ("query", "key", "value", "out"):
    for leaf in ("kernel", "bias"):
      m.move(f"{src}MultiHeadDotProductAttention_0/{proj}/{leaf}",
             f"{dst}/attention/{proj}/{leaf}")
  m.move(src + "probe", dst + "/probe")
  for leaf in ("scale", "bias"):
    m.move(f"{src}LayerNorm_0/{leaf}", f"{dst}/norm/{leaf}")
  for i, fc in enumerate(("fc1", "fc2")):
    for leaf in ("kernel", "bias"):
      m.move(f"{src}MlpBlock_0/Dense_{i}/{leaf}", f"{dst}/mlp/{fc}/{leaf}")


def vit_model_config(weights: Mapping[str, np.ndarray], num_heads: int,
                     src: str = "") -> ml_collections.ConfigDict:
  """The mmjax "vit" config of big_vision ViT weights (the head count is not in them,
  unless the attention kernels are [D, heads, head_dim] as flax saves them)."""
  kernel = weights[src + "embedding/kernel"]
  q = [v for k, v in weights.items()
       if k.startswith(src + "Transformer/encoderblock_0/") and k.endswith("query/kernel")]
  heads = q[0].shape[1] if q and q[0].ndim == 3 else num_heads
  if not heads:
    raise ConfigError("Pass the number of attention heads (the checkpoint does not record it).")
  block = "MlpBlock_3" if src + "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in weights \
      else "MlpBlock_0"
  # big_vision's pool "tok" is mmjax's "cls"; "gap" there averages all (patch) tokens.
  if src + "MAPHead_0/probe" in weights:
    pool = "map"
  elif src + "cls" in weights:
    pool = "cls"
  else:
    pool = "gap"
  head = weights.get(src + "head/kernel")
  pre_logits = weights.get(src + "pre_logits/kernel")
  return ml_collections.ConfigDict(dict(
      name="vit", num_classes=int(head.shape[-1]) if head is not None else 0,
      patch_size=int(kernel.shape[0]), width=int(kernel.shape[-1]),
      depth=_depth(weights, src + "Transformer/"), num_heads=int(heads),
      mlp_dim=int(weights[f"{src}Transformer/encoderblock_0/{block}/Dense_0/kernel"].shape[-1]),
      pool_type=pool, class_token=src + "cls" in weights, variant=None,
      representation_size=int(pre_logits.shape[-1]) if pre_logits is not None else None))


def fill_siglip(m: common.Mapper) -> None:
  """big_vision SigLIP (img/, txt/, t, b) -> mmjax two_tower.

  SigLIP's image embedding is the MAP head output itself: mmjax's `img_proj` becomes the
  identity. Its text head has a bias where mmjax's `txt_proj` has none: the bias is moved
  before the projection, into the final LayerNorm's bias (c with c @ W = b; that LayerNorm
  feeds only the pooled token into the projection), which is exact when W has full rank.
  """
  fill_vit(m, "img/", layout.IMG + "/")
  if layout.IMG_PROJ in m.target:
    width, embed_dim = m.target[layout.IMG_PROJ]
    if width != embed_dim:
      raise common.ConversionError(
          f"SigLIP's image embedding is the {width}-wide pooled output; the model's embed_dim "
          f"is {embed_dim}.")
    m.put(layout.IMG_PROJ, np.eye(width, dtype=np.float32), src="identity (SigLIP has none)")
  m.move("txt/Embed_0/embedding", layout.TXT_EMBEDDING, common.token_table)
  m.move("txt/pos_embedding", layout.TXT_POSEMB)
  for i in range(_depth(m.source, "txt/Encoder_0/")):
    common.move_block(m, f"txt/Encoder_0/encoderblock_{i}/", layout.block(layout.TXT_ENCODER, i),
                      BLOCK)
  m.move("txt/Encoder_0/encoder_norm/scale", layout.TXT_ENCODER_NORM + "/scale")
  if m.has("txt/head/kernel"):
    kernel, bias = m.take("txt/head/kernel"), m.take("txt/head/bias")
    shift, *_ = np.linalg.lstsq(kernel.T.astype(np.float64), bias.astype(np.float64), rcond=None)
    error = np.abs(shift @ kernel - bias).max()
    if error > 1e-5 * max(1.0, np.abs(bias).max()):
      raise common.ConversionError(
          f"txt/head/bias cannot be moved before txt/head/kernel {kernel.shape} (rank too low; "
          f"residual {error:.2e}): the mmjax text projection has no bias.")
    m.put(layout.TXT_PROJ, kernel, src="txt/head/kernel")
    m.put(layout.TXT_ENCODER_NORM + "/bias",
          m.take("txt/Encoder_0/encoder_norm/bias") + shift.astype(np.float32),
          src="txt/Encoder_0/encoder_norm/bias + txt/head/bias @ pinv(kernel)")
    m.report.notes.append(f"txt/head/bias folded into {layout.TXT_ENCODER_NORM}/bias "
                          f"(max residual {error:.1e})")
  else:
    m.move("txt/Encoder_0/encoder_norm/bias", layout.TXT_ENCODER_NORM + "/bias")
  m.move("t", layout.LOGIT_SCALE)
  m.move("b", layout.LOGIT_BIAS)


def siglip_model_config(weights: Mapping[str, np.ndarray]) -> ml_collections.ConfigDict:
  """The mmjax "two_tower" config of big_vision SigLIP weights."""
  img = vit_model_config(weights, 0, src="img/")
  q = weights["txt/Encoder_0/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
  embedding = weights["txt/Embed_0/embedding"]
  return ml_collections.ConfigDict(dict(
      name="two_tower", loss_type="sigmoid", vocab_size=int(embedding.shape[0]),
      embed_dim=int(weights["txt/head/kernel"].shape[1]), patch_size=img.patch_size,
      image_width=img.width, image_depth=img.depth, image_heads=img.num_heads,
      image_mlp_dim=img.mlp_dim, image_pool=img.pool_type, text_width=int(embedding.shape[1]),
      text_depth=_depth(weights, "txt/Encoder_0/"), text_heads=int(q.shape[1]),
      text_mlp_dim=int(weights["txt/Encoder_0/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]),
      max_text_len=int(weights["txt/pos_embedding"].shape[1]),
      # SigLIP's text tower is bidirectional and pools the last token; its learned
      # temperature is not capped (released models reach exp(t) > 100).
      text_pool="last", text_causal=False, max_logit_scale=None))


def load(path: str, model_config: Optional[ml_collections.ConfigDict] = None, *,
         num_heads: Optional[int] = None, image_size: Optional[int] = None,
         skip: Sequence[str] = (), strict: bool = True
         ) -> Tuple[Dict[str, Any], ml_collections.ConfigDict, common.Report]:
  """Imports a big_vision ViT `.npz` into an mmjax "vit", or a SigLIP one into a
  "two_tower" (the model config is derived from the weights when not given).
  Returns (params, model_config, report)."""
  weights = normalize(common.read_checkpoint(path))
  if "img/embedding/kernel" in weights:
    if model_config is None:
      model_config = siglip_model_config(weights)
    if not image_size:
      image_size = int(round(np.sqrt(weights["img/pos_embedding"].shape[1]))) * int(
          weights["img/embedding/kernel"].shape[0])
    target = common.model_param_shapes(model_config, image_size=int(image_size))
    params, report = common.convert(weights, target, fill_siglip, skip=skip, strict=strict)
    report.image_normalization = common.HALF_NORMALIZATION  # value_range(-1, 1)
    return params, model_config, report
  if model_config is None:
    model_config = vit_model_config(weights, num_heads)
  if not image_size:
    posemb = weights.get("pos_embedding", weights.get("Transformer/posembed_input/pos_embedding"))
    patches = posemb.shape[1] - ("pos_embedding" not in weights and "cls" in weights)
    image_size = int(round(np.sqrt(patches))) * weights["embedding/kernel"].shape[0]
  target = common.model_param_shapes(model_config, image_size=int(image_size))
  params, report = common.convert(weights, target, fill_vit, skip=skip, strict=strict)
  report.image_normalization = common.HALF_NORMALIZATION  # value_range(-1, 1)
  return params, model_config, report
