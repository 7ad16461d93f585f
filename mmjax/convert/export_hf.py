"""mmjax "vit" / "two_tower" params -> a Hugging Face model directory (ViT / CLIP).

Writes config.json and model.safetensors with the Hub's tensor names, so
`transformers.ViTForImageClassification.from_pretrained(DIR)` (or `CLIPModel`) loads it
with any transformers version, and `mmjax.convert.hf.load(DIR)` imports it back exactly.
The exported config asks HF for what the mmjax model computes: its MLP activation
(`model_config.activation`, default tanh GELU = HF `gelu_pytorch_tanh`) and LayerNorm
epsilon (default 1e-6), so outputs match to float32 rounding.
Only numpy, json and safetensors are needed (no torch).

The architecture is read from the parameters themselves (width, depth, heads, MLP size,
patch size, position grid, classes), so a model config is only used for its pooling.
"""
import json
import os
from typing import Any, Dict, Mapping, Optional

import numpy as np

from mmjax.convert import common
from mmjax.convert import hf
from mmjax.convert import layout
from mmjax.convert.common import Flat


def _encoder_depth(params: Mapping[str, Any], encoder: str) -> int:
  prefix = f"{encoder}/{layout.BLOCK_PREFIX}_"
  return len({k[len(prefix):].split("/")[0] for k in params if k.startswith(prefix)})


def _encoder_config(params: Mapping[str, np.ndarray], encoder: str, model_config
                    ) -> Dict[str, Any]:
  """hidden_size, layers, heads, MLP size of the encoder at `encoder`, from its params;
  activation and LayerNorm epsilon from the model config."""
  activation = (model_config or {}).get("activation", "gelu_tanh")
  if activation not in hf.EXPORT_ACTIVATIONS:
    raise ValueError(f"Hugging Face has no activation for mmjax's {activation!r}; exportable: "
                     f"{sorted(hf.EXPORT_ACTIVATIONS)}.")
  q = params[f"{layout.block(encoder, 0)}/attention/query/kernel"]  # [D, heads, head_dim]
  return dict(hidden_size=int(q.shape[0]), num_hidden_layers=_encoder_depth(params, encoder),
              num_attention_heads=int(q.shape[1]),
              intermediate_size=int(params[f"{layout.block(encoder, 0)}/mlp/fc1/kernel"].shape[1]),
              hidden_act=hf.EXPORT_ACTIVATIONS[activation],
              layer_norm_eps=float((model_config or {}).get("layer_norm_epsilon", 1e-6)),
              attention_dropout=0.0)


def _check_pool(model_config, field: str, allowed) -> None:
  value = (model_config or {}).get(field)
  if value is not None and value not in allowed:
    raise ValueError(f"Hugging Face pools with {allowed}; this model has {field}={value!r}, "
                     "which the exported model would not compute.")


def _vision_embeddings(params: Mapping[str, np.ndarray], prefix: str, patch_bias: bool
                       ) -> Dict[str, Any]:
  """Patch kernel as a torch Conv2d weight, class token and [1 + N, D] position table.

  Without a patch bias in the target (CLIP), the mmjax bias is folded into the patch rows
  of the position table: both are added to every patch token, so this is exact.
  """
  kernel = params[prefix + layout.PATCH_KERNEL]                 # [p, p, C, D]
  width = kernel.shape[-1]
  if prefix + layout.CLS not in params:
    raise ValueError("Hugging Face ViT / CLIP need a class token; this model has none "
                     "(pool_type / class_token).")
  table = params[prefix + layout.POSEMB].reshape(-1, width)     # class row, then the grid
  bias = params.get(prefix + layout.PATCH_BIAS, np.zeros(width, np.float32))
  if not patch_bias:
    table = np.concatenate([table[:1], table[1:] + bias], axis=0)
  num_patches = table.shape[0] - 1
  side = int(round(np.sqrt(num_patches)))
  if side * side != num_patches:
    raise ValueError(f"Hugging Face needs a square patch grid; this model has {num_patches} "
                     "patches.")
  out = {"conv": np.transpose(kernel, (3, 2, 0, 1)), "cls": params[prefix + layout.CLS].reshape(-1),
         "pos": table, "image_size": side * kernel.shape[0]}
  if patch_bias:
    out["bias"] = bias
  return out


