"""Hugging Face PaliGemma (1, 2), Gemma / Gemma 2 / Llama causal LMs and SigLIP vision
towers <-> "vlm".

Import (`load`): one or more model directories, each a whole PaliGemma
(`PaliGemmaForConditionalGeneration`, PaliGemma 1 or 2), a language model alone
(`GemmaForCausalLM`, `Gemma2ForCausalLM`, `LlamaForCausalLM`) or a vision tower alone
(`SiglipVisionModel`, or the vision half of a `SiglipModel`). Parts combine: `--src
gemma-2b --src siglip-so400m` gives a VLM whose projector is new. What no source fills
(the projector, or the tower not given) is reported and left to `init_from`, which
initialises parameters the checkpoint lacks.

Export (`export`): a "vlm" -> a PaliGemma directory, PaliGemma 2 when the LM is a Gemma 2
(config.json + model.safetensors, the names transformers writes) that
`PaliGemmaForConditionalGeneration.from_pretrained` loads; importing it back gives the
same parameters bit for bit.

What is mapped, exactly (outputs match to float32 rounding):
  SigLIP: patch conv, position table (no class token), pre-LN blocks (same layout as
    CLIP's), post_layernorm -> the ViT's final norm; its attention-pooling `head` is not
    part of a PaliGemma and is left out (noted).
  PaliGemma projector: `multi_modal_projector.linear` -> `projection` (linear).
  Gemma: embeddings x sqrt(width), RMSNorm (1 + scale), GeGLU, tied logits.
  Gemma 2: Gemma plus post-attention / post-feedforward RMSNorms (`post_norms`),
    query_pre_attn_scalar, attention and final logit soft-capping, and the sliding window
    on the `layer_types` marked "sliding_attention" (every n-th layer global:
    `sliding_window_pattern`). The window is |p_q - p_k| < W on top of the prefix-LM
    mask (google-deepmind/gemma's); transformers lets a bidirectional prefix longer
    than W see all of itself, so the two differ only there.
  Llama: no embedding scale, RMSNorm scale, SwiGLU, untied `lm_head`.
Refused, with the reason: attention / MLP biases, scaled RoPE variants, bidirectional
causal LMs, layer_types no `sliding_window_pattern` expresses.
"""
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from mmjax.convert import common
from mmjax.convert.common import LINEAR_IN, LINEAR_OUT, VECTOR, Flat
from mmjax.convert.hf import CLIP_BLOCK, EXPORT_ACTIVATIONS, HF_ACTIVATIONS

