"""Hugging Face transformers ViT and CLIP checkpoints -> mmjax "vit" / "two_tower" params.

Reads a model directory (config.json + model.safetensors / pytorch_model.bin, sharded or
not) or a bare weights file; names may carry the usual prefixes ("vit.", "model.") and may
be either the on-disk names of the Hub (`encoder.layer.{i}.attention.attention.query`)
or transformers v5's in-memory names (`layers.{i}.attention.q_proj`).

Exact differences handled here, so that outputs match to float32 rounding:
  * The derived model config computes the checkpoint's MLP activation and LayerNorm
    epsilon (Hub ViTs: exact GELU, 1e-12; CLIP: quick GELU, 1e-5) and, for CLIP, the
    LayerNorm before the vision encoder (`image_pre_norm`, HF's `pre_layrnorm`).
  * CLIP's patch embedding has no bias: mmjax's is set to zero.
  * The position grid is resampled when the mmjax model is built for another image size.
What cannot be mapped is refused: an activation mmjax does not have, or a given model
config computing another activation / epsilon than the checkpoint (accepted with
`allow_approximate=True` and noted in the report).
"""
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from mmjax.convert import common
from mmjax.convert import layout
from mmjax.convert.common import LINEAR_IN, LINEAR_OUT, VECTOR, Flat
from mmjax.errors import ConfigError

# {mmjax name under the block: (HF name under the layer, rule)}.
VIT_BLOCK = {
    "attention_norm/scale": ("layernorm_before.weight", VECTOR),
    "attention_norm/bias": ("layernorm_before.bias", VECTOR),
    "attention/query/kernel": ("attention.attention.query.weight", LINEAR_IN),
    "attention/query/bias": ("attention.attention.query.bias", VECTOR),
    "attention/key/kernel": ("attention.attention.key.weight", LINEAR_IN),
    "attention/key/bias": ("attention.attention.key.bias", VECTOR),
    "attention/value/kernel": ("attention.attention.value.weight", LINEAR_IN),
    "attention/value/bias": ("attention.attention.value.bias", VECTOR),
    "attention/out/kernel": ("attention.output.dense.weight", LINEAR_OUT),
    "attention/out/bias": ("attention.output.dense.bias", VECTOR),
    "mlp_norm/scale": ("layernorm_after.weight", VECTOR),
    "mlp_norm/bias": ("layernorm_after.bias", VECTOR),
    "mlp/fc1/kernel": ("intermediate.dense.weight", LINEAR_IN),
    "mlp/fc1/bias": ("intermediate.dense.bias", VECTOR),
    "mlp/fc2/kernel": ("output.dense.weight", LINEAR_IN),
    "mlp/fc2/bias": ("output.dense.bias", VECTOR),
}
CLIP_BLOCK = {
    "attention_norm/scale": ("layer_norm1.weight", VECTOR),
    "attention_norm/bias": ("layer_norm1.bias", VECTOR),
    "attention/query/kernel": ("self_attn.q_proj.weight", LINEAR_IN),
    "attention/query/bias": ("self_attn.q_proj.bias", VECTOR),
    "attention/key/kernel": ("self_attn.k_proj.weight", LINEAR_IN),
    "attention/key/bias": ("self_attn.k_proj.bias", VECTOR),
    "attention/value/kernel": ("self_attn.v_proj.weight", LINEAR_IN),
    "attention/value/bias": ("self_attn.v_proj.bias", VECTOR),
    "attention/out/kernel": ("self_attn.out_proj.weight", LINEAR_OUT),
    "attention/out/bias": ("self_attn.out_proj.bias", VECTOR),
    "mlp_norm/scale": ("layer_norm2.weight", VECTOR),
    "mlp_norm/bias": ("layer_norm2.bias", VECTOR),
    "mlp/fc1/kernel": ("mlp.fc1.weight", LINEAR_IN),
    "mlp/fc1/bias": ("mlp.fc1.bias", VECTOR),
    "mlp/fc2/kernel": ("mlp.fc2.weight", LINEAR_IN),
    "mlp/fc2/bias": ("mlp.fc2.bias", VECTOR),
}
layout.check_block_table(VIT_BLOCK)
layout.check_block_table(CLIP_BLOCK)

# transformers v5 renames ViT modules in memory (files on the Hub keep the names above).
_V5_VIT_NAMES = (
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
)
# Non-parameter buffers some checkpoints carry.
_BUFFERS = re.compile(r"(^|\.)position_ids$")

# HF `hidden_act` -> the mmjax activation (mmjax.nn.transformer.ACTIVATIONS) computing it.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "quick_gelu": "quick_gelu"}
# mmjax activation -> the name the exporter writes.
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
                      "quick_gelu": "quick_gelu"}