def vit_state_dict(params: Mapping[str, np.ndarray], model_config=None
                   ) -> tuple[Flat, Dict[str, Any]]:
  """(HF ViTForImageClassification / ViTModel state dict, config.json dict)."""
  _check_pool(model_config, "pool_type", ("cls",))
  has_head = layout.HEAD + "/kernel" in params
  has_pooler = layout.PRE_LOGITS + "/kernel" in params
  if has_head and has_pooler:
    raise ValueError("HF ViTForImageClassification classifies the class token directly; this "
                     f"model has a '{layout.PRE_LOGITS}' layer (representation_size) before "
                     "its head, which HF would skip.")
  if layout.PRE_NORM + "/scale" in params:
    raise ValueError(f"HF ViT has no LayerNorm before its encoder; this model has one "
                     f"('{layout.PRE_NORM}', pre_norm=True), which HF would skip.")
  p = "vit." if has_head else ""
  emb = _vision_embeddings(params, "", patch_bias=True)
  sd = {p + "embeddings.patch_embeddings.projection.weight": emb["conv"],
        p + "embeddings.patch_embeddings.projection.bias": emb["bias"],
        p + "embeddings.cls_token": emb["cls"].reshape(1, 1, -1),
        p + "embeddings.position_embeddings": emb["pos"][None]}
  enc = _encoder_config(params, layout.ENCODER, model_config)
  for i in range(enc["num_hidden_layers"]):
    sd.update(common.save_block(params, f"{p}encoder.layer.{i}.",
                                layout.block(layout.ENCODER, i), hf.VIT_BLOCK))
  sd[p + "layernorm.weight"] = params[layout.ENCODER_NORM + "/scale"]
  sd[p + "layernorm.bias"] = params[layout.ENCODER_NORM + "/bias"]
  config = dict(model_type="vit", **enc, image_size=emb["image_size"],
                patch_size=int(emb["conv"].shape[-1]), num_channels=int(emb["conv"].shape[1]),
                qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  if has_head:
    kernel = params[layout.HEAD + "/kernel"]
    sd["classifier.weight"] = kernel.T
    sd["classifier.bias"] = params[layout.HEAD + "/bias"]
    labels = {str(i): f"LABEL_{i}" for i in range(kernel.shape[1])}
    config.update(architectures=["ViTForImageClassification"], id2label=labels,
                  label2id={v: int(k) for k, v in labels.items()})
  else:  # ViTModel; its pooler (Dense + tanh on the class token) is mmjax's pre-logits.
    config.update(architectures=["ViTModel"])
    if has_pooler:
      kernel = params[layout.PRE_LOGITS + "/kernel"]
      sd["pooler.dense.weight"] = kernel.T
      sd["pooler.dense.bias"] = params[layout.PRE_LOGITS + "/bias"]
      config.update(pooler_output_size=int(kernel.shape[1]), pooler_act="tanh")
  return sd, config


def clip_state_dict(params: Mapping[str, np.ndarray], model_config=None
                    ) -> tuple[Flat, Dict[str, Any]]:
  """(HF CLIPModel state dict, config.json dict) of an mmjax two_tower."""
  _check_pool(model_config, "image_pool", ("cls",))
  _check_pool(model_config, "text_pool", ("argmax",))
  if (model_config or {}).get("loss_type", "softmax") != "softmax" or layout.LOGIT_BIAS in params:
    raise ValueError("CLIP has no logit bias: only softmax (CLIP) two-towers export to HF CLIP.")
  img = layout.IMG + "/"
  if img + layout.PATCH_KERNEL not in params:
    raise ValueError(f"HF CLIP needs both towers; these params have no image tower ('{img}').")
  sd = _clip_pre_norm(params, img)
  emb = _vision_embeddings(params, img, patch_bias=False)
  v, t = "vision_model.", "text_model."
  sd.update({v + "embeddings.patch_embedding.weight": emb["conv"],
             v + "embeddings.class_embedding": emb["cls"],
             v + "embeddings.position_embedding.weight": emb["pos"]})
  vision = _encoder_config(params, img + layout.ENCODER, model_config)
  for i in range(vision["num_hidden_layers"]):
    sd.update(common.save_block(params, f"{v}encoder.layers.{i}.",
                                layout.block(img + layout.ENCODER, i), hf.CLIP_BLOCK))
  sd[v + "post_layernorm.weight"] = params[img + layout.ENCODER_NORM + "/scale"]
  sd[v + "post_layernorm.bias"] = params[img + layout.ENCODER_NORM + "/bias"]
  text = _encoder_config(params, layout.TXT_ENCODER, model_config)
  table = params[layout.TXT_EMBEDDING]
  table = table[:int((model_config or {}).get("vocab_size", table.shape[0]))]  # cut the padding
  posemb = params[layout.TXT_POSEMB].reshape(-1, table.shape[1])
  sd[t + "embeddings.token_embedding.weight"] = table
  sd[t + "embeddings.position_embedding.weight"] = posemb
  for i in range(text["num_hidden_layers"]):
    sd.update(common.save_block(params, f"{t}encoder.layers.{i}.",
                                layout.block(layout.TXT_ENCODER, i), hf.CLIP_BLOCK))
  sd[t + "final_layer_norm.weight"] = params[layout.TXT_ENCODER_NORM + "/scale"]
  sd[t + "final_layer_norm.bias"] = params[layout.TXT_ENCODER_NORM + "/bias"]
  sd["visual_projection.weight"] = params[layout.IMG_PROJ].T
  sd["text_projection.weight"] = params[layout.TXT_PROJ].T
  sd["logit_scale"] = np.asarray(params[layout.LOGIT_SCALE]).reshape(())
  # eos_token_id=2 makes HF pool the position of the largest id, as text_pool="argmax".
  text.update(vocab_size=int(table.shape[0]), max_position_embeddings=int(posemb.shape[0]),
              eos_token_id=2, bos_token_id=0, pad_token_id=1)
  vision.update(image_size=emb["image_size"], patch_size=int(emb["conv"].shape[-1]),
                num_channels=int(emb["conv"].shape[1]))
  config = dict(model_type="clip", architectures=["CLIPModel"],
                projection_dim=int(params[layout.IMG_PROJ].shape[1]),
                logit_scale_init_value=float(sd["logit_scale"]),
                text_config=dict(model_type="clip_text_model", **text),
                vision_config=dict(model_type="clip_vision_model", **vision))
  return sd, config


def _clip_pre_norm(params: Mapping[str, np.ndarray], img: str) -> Flat:
  name = img + layout.PRE_NORM
  if name + "/scale" not in params:
    raise ValueError("HF CLIP normalises the vision embeddings before the encoder "
                     "(pre_layrnorm); this mmjax image tower has no such LayerNorm "
                     f"('{name}'), so the export would compute something else.")
  return {"vision_model.pre_layrnorm.weight": params[name + "/scale"],
          "vision_model.pre_layrnorm.bias": params[name + "/bias"]}


def export(params: Mapping[str, Any], model_config, dst: str,
           image_size: Optional[int] = None) -> str:
  """Writes DST/config.json and DST/model.safetensors; returns DST.

  `model_config.name` selects ViT ("vit") or CLIP ("two_tower"). `image_size`, when
  given, must equal the model's (position grid x patch size).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  flat = common.unscan_params(common.flatten(params) if isinstance(
      next(iter(params.values())), Mapping) else dict(params))
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  name = (model_config or {}).get("name")
  if name == "vit":
    sd, config = vit_state_dict(flat, model_config)
    size = config["image_size"]
  elif name == "two_tower":
    sd, config = clip_state_dict(flat, model_config)
    size = config["vision_config"]["image_size"]
  else:
    raise ValueError(f"Export to Hugging Face supports models 'vit' and 'two_tower'; given "
                     f"{name!r}.")
  if image_size and image_size != size:
    raise ValueError(f"--image-size {image_size} differs from the model's {size}; resample "
                     "the position embedding by importing at the new size first.")
  os.makedirs(dst, exist_ok=True)
  save_file({k: np.array(v, np.float32, order="C") for k, v in sd.items()},  # keeps 0-d
            os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return dst