MODEL_TYPES = ("paligemma", "gemma", "gemma2", "llama", "siglip", "siglip_vision_model")
LM_TYPES = ("gemma", "gemma2", "llama")
# {mmjax name under lm/layers_{i}: (HF name under model.layers.{i}., rule)}
LM_BLOCK = {
    "attention_norm/scale": ("input_layernorm.weight", VECTOR),
    "attention/query/kernel": ("self_attn.q_proj.weight", LINEAR_IN),
    "attention/key/kernel": ("self_attn.k_proj.weight", LINEAR_IN),
    "attention/value/kernel": ("self_attn.v_proj.weight", LINEAR_IN),
    "attention/out/kernel": ("self_attn.o_proj.weight", LINEAR_OUT),
    "mlp_norm/scale": ("post_attention_layernorm.weight", VECTOR),
    "mlp/gate/kernel": ("mlp.gate_proj.weight", LINEAR_IN),
    "mlp/up/kernel": ("mlp.up_proj.weight", LINEAR_IN),
    "mlp/down/kernel": ("mlp.down_proj.weight", LINEAR_IN),
}
# Gemma 2 names its four norms differently: post_attention_layernorm is a post-norm.
GEMMA2_BLOCK = {
    **LM_BLOCK,
    "post_attention_norm/scale": ("post_attention_layernorm.weight", VECTOR),
    "mlp_norm/scale": ("pre_feedforward_layernorm.weight", VECTOR),
    "post_mlp_norm/scale": ("post_feedforward_layernorm.weight", VECTOR),
}
# transformers' Gemma2Config defaults, for keys a config.json leaves out.
GEMMA2_DEFAULTS = dict(query_pre_attn_scalar=256, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
# Source names -> canonical "vision." / "projector." / "lm." / "lm_head." / "siglip_text."
# names, for every naming transformers has used (Hub files and v5 in-memory names).
_CANONICAL = (
    (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision."),
    (r"^(model\.)?multi_modal_projector\.linear\.", "projector."),
    (r"^(model\.)?language_model\.model\.", "lm."),
    (r"^(model\.)?language_model\.lm_head\.", "lm_head."),
    (r"^model\.language_model\.", "lm."),
    (r"^vision_model\.", "vision."),
    (r"^text_model\.", "siglip_text."),
    (r"^model\.", "lm."),
)
_SIGLIP_EXTRA = re.compile(r"^(logit_scale|logit_bias|siglip_text\..*|vision\.head\..*)$")
_BUFFERS = re.compile(r"(^|\.)position_ids$")


def canonical(weights: Mapping[str, np.ndarray], model_type: str) -> Flat:
  out = {}
  for name, value in weights.items():
    if _BUFFERS.search(name):
      continue
    new = name
    for pattern, replacement in _CANONICAL:
      new, n = re.subn(pattern, replacement, name)
      if n:
        break
    if model_type.startswith("siglip") and not new.startswith(("vision.", "siglip_text.")):
      new = new if new in ("logit_scale", "logit_bias") else "vision." + new
    out[new] = value
  return out


# ----------------------------------------------------------------------------- configs


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def window_fields(text: Mapping[str, Any], depth: int) -> Dict[str, Any]:
  """`sliding_window` / `sliding_window_pattern` of a Gemma 2 config's `layer_types`."""
  window = text.get("sliding_window", GEMMA2_DEFAULTS["sliding_window"])
  types = list(text.get("layer_types") or [
      "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(depth)])
  unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
  if unknown or len(types) != depth:
    raise ValueError(f"layer_types must be {depth} of sliding_attention / full_attention; "
                     f"given {types}.")
  local = [t == "sliding_attention" for t in types]
  if window is None or not any(local):
    return dict(sliding_window=None)
  pattern = local.index(False) + 1 if not all(local) else depth + 1
  if local != [(i + 1) % pattern != 0 for i in range(depth)]:
    raise ValueError(f"layer_types {types} is not every n-th layer global (what "
                     "sliding_window_pattern expresses); not supported.")
  return dict(sliding_window=int(window), sliding_window_pattern=pattern)


def gemma2_fields(text: Mapping[str, Any], depth: int) -> Dict[str, Any]:
  """The Gemma 2 knobs of the VLM's LM (transformers' defaults for missing keys)."""
  get = lambda k: text.get(k, GEMMA2_DEFAULTS[k])
  caps = {k: None if get(k) is None else float(get(k))
          for k in ("attn_logit_softcapping", "final_logit_softcapping")}
  return dict(post_norms=True, query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
              **caps, **window_fields(text, depth))


def lm_fields(text: Mapping[str, Any], model_type: str, *, in_paligemma: bool = False
              ) -> Dict[str, Any]:
  """VLM language-model fields computing what the HF Gemma / Gemma 2 / Llama `text`
  config does (`in_paligemma`: the prefix-LM mask comes from PaliGemma)."""
  if model_type not in LM_TYPES:
    raise ValueError(f"Language model type {model_type!r} is not supported; expected one of "
                     f"{LM_TYPES}.")
  if text.get("use_bidirectional_attention") and not in_paligemma:
    raise ValueError("The checkpoint's use_bidirectional_attention=True; a causal LM is "
                     "expected (the VLM's prefix-LM mask is its own).")
  for flag in ("attention_bias", "mlp_bias"):
    if text.get(flag):
      raise ValueError(f"The checkpoint's {flag}=True; the mmjax LM blocks have no biases.")
  rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ValueError(f"RoPE variant {rope} is not supported; only the default rotary "
                     "embedding is.")
  gemma = model_type in ("gemma", "gemma2")
  act = text.get("hidden_activation") or text.get("hidden_act") or (
      "gelu_pytorch_tanh" if gemma else "silu")
  activation = {**HF_ACTIVATIONS, "silu": "silu"}.get(act)
  if activation is None:
    raise ValueError(f"LM activation {act!r} has no mmjax equivalent.")
  heads = int(text["num_attention_heads"])
  depth = int(text["num_hidden_layers"])
  gemma2 = gemma2_fields(text, depth) if model_type == "gemma2" else {}
  return dict(**gemma2,
      vocab_size=int(text["vocab_size"]), width=int(text["hidden_size"]),
      depth=depth, num_heads=heads,
      num_kv_heads=int(text.get("num_key_value_heads") or heads),
      head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
      mlp_dim=int(text["intermediate_size"]), activation=activation,
      norm_epsilon=float(text.get("rms_norm_eps", 1e-6)),
      norm_scale_offset=1.0 if gemma else 0.0,
      rope_base=float(rope.get("rope_theta", text.get("rope_theta", 10_000.0))),
      embed_scale=gemma, tie_embeddings=bool(text.get("tie_word_embeddings", gemma)),
      eos_id=int(_first(text.get("eos_token_id", 1 if gemma else 2)) or 0))


def encoder_fields(vision: Mapping[str, Any]) -> Dict[str, Any]:
  """The VLM `encoder` (ViT fields) computing what the HF SigLIP vision config does."""
  act = vision.get("hidden_act", "gelu_pytorch_tanh")
  if act not in HF_ACTIVATIONS:
    raise ValueError(f"SigLIP activation {act!r} has no mmjax equivalent.")
  return dict(variant=None, width=int(vision["hidden_size"]),
              depth=int(vision["num_hidden_layers"]), mlp_dim=int(vision["intermediate_size"]),
              num_heads=int(vision["num_attention_heads"]), patch_size=int(vision["patch_size"]),
              activation=HF_ACTIVATIONS[act],
              layer_norm_epsilon=float(vision.get("layer_norm_eps", 1e-6)))


def model_config_of(sources: Sequence[Tuple[str, Mapping[str, Any]]]) -> Tuple[
    ml_collections.ConfigDict, int]:
  """(the "vlm" config, image size) of the given (model_type, config.json) parts."""
  fields: Dict[str, Any] = dict(name="vlm", projector="linear", prefix_attention="full")
  image_size = None
  for model_type, config in sources:
    if model_type == "paligemma":
      text = config["text_config"]
      fields.update(lm_fields(text, text.get("model_type", "gemma"), in_paligemma=True))
      fields["encoder"] = encoder_fields(config["vision_config"])
      image_size = int(config["vision_config"]["image_size"])
    elif model_type in LM_TYPES:
      fields.update(lm_fields(config, model_type))
    else:
      vision = config.get("vision_config", config)
      fields["encoder"] = encoder_fields(vision)
      image_size = int(vision["image_size"])
  return ml_collections.ConfigDict(fields), image_size or 224


def param_shapes(model_config, image_size: int) -> Dict[str, Any]:
  """Flat {name: ShapeDtypeStruct} of the "vlm" `model_config` (no FLOPs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from mmjax.models import vlm  # pylint: disable=g-import-not-at-top,unused-import
  from mmjax.models.base import build_model  # pylint: disable=g-import-not-at-top
  model = build_model(model_config)
  batch = {"image": jnp.zeros((1, image_size, image_size, 3)),
           "prefix": jnp.ones((1, 1), jnp.int32), "suffix": jnp.ones((1, 1), jnp.int32)}
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, method="loss"))
  return common.flatten(nn.meta.unbox(variables)["params"])


# ----------------------------------------------------------------------------- import


def _num_layers(weights, pattern: str) -> int:
  return len({m.group(1) for k in weights for m in [re.match(pattern, k)] if m})


def fill(m: common.Mapper) -> None:
  """Canonical HF names -> "vlm" parameter names."""
  w = m.source
  enc = "image_encoder/"
  m.move("vision.embeddings.patch_embedding.weight", enc + "embedding/kernel", common.conv)
  m.move("vision.embeddings.patch_embedding.bias", enc + "embedding/bias")
  m.move("vision.embeddings.position_embedding.weight", enc + "pos_embedding")
  for i in range(_num_layers(w, r"vision\.encoder\.layers\.(\d+)\.")):
    common.move_block(m, f"vision.encoder.layers.{i}.", f"{enc}encoder/encoderblock_{i}",
                      CLIP_BLOCK)
  m.move("vision.post_layernorm.weight", enc + "encoder/encoder_norm/scale")
  m.move("vision.post_layernorm.bias", enc + "encoder/encoder_norm/bias")
  m.move("projector.weight", "projection/kernel", common.dense)
  m.move("projector.bias", "projection/bias")
  m.move("lm.embed_tokens.weight", "lm/embedding/embedding")
  block = GEMMA2_BLOCK if "lm/layers_0/post_mlp_norm/scale" in m.target else LM_BLOCK
  for i in range(_num_layers(w, r"lm\.layers\.(\d+)\.")):
    common.move_block(m, f"lm.layers.{i}.", f"lm/layers_{i}", block)
  m.move("lm.norm.weight", "lm/final_norm/scale")
  if "lm/head/kernel" in m.target:
    m.move("lm_head.weight", "lm/head/kernel", common.dense)
  elif m.has("lm_head.weight"):  # tied: a saved copy of the embedding
    if not np.array_equal(m.take("lm_head.weight"), w.get("lm.embed_tokens.weight")):
      raise common.ConversionError("lm_head.weight differs from the token embedding, but the "
                                   "model config ties them (tie_embeddings=True).")


def read_part(path: str) -> Tuple[str, Dict[str, Any], Flat]:
  """(model_type, config.json, canonical weights) of one HF model directory."""
  config_file = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.exists(config_file):
    raise ValueError(f"{path}: expected a Hugging Face model directory with config.json.")
  with open(config_file) as f:
    config = json.load(f)
  model_type = config.get("model_type", "")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{path}: model_type {model_type!r} is not a VLM part; expected one of "
                     f"{MODEL_TYPES}.")
  return model_type, config, canonical(common.read_checkpoint(path), model_type)


def is_vlm_source(path: str) -> bool:
  """Whether `path` is a model directory this module imports (vs a ViT / CLIP)."""
  try:
    with open(os.path.join(path, "config.json")) as f:
      return json.load(f).get("model_type") in MODEL_TYPES
  except (OSError, ValueError):
    return False


def load(paths: Sequence[str], model_config: Optional[ml_collections.ConfigDict] = None, *,
         image_size: Optional[int] = None, skip: Sequence[str] = (), strict: bool = True
         ) -> Tuple[Dict[str, Any], ml_collections.ConfigDict, common.Report]:
  """Imports PaliGemma / Gemma / Llama / SigLIP directories into one "vlm".

  Returns (params, model_config, report). Parameters no source has (a new projector, the
  other tower) are reported as missing and not an error; everything else must map one to
  one unless `strict=False`.
  """
  parts = [read_part(p) for p in ([paths] if isinstance(paths, str) else paths)]
  derived, derived_size = model_config_of([(t, c) for t, c, _ in parts])
  model_config = model_config or derived
  image_size = image_size or derived_size
  weights: Flat = {}
  for _, _, w in parts:
    overlap = sorted(set(weights) & set(w))
    if overlap:
      raise ValueError(f"Two sources provide the same tensors, e.g. {overlap[:3]}.")
    weights.update(w)
  has = {prefix: any(k.startswith(prefix) for k in weights)
         for prefix in ("vision.", "projector.", "lm.")}
  allow_missing = [rx for prefix, rx in (("vision.", r"image_encoder/.*"),
                                         ("projector.", r"projection/.*"), ("lm.", r"lm/.*"))
                   if not has[prefix]]
  target = param_shapes(model_config, image_size)
  m = common.Mapper(weights, target, skip)
  fill(m)
  params, report = m.finish(allow_missing=allow_missing, allow_unused=[_SIGLIP_EXTRA.pattern],
                            strict=strict)
  for rx in allow_missing:
    report.notes.append(f"no source for {rx}: initialised by the trainer (init_from loads the "
                        "rest)")
  if any(_SIGLIP_EXTRA.match(k) for k in report.unused):
    report.notes.append("left out SigLIP parts a PaliGemma does not use (text tower, "
                        "attention-pooling head, logit scale / bias)")
  if has["vision."]:  # the image processor of the source that brings the image tower
    vision_source = next(p for p, (t, _, _) in zip(
        [paths] if isinstance(paths, str) else paths, parts) if t not in ("gemma", "llama"))
    report.image_normalization = common.hf_image_normalization(
        vision_source, common.HALF_NORMALIZATION)
  return common.unflatten(params), model_config, report


# ----------------------------------------------------------------------------- export


def state_dict(flat: Mapping[str, np.ndarray], model_config) -> Flat:
  """Flat "vlm" params -> PaliGemma tensors under the names transformers saves."""
  if model_config.get("projector", "linear") != "linear":
    raise ValueError("PaliGemma's projector is linear; this model has projector="
                     f"{model_config.get('projector')!r}, which PaliGemma cannot hold.")
  enc, sd = "image_encoder/", {}
  sd["vision_tower.embeddings.patch_embedding.weight"] = np.transpose(
      flat[enc + "embedding/kernel"], (3, 2, 0, 1))
  sd["vision_tower.embeddings.patch_embedding.bias"] = flat[enc + "embedding/bias"]
  sd["vision_tower.embeddings.position_embedding.weight"] = flat[enc + "pos_embedding"][0]
  for i in range(_num_layers(flat, rf"{enc}encoder/encoderblock_(\d+)/")):
    sd.update(common.save_block(flat, f"vision_tower.encoder.layers.{i}.",
                                f"{enc}encoder/encoderblock_{i}", CLIP_BLOCK))
  sd["vision_tower.post_layernorm.weight"] = flat[enc + "encoder/encoder_norm/scale"]
  sd["vision_tower.post_layernorm.bias"] = flat[enc + "encoder/encoder_norm/bias"]
  sd["multi_modal_projector.linear.weight"] = flat["projection/kernel"].T
  sd["multi_modal_projector.linear.bias"] = flat["projection/bias"]
  sd["language_model.model.embed_tokens.weight"] = flat["lm/embedding/embedding"]
  block = GEMMA2_BLOCK if "lm/layers_0/post_mlp_norm/scale" in flat else LM_BLOCK
  for i in range(_num_layers(flat, r"lm/layers_(\d+)/")):
    sd.update(common.save_block(flat, f"language_model.model.layers.{i}.", f"lm/layers_{i}",
                                block))
  sd["language_model.model.norm.weight"] = flat["lm/final_norm/scale"]
  if "lm/head/kernel" in flat:
    sd["language_model.lm_head.weight"] = flat["lm/head/kernel"].T
  return sd


def hf_config(model_config, image_size: int) -> Dict[str, Any]:
  """The PaliGemma config.json of a "vlm" (Gemma-style LMs only: PaliGemma's; a Gemma 2,
  `post_norms`, gives PaliGemma 2's)."""
  c = model_config
  if not c.get("embed_scale", True) or c.get("norm_scale_offset", 1.0) != 1.0:
    raise ValueError("PaliGemma's language model is a Gemma (embed_scale=True, "
                     "norm_scale_offset=1); this model is Llama-style.")
  if c.get("activation", "gelu_tanh") != "gelu_tanh":
    raise ValueError(f"Gemma's MLP is GeGLU (activation 'gelu_tanh'); given "
                     f"{c.get('activation')!r}.")
  from mmjax.models.vlm import VLM  # pylint: disable=g-import-not-at-top
  model = VLM(**{k: v for k, v in c.items() if k != "name"})
  enc = model.encoder_config()
  from mmjax.models.vit import decode_variant  # pylint: disable=g-import-not-at-top
  enc = {**decode_variant(enc.get("variant")), **{k: v for k, v in enc.items() if v is not None}}
  patch = enc["patch_size"]
  vocab = int(model.vocab_size)
  text = dict(model_type="gemma", vocab_size=vocab, hidden_size=model.width,
              intermediate_size=model.mlp_dim, num_hidden_layers=model.depth,
              num_attention_heads=model.num_heads,
              num_key_value_heads=model.num_kv_heads or model.num_heads,
              head_dim=model.head_dim, hidden_activation="gelu_pytorch_tanh",
              hidden_act="gelu_pytorch_tanh", rms_norm_eps=model.norm_epsilon,
              rope_parameters=dict(rope_type="default", rope_theta=model.rope_base),
              tie_word_embeddings=model.tie_embeddings, eos_token_id=model.eos_id,
              pad_token_id=0, attention_bias=False)
  text.update(gemma2_config(model))
  vision = dict(model_type="siglip_vision_model", hidden_size=enc["width"],
                intermediate_size=enc["mlp_dim"], num_hidden_layers=enc["depth"],
                num_attention_heads=enc["num_heads"], patch_size=int(patch),
                image_size=int(image_size), layer_norm_eps=enc["layer_norm_epsilon"],
                hidden_act=EXPORT_ACTIVATIONS[enc["activation"]], vision_use_head=False,
                projection_dim=model.width)
  return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
              text_config=text, vision_config=vision, projection_dim=model.width,
              hidden_size=model.width, vocab_size=vocab,
              # The VLM places image tokens by position; HF marks them with an id,
              # out of the vocabulary so it never collides with text.
              image_token_index=vocab, tie_word_embeddings=model.tie_embeddings)


def _int_if_whole(x: float):
  """transformers types query_pre_attn_scalar as an int."""
  return int(x) if float(x).is_integer() else float(x)


def gemma2_config(model) -> Dict[str, Any]:
  """The Gemma 2 keys of the text config; {} for a Gemma (refused if it has a Gemma 2
  knob)."""
  knobs = dict(query_pre_attn_scalar=model.query_pre_attn_scalar,
               attn_logit_softcapping=model.attn_logit_softcapping,
               final_logit_softcapping=model.final_logit_softcapping,
               sliding_window=model.sliding_window)
  if not model.post_norms:
    given = {k: v for k, v in knobs.items() if v is not None}
    if given:
      raise ValueError(f"Gemma 2 knobs {given} need post_norms=True (a Gemma 2); a Gemma "
                       "has none of them.")
    return {}
  local = [model.sliding_window is not None and (i + 1) % model.sliding_window_pattern != 0
           for i in range(model.depth)]
  return dict(knobs, model_type="gemma2",
              query_pre_attn_scalar=_int_if_whole(
                  model.query_pre_attn_scalar or model.head_dim),
              layer_types=["sliding_attention" if x else "full_attention" for x in local])


def export(flat: Mapping[str, np.ndarray], model_config, dst: str,
           image_size: Optional[int] = None) -> str:
  """Writes DST/config.json and DST/model.safetensors (PaliGemma); returns DST."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  grid = flat["image_encoder/pos_embedding"].shape[1]
  patch = flat["image_encoder/embedding/kernel"].shape[0]
  size = int(round(np.sqrt(grid))) * patch
  if image_size and image_size != size:
    raise ValueError(f"--image-size {image_size} differs from the model's {size}.")
  config = hf_config(model_config, size)
  sd = state_dict(flat, model_config)
  os.makedirs(dst, exist_ok=True)
  save_file({k: np.array(v, np.float32, order="C") for k, v in sd.items()},
            os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return dst