# transformers' defaults when config.json leaves them out: (hidden_act, layer_norm_eps).
_DEFAULT_NUMERICS = {"vit": ("gelu", 1e-12), "clip": ("quick_gelu", 1e-5)}


# ----------------------------------------------------------------------------- reading


def read(path: str) -> Tuple[Flat, Dict[str, Any]]:
  """(weights by name, config.json as a dict or {} when `path` is a bare file)."""
  weights = common.read_checkpoint(path)
  config = {}
  config_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path),
                             "config.json")
  if os.path.exists(config_file):
    with open(config_file) as f:
      config = json.load(f)
  return weights, config


def kind(weights: Mapping[str, Any], config: Mapping[str, Any]) -> str:
  """"vit" or "clip", from config.json's model_type or else the tensor names."""
  model_type = config.get("model_type", "")
  if model_type in ("vit", "clip"):
    return model_type
  if any("text_model." in k or "vision_model." in k for k in weights):
    return "clip"
  if any("patch_embeddings.projection" in k for k in weights):
    return "vit"
  raise ConfigError(f"Not a Hugging Face ViT or CLIP checkpoint (model_type {model_type!r}); "
                    f"tensor names look like {sorted(weights)[:6]}.")


def normalize_vit(weights: Mapping[str, np.ndarray]) -> Flat:
  """Hub names without the "vit." prefix, whatever transformers version wrote them."""
  out = {}
  for name, value in weights.items():
    if _BUFFERS.search(name):
      continue
    name = re.sub(r"^(model\.)?vit\.", "", name)
    for pattern, replacement in _V5_VIT_NAMES:
      new = re.sub(pattern, replacement, name)
      if new != name:
        name = new
        break
    out[name] = value
  return out


def normalize_clip(weights: Mapping[str, np.ndarray]) -> Flat:
  return {re.sub(r"^model\.", "", k): v for k, v in weights.items() if not _BUFFERS.search(k)}


def _num_layers(weights: Mapping[str, Any], pattern: str) -> int:
  layers = {int(m.group(1)) for k in weights for m in [re.match(pattern, k)] if m}
  if layers != set(range(len(layers))):
    raise ConfigError(f"Layers {sorted(layers)} of {pattern!r} are not numbered 0..n-1.")
  return len(layers)


def check_position_table(weights: Mapping[str, np.ndarray], name: str,
                         tower_config: Mapping[str, Any], path: str) -> None:
  """Refuses a checkpoint whose position table does not fit its own config.json (its
  image_size / patch_size grid and class token): resampling it would hide the mismatch."""
  if name not in weights or not tower_config.get("image_size"):
    return
  side = int(tower_config["image_size"]) // int(tower_config["patch_size"])
  rows = int(np.prod(weights[name].shape[:-1]))
  if rows != side * side + 1:
    raise common.ConversionError(
        f"{path}: the position table {name} has {rows} rows, but config.json "
        f"(image_size={tower_config['image_size']}, patch_size={tower_config['patch_size']}) "
        f"gives a {side}x{side} grid and a class token ({side * side + 1} rows); fix "
        "config.json to describe the weights.")


# ----------------------------------------------------------------------------- model configs


def numerics(config: Mapping[str, Any], family: str) -> Tuple[str, Optional[str], float]:
  """(HF hidden_act, its mmjax activation or None, layer_norm_eps) of a (tower) config."""
  act, eps = _DEFAULT_NUMERICS[family]
  act = config.get("hidden_act", act)
  return act, HF_ACTIVATIONS.get(act), float(config.get("layer_norm_eps", eps))


def _numerics_fields(config: Mapping[str, Any], family: str) -> Dict[str, Any]:
  """{activation, layer_norm_epsilon} computing `config`'s (mmjax's default activation
  when it has none; `load` then refuses)."""
  _, activation, eps = numerics(config, family)
  return dict(activation=activation or "gelu_tanh", layer_norm_epsilon=eps)


def approximations(config: Mapping[str, Any], model_config, family: str, what: str
                   ) -> List[str]:
  """What `model_config` computes differently from the HF (tower) `config`."""
  hf_act, activation, eps = numerics(config, family)
  return common.numerics_differences(model_config, activation, eps, what, hf_act)


def vit_model_config(config: Mapping[str, Any], weights: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The mmjax "vit" config with the architecture of an HF ViT config.json."""
  width = config["hidden_size"]
  has_head = "classifier.weight" in weights
  return ml_collections.ConfigDict(dict(
      name="vit",
      num_classes=int(weights["classifier.weight"].shape[0]) if has_head else 0,
      patch_size=int(config["patch_size"]), width=int(width),
      depth=int(config["num_hidden_layers"]), num_heads=int(config["num_attention_heads"]),
      mlp_dim=int(config["intermediate_size"]), pool_type="cls", variant=None,
      representation_size=int(config.get("pooler_output_size") or width)
      if "pooler.dense.weight" in weights else None, **_numerics_fields(config, "vit")))


def clip_model_config(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The mmjax "two_tower" config with the architecture of an HF CLIP config.json.

  The logit scale keeps mmjax's cap of 100 (max_logit_scale), as OpenAI's training clamps
  it; HF's forward does not, so a released 4.6052 (ln 100 = 4.60517) scales the training
  loss's logits by 100 where HF uses 100.003. Embeddings are unaffected.
  """
  vision, text = config["vision_config"], config["text_config"]
  return ml_collections.ConfigDict(dict(
      name="two_tower", loss_type="softmax",
      vocab_size=int(text["vocab_size"]), embed_dim=int(config["projection_dim"]),
      patch_size=int(vision["patch_size"]), image_width=int(vision["hidden_size"]),
      image_depth=int(vision["num_hidden_layers"]),
      image_heads=int(vision["num_attention_heads"]),
      image_mlp_dim=int(vision["intermediate_size"]), image_pool="cls",
      text_width=int(text["hidden_size"]), text_depth=int(text["num_hidden_layers"]),
      text_heads=int(text["num_attention_heads"]), text_mlp_dim=int(text["intermediate_size"]),
      max_text_len=int(text["max_position_embeddings"]),
      # CLIP pools the end-of-text token, the largest id of its vocabulary.
      text_pool="argmax", text_causal=True, image_pre_norm=True,
      # CLIP's id 0 is a real token ("!"): no padding by id. Its causal attention and
      # end-token pooling never see padding after the end; a batch's `text_mask` is used.
      pad_id=None,
      # One activation / epsilon for both towers; `load` notes a text tower that differs.
      **_numerics_fields(vision, "clip")))


# ----------------------------------------------------------------------------- ViT


def fill_vit(m: common.Mapper, prefix: str = "") -> None:
  """HF ViT (normalised names) -> mmjax ViT under `prefix` ("" or "img/")."""
  w = m.source
  m.move("embeddings.patch_embeddings.projection.weight", prefix + layout.PATCH_KERNEL,
         common.conv)
  m.move("embeddings.patch_embeddings.projection.bias", prefix + layout.PATCH_BIAS)
  m.move("embeddings.cls_token", prefix + layout.CLS)
  common.move_posemb(m, "embeddings.position_embeddings", prefix, source_prefix_tokens=1)
  for i in range(_num_layers(w, r"encoder\.layer\.(\d+)\.")):
    common.move_block(m, f"encoder.layer.{i}.", layout.block(prefix + layout.ENCODER, i),
                      VIT_BLOCK)
  m.move("layernorm.weight", prefix + layout.ENCODER_NORM + "/scale")
  m.move("layernorm.bias", prefix + layout.ENCODER_NORM + "/bias")
  m.move("pooler.dense.weight", prefix + layout.PRE_LOGITS + "/kernel", common.dense)
  m.move("pooler.dense.bias", prefix + layout.PRE_LOGITS + "/bias")
  m.move("classifier.weight", prefix + layout.HEAD + "/kernel", common.dense)
  m.move("classifier.bias", prefix + layout.HEAD + "/bias")


# ----------------------------------------------------------------------------- CLIP


def fill_clip(m: common.Mapper) -> None:
  """HF CLIPModel (normalised names) -> mmjax two_tower."""
  w = m.source
  img = layout.IMG + "/"
  v = "vision_model."
  if img + layout.PATCH_KERNEL in m.target:
    _fill_clip_vision(m, w, img, v)
  else:  # the image tower is skipped
    for name in w:
      if name.startswith((v, "visual_projection.")):
        m.skip_source(name)
  _fill_clip_text(m, w)
  m.move("logit_scale", layout.LOGIT_SCALE)


def _fill_clip_vision(m: common.Mapper, w, img: str, v: str) -> None:
  m.move(v + "embeddings.patch_embedding.weight", img + layout.PATCH_KERNEL, common.conv)
  if img + layout.PATCH_BIAS in m.target:  # CLIP's patch embedding has no bias
    width = m.target[img + layout.PATCH_BIAS][0]
    m.put(img + layout.PATCH_BIAS, np.zeros((width,), np.float32), src="zeros (CLIP has none)")
  m.move(v + "embeddings.class_embedding", img + layout.CLS)
  common.move_posemb(m, v + "embeddings.position_embedding.weight", img, source_prefix_tokens=1)
  if img + layout.PRE_NORM + "/scale" not in m.target:
    raise common.ConversionError(
        "CLIP's vision tower normalises the embeddings before its first block "
        "(vision_model.pre_layrnorm); this model config has no such LayerNorm: set "
        "image_pre_norm=True.")
  m.move(v + "pre_layrnorm.weight", img + layout.PRE_NORM + "/scale")
  m.move(v + "pre_layrnorm.bias", img + layout.PRE_NORM + "/bias")
  for i in range(_num_layers(w, r"vision_model\.encoder\.layers\.(\d+)\.")):
    common.move_block(m, f"{v}encoder.layers.{i}.", layout.block(img + layout.ENCODER, i),
                      CLIP_BLOCK)
  m.move(v + "post_layernorm.weight", img + layout.ENCODER_NORM + "/scale")
  m.move(v + "post_layernorm.bias", img + layout.ENCODER_NORM + "/bias")
  m.move("visual_projection.weight", layout.IMG_PROJ, common.dense)


def _fill_clip_text(m: common.Mapper, w) -> None:
  t = "text_model."
  m.move(t + "embeddings.token_embedding.weight", layout.TXT_EMBEDDING, common.token_table)
  m.move(t + "embeddings.position_embedding.weight", layout.TXT_POSEMB)
  for i in range(_num_layers(w, r"text_model\.encoder\.layers\.(\d+)\.")):
    common.move_block(m, f"{t}encoder.layers.{i}.", layout.block(layout.TXT_ENCODER, i),
                      CLIP_BLOCK)
  m.move(t + "final_layer_norm.weight", layout.TXT_ENCODER_NORM + "/scale")
  m.move(t + "final_layer_norm.bias", layout.TXT_ENCODER_NORM + "/bias")
  m.move("text_projection.weight", layout.TXT_PROJ, common.dense)


# ----------------------------------------------------------------------------- entry point


def load(path: str, model_config: Optional[ml_collections.ConfigDict] = None, *,
         image_size: Optional[int] = None, skip: Sequence[str] = (),
         allow_approximate: bool = False, strict: bool = True
         ) -> Tuple[Dict[str, Any], ml_collections.ConfigDict, common.Report]:
  """Imports an HF ViT or CLIP checkpoint.

  Args:
    path: a model directory (with config.json) or a weights file.
    model_config: the mmjax model config to load into; default: derived from config.json.
    image_size: the image size the mmjax model runs at; default: the checkpoint's. The
      position grid is resampled when they differ.
    skip: regexes of mmjax parameters to leave out (e.g. "head/.*" for a new head).
    allow_approximate: accept a model computing another activation / LayerNorm epsilon
      than the checkpoint (an activation mmjax lacks, or a given `model_config`'s).
    strict: raise when a source tensor is unused or an mmjax parameter is not filled.
  Returns:
    (params, model_config, report).
  """
  weights, config = read(path)
  which = kind(weights, config)
  if which == "vit":
    weights = normalize_vit(weights)
    check_position_table(weights, "embeddings.position_embeddings", config, path)
    if model_config is None:
      if not config:
        raise ConfigError(f"{path} has no config.json: pass the mmjax model config.")
      model_config = vit_model_config(config, weights)
    towers = [(config, "vit", "the ViT")]
    image_size = image_size or config.get("image_size")
    fill = fill_vit
  else:
    weights = normalize_clip(weights)
    check_position_table(weights, "vision_model.embeddings.position_embedding.weight",
                         config.get("vision_config", {}), path)
    if model_config is None:
      if not config:
        raise ConfigError(f"{path} has no config.json: pass the mmjax model config.")
      model_config = clip_model_config(config)
    towers = [(config.get("vision_config", {}), "clip", "CLIP's vision tower"),
              (config.get("text_config", {}), "clip", "CLIP's text tower")]
    image_size = image_size or config.get("vision_config", {}).get("image_size")
    fill = fill_clip
  approximate = [a for tower_config, family, what in towers
                 for a in approximations(tower_config, model_config, family, what)]
  if approximate and not allow_approximate:
    raise ConfigError("Loading would change the outputs: " + "; ".join(approximate) + ". Pass "
                      "allow_approximate=True (--allow-approximate) to accept the difference.")
  if not image_size:
    raise ConfigError("Unknown image size: pass image_size (--image-size).")
  target = common.model_param_shapes(model_config, image_size=int(image_size))
  params, report = common.convert(weights, target, fill, skip=skip, strict=strict)
  report.notes.extend(f"approximate: {a}" for a in approximate)
  report.image_normalization = common.hf_image_normalization(
      path, common.HALF_NORMALIZATION if which == "vit" else common.CLIP_NORMALIZATION)
  return params, model_config, report
