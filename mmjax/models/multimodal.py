"""The multimodal model: modality tokenizers -> fusion strategy -> task heads.

    batch ──► tokenizers (one per modality, shared width) ──► fusion (config.model.fusion)
          ──► per-modality pooled vectors ──► heads (one per objective)

Objectives, switched on by a positive weight in `loss_weights` (the total loss is the
weighted sum; every term is also logged):

  itc       image-text contrastive: the image alone and the caption (`text`) alone go
            through the same fusion encoder (each strategy accepts any subset of its
            modalities), are mean-pooled and projected; CLIP / SigLIP loss
            (`contrastive_loss`; `contrastive_impl` "dense" or "ring", see
            mmjax/ring_loss.py). evaluate -> embeddings; summarize -> retrieval
            recall@1/5/10 in both directions over the whole split.
  vqa       the `modalities` (e.g. image + question + audio + sensor) fused, pooled per
            modality, combined (`combine`: concat / sum / gate) and classified over
            `num_answers` answers (batch key `answer`); accuracy. With
            `vqa_mode="generate"` the answer is text instead: a causal decoder
            cross-attends to the fused tokens of `modalities` and predicts the answer's
            tokens (batch key `answer_text`, see config.data.max_answer_len); evaluation
            decodes it (`generate`) and scores it with the official VQAv2 accuracy.
  classify  the same over `num_classes` classes (batch key `label`); accuracy.
  itm       image-text matching: the fused (image, caption) pair is a match or not;
            negatives are hard ones drawn from the contrastive similarities of the
            global batch (ALBEF), one draw per example (keyed by its id); in
            evaluation the hardest valid wrong partner in the eval batch.
  mlm       masked language modelling of the caption, fused with the image; the
            prediction head is tied to the text embedding table; masks are drawn
            per example (keyed by its id), so they do not depend on the batch.
  caption   a causal text decoder cross-attends to the fused `caption_from` modalities
            and predicts the caption (teacher forcing); `generate_captions` decodes
            greedily or with beam search using the key/value cache.

Generation: `generation_tasks()` names what the model can write ("caption", "vqa") and
`generate(variables, batch, task=...)` decodes it greedily or with beam search.

Zero-shot classification (as two_tower): `class_embeddings(prompt_tokens)` embeds class
prompts with the contrastive text path, `zero_shot_logits(batch, class_embeddings)`.

Trainer contract: `features` gives per-example embeddings, losses and statistics,
`loss_from_features` the weighted total over the batch (token objectives weighted by
tokens over the whole batch), and `feature_context` ITM's negatives from the global
batch, so gradient accumulation is exact for every objective (mmjax/models/base.py).

Token ids: the data vocabulary is [0, vocab_size) with 0 = padding; the model appends
three ids of its own, MASK = vocab_size, BOS = vocab_size + 1, EOS = vocab_size + 2.

Parameter tree: `token_embed` (shared by the text modalities), `embed_{modality}`
(tokenizers), `fusion` (see fusion.py), `image_proj` / `text_proj` / `contrastive`,
`combine`, `vqa_head`, `cls_head`, `itm_head`, `caption_decoder`, `answer_decoder`.
"""
from typing import Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import losses, metrics
from mmjax.models import decoding, heads, tokenizers
from mmjax.models.base import Model, example_ids
from mmjax.models.text import TextDecoder
from mmjax.nn.embed import PositionGrid, TokenEmbed
from mmjax.nn.transformer import BlockConfig
from mmjax.registry import FUSIONS, MODELS

# Importing fusion registers the built-in strategies.
from mmjax.models import fusion as _fusion  # noqa: F401  pylint: disable=unused-import

Array = jax.Array
Batch = Mapping[str, Array]

# Batch key -> tokenizer kind. `question` and `text` (caption) are both text.
MODALITY_KINDS = {"image": "image", "video": "video", "audio": "audio", "sensor": "sensor",
                  "text": "text", "question": "text"}
OBJECTIVES = ("itc", "vqa", "classify", "itm", "mlm", "caption")
NUM_SPECIAL_TOKENS = 3  # MASK, BOS, EOS appended after the data vocabulary
VQA_MODES = ("classify", "generate")
ITM_CONTEXT = ("itm_negative_text", "itm_negative_image")  # batch keys of global negatives


def fusion_names():
  return FUSIONS.names()


@MODELS.register("multimodal")
class MultimodalModel(Model):
  """Tokenizers + a registered fusion strategy + heads for the enabled objectives."""
  # What is fused for vqa / classify, in this order.
  modalities: Sequence[str] = ("image", "question")
  # Fusion (see fusion.py).
  fusion: str = "hybrid"
  width: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 256
  # Only for the strategies that use them (None: the strategy's default; see fusion.py).
  fusion_layer: Optional[int] = None
  num_bottlenecks: Optional[int] = None
  shared_weights: Optional[bool] = None
  fit_weights: Optional[str] = None
  combine: str = "concat"
  # Every block (fusion layers and text decoders; see block_config).
  num_kv_heads: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  activation: str = "gelu_tanh"      # MLP activation, see mmjax.nn.transformer
  layer_norm_epsilon: float = 1e-6
  param_dtype: str = "float32"
  droppath_rate: float = 0.0         # of the last layer; 0 in the first ("linear")
  droppath_schedule: str = "linear"  # or "constant" (see mmjax.nn.transformer)
  # Tokenizers.
  vocab_size: int = 1000
  max_text_len: int = 32
  patch_size: int = 8
  video_patch_size: Sequence[int] = (2, 8, 8)
  audio_patch_size: int = 8
  sample_rate: int = 16000
  frame_length: int = 400
  hop_length: int = 160
  num_mel_bins: int = 32
  sensor_window: int = 4
  # Objectives and heads.
  loss_weights: Optional[Mapping[str, float]] = None   # None: {"itc": 1, "vqa": 1}
  num_answers: int = 0
  vqa_mode: str = "classify"         # "classify" over num_answers, or "generate" the text
  max_answer_len: int = 8            # answer tokens (vqa_mode="generate")
  num_classes: int = 0
  head_hidden_dim: int = 0           # 0: a linear head; >0: one GELU hidden layer
  head_zeroinit: bool = True         # classifier heads start at uniform predictions
  embed_dim: int = 64                # contrastive embedding size
  contrastive_loss: str = "softmax"
  contrastive_impl: str = "dense"    # "dense" or "ring" (mmjax/ring_loss.py): same loss
  mlm_rate: float = 0.15
  caption_from: Sequence[str] = ("image",)
  decoder_layers: int = 2
  dtype: str = "float32"
  implementation: Optional[str] = None

  # ----------------------------------------------------------------------------- setup

  def objective_weights(self) -> Dict[str, float]:
    weights = dict(self.loss_weights if self.loss_weights is not None
                   else {"itc": 1.0, "vqa": 1.0})
    unknown = sorted(set(weights) - set(OBJECTIVES))
    if unknown:
      raise ValueError(f"Unknown objectives {unknown} in loss_weights; expected some of "
                       f"{OBJECTIVES}.")
    active = {k: float(v) for k, v in weights.items() if v}
    if not active:
      raise ValueError(f"loss_weights {weights} enables no objective; give at least one of "
                       f"{OBJECTIVES} a non-zero weight.")
    return active

  def block_config(self) -> BlockConfig:
    """The settings of every Transformer block: the fusion layers and the text decoders."""
    return BlockConfig.of(self)

  def used_modalities(self) -> Tuple[str, ...]:
    """Every batch key the enabled objectives read as a modality."""
    used = []
    for objective in self.objective_weights():
      if objective in ("vqa", "classify"):
        used += list(self.modalities)
      elif objective == "caption":
        used += list(self.caption_from)
      else:
        used += ["image", "text"]
    return tuple(dict.fromkeys(used))

  def setup(self):
    weights = self.objective_weights()
    dtype = jnp.dtype(self.dtype)
    for m in tuple(self.modalities) + tuple(self.caption_from):
      if m not in MODALITY_KINDS:
        raise ValueError(f"Unknown modality {m!r}; expected one of {sorted(MODALITY_KINDS)}.")
    if not self.modalities:
      raise ValueError("`modalities` is empty; list the batch keys to fuse, e.g. "
                       "('image', 'question').")
    if self.vqa_mode not in VQA_MODES:
      raise ValueError(f"Unknown vqa_mode {self.vqa_mode!r}; expected one of {VQA_MODES}.")
    for objective, count in (("vqa", self.num_answers), ("classify", self.num_classes)):
      if objective == "vqa" and self.vqa_mode == "generate":
        continue  # answers are text: no answer vocabulary
      if objective in weights and count <= 0:
        field = "num_answers" if objective == "vqa" else "num_classes"
        raise ValueError(f"Objective {objective!r} needs {field} > 0; got {count}.")
    text_vocab = self.vocab_size + NUM_SPECIAL_TOKENS
    self.token_embed = TokenEmbed(text_vocab, self.width)
    self.embed = {m: self._tokenizer(m, dtype) for m in self.used_modalities()}
    block = self.block_config()
    self.fusion_encoder = FUSIONS.get(self.fusion)(
        num_layers=self.num_layers, block=block, droppath_rate=self.droppath_rate,
        droppath_schedule=self.droppath_schedule, fusion_layer=self.fusion_layer,
        num_bottlenecks=self.num_bottlenecks, shared_weights=self.shared_weights,
        fit_weights=self.fit_weights)
    self.combiner = heads.Combine(self.combine, dtype=dtype)
    dense = lambda n: nn.Dense(n, use_bias=False, dtype=dtype)
    classifier = lambda n: heads.ClassifierHead(n, self.head_hidden_dim, self.head_zeroinit,
                                                dtype)
    if "itc" in weights or "itm" in weights:
      self.image_proj, self.text_proj = dense(self.embed_dim), dense(self.embed_dim)
      if "itm" in weights and self.contrastive_impl == "ring":
        raise ValueError("contrastive_impl='ring' cannot serve the 'itm' objective: its hard "
                         "negatives are drawn from the full similarity matrix, which the ring "
                         "never builds; use contrastive_impl='dense' with itm.")
      self.contrastive = heads.ContrastiveHead(self.contrastive_loss, impl=self.contrastive_impl)
    if "vqa" in weights and self.vqa_mode == "classify":
      self.vqa_head = classifier(self.num_answers)
    if "vqa" in weights and self.vqa_mode == "generate":
      self.answer_decoder = TextDecoder(text_vocab, block, self.width, self.decoder_layers,
                                        max_len=self.max_answer_len + 1)
    if "classify" in weights:
      self.cls_head = classifier(self.num_classes)
    if "itm" in weights:
      self.itm_head = classifier(2)
    if "caption" in weights:
      self.caption_decoder = TextDecoder(text_vocab, block, self.width, self.decoder_layers,
                                         max_len=self.max_text_len + 1)

  @nn.nowrap  # no module context: position_grids builds tokenizers outside setup too
  def _tokenizer(self, modality: str, dtype) -> nn.Module:
    kind = MODALITY_KINDS[modality]
    if kind == "text":
      return tokenizers.TextTokenizer(
          self.vocab_size + NUM_SPECIAL_TOKENS, self.width, self.max_text_len,
          shared_embedding=self.token_embed, dtype=dtype, name_in_batch=modality)
    if kind == "image":
      return tokenizers.ImageTokenizer(self.patch_size, self.width, dtype)
    if kind == "video":
      return tokenizers.VideoTokenizer(tuple(self.video_patch_size), self.width, dtype)
    if kind == "audio":
      return tokenizers.AudioTokenizer(
          self.audio_patch_size, self.width, sample_rate=self.sample_rate,
          frame_length=self.frame_length, hop_length=self.hop_length,
          num_mel_bins=self.num_mel_bins, dtype=dtype)
    return tokenizers.SensorTokenizer(self.sensor_window, self.width, dtype)

  @nn.nowrap
  def position_grids(self, batch: Batch) -> Dict[str, PositionGrid]:
    """The patch-grid position tables of the image / audio tokenizers `batch` feeds."""
    grids = {}
    for m in self.used_modalities():
      if MODALITY_KINDS[m] in ("image", "audio") and m in batch:
        grid = self._tokenizer(m, jnp.float32).grid(batch[m].shape)
        grids[f"embed_{m}/embeddings/pos_embedding"] = PositionGrid(0, *grid)
    return grids

  # ------------------------------------------------------------------------ encoders

  def check_batch(self, batch: Batch, keys: Sequence[str]) -> None:
    """Raises ValueError naming the expected keys / batch size / token range."""
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f"The batch lacks {missing}; this model (objectives "
                       f"{sorted(self.objective_weights())}) reads {list(keys)}; got keys "
                       f"{sorted(batch)}.")
    sizes = {k: batch[k].shape[0] for k in keys}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"Every batch entry must have the same batch size; got {sizes}.")
    for k in keys:
      if MODALITY_KINDS.get(k) == "text":
        tokenizers.check_token_ids(batch[k], self.vocab_size, k)

  def encode(self, batch: Batch, modalities: Sequence[str], *, train: bool = False,
             overrides: Optional[Mapping[str, Array]] = None) -> Tuple[Dict, Dict]:
    """Tokenizes `modalities` and fuses them -> ({m: tokens [B, N_m, D]}, {m: mask})."""
    tokens, masks = {}, {}
    for m in modalities:
      inputs = overrides[m] if overrides and m in overrides else batch[m]
      if MODALITY_KINDS[m] == "text":  # a tokenizer whose pad id is a real token sends a mask
        tokens[m], masks[m] = self.embed[m](inputs, batch.get(f"{m}_mask"))
      else:
        tokens[m], masks[m] = self.embed[m](inputs)
    return self.fusion_encoder(tokens, masks, deterministic=not train), masks

  def pooled(self, batch: Batch, modalities: Sequence[str], *, train: bool = False,
             overrides: Optional[Mapping[str, Array]] = None) -> Array:
    """Fused, mean-pooled per modality, combined: [B, D'] (what the heads classify)."""
    encoded, masks = self.encode(batch, modalities, train=train, overrides=overrides)
    return self.combiner([heads.masked_mean(encoded[m], masks[m]) for m in modalities])

  def embed_image(self, batch: Batch, *, train: bool = False) -> Array:
    """L2-normalised contrastive image embeddings [B, embed_dim] (the image alone)."""
    encoded, masks = self.encode(batch, ("image",), train=train)
    return heads.l2_normalize(self.image_proj(heads.masked_mean(encoded["image"], masks["image"])))

  def embed_text(self, batch: Batch, *, train: bool = False) -> Array:
    """L2-normalised contrastive caption embeddings [B, embed_dim] (the caption alone)."""
    encoded, masks = self.encode(batch, ("text",), train=train)
    return heads.l2_normalize(self.text_proj(heads.masked_mean(encoded["text"], masks["text"])))

  def fused_logits(self, batch: Batch, *, train: bool = False) -> Array:
    """VQA (or classification) logits from the fused `modalities`."""
    head = self.vqa_head if "vqa" in self.objective_weights() else self.cls_head
    return head(self.pooled(batch, self.modalities, train=train))

  # ---------------------------------------------------------------------- objectives

  def _sample_key(self, train: bool) -> Optional[Array]:
    """The one "sample" key of a training call (None in evaluation): drawn once, first,
    so that `features` and `feature_context` see the same key; objectives fold in a tag."""
    return self.make_rng("sample") if train and self.has_rng("sample") else None

  def _itm_negatives(self, batch, zimg, ztxt, key) -> Dict[str, Array]:
    """Hard-negative inputs per row (a text per image, an image per text) drawn from these
    rows' similarities; padding rows (`valid` False) are never negatives."""
    n = batch["image"].shape[0]
    if n < 2 and self.is_initializing():  # init on one device sees one row: shapes only
      return {"itm_negative_text": batch["text"], "itm_negative_image": batch["image"]}
    neg_text, neg_image = losses.hard_negatives(
        zimg @ ztxt.T, None if key is None else jax.random.fold_in(key, 1),
        example_ids=example_ids(batch), candidates=batch.get("valid"))
    return {"itm_negative_text": batch["text"][neg_text],
            "itm_negative_image": batch["image"][neg_image]}

  def _itm(self, batch, negatives, train):
    """Matching on each positive and its 2 hard negatives -> (nll [B], correct [B])."""
    images = jnp.concatenate([batch["image"], batch["image"], negatives["itm_negative_image"]])
    texts = jnp.concatenate([batch["text"], negatives["itm_negative_text"], batch["text"]])
    n = batch["image"].shape[0]
    pairs = {"image": images, "text": texts}
    logits = self.itm_head(self.pooled(pairs, ("image", "text"), train=train))
    labels = jnp.concatenate([jnp.ones(n, jnp.int32), jnp.zeros(2 * n, jnp.int32)])
    hits = metrics.correct(logits, labels).reshape(3, n)
    nll = losses.cross_entropy(logits, labels).reshape(3, n)
    return jnp.mean(nll, axis=0), jnp.mean(hits, axis=0)

  def _mlm(self, batch, key, train):
    """Masked caption tokens predicted from the (image, caption) fusion; token stats."""
    # Evaluation: a fixed mask per example, so that numbers are comparable between runs.
    key = jax.random.key(0) if key is None else jax.random.fold_in(key, 2)
    corrupted, targets = losses.mask_tokens(
        key, batch["text"], mask_id=self.vocab_size, vocab_size=self.vocab_size,
        rate=self.mlm_rate, example_ids=example_ids(batch))
    encoded, _ = self.encode(batch, ("image", "text"), train=train,
                             overrides={"text": corrupted})
    logits = self.token_embed.attend(encoded["text"]).astype(jnp.float32)
    return metrics.token_statistics(logits, targets)

  def caption_targets(self, text: Array, mask: Optional[Array] = None) -> Tuple[Array, Array]:
    """Decoder inputs [BOS, t_1..t_L] and targets [t_1..t_L, 0] with EOS after the last token.

    Padding is `mask` when the pipeline sends one (a tokenizer whose pad id is a real
    token), else id 0; it becomes 0, the decoder's padding target, either way (so a real
    id 0 inside a masked text, CLIP's "!", is not scored as a target).
    """
    bos, eos = self.vocab_size + 1, self.vocab_size + 2
    if mask is not None:
      text = jnp.where(mask, text, 0)
    batch = text.shape[0]
    inputs = jnp.concatenate([jnp.full((batch, 1), bos, text.dtype), text], axis=1)
    targets = jnp.concatenate([text, jnp.zeros((batch, 1), text.dtype)], axis=1)
    length = jnp.sum(text != 0 if mask is None else mask, axis=1)
    targets = targets.at[jnp.arange(batch), length].set(eos)
    return inputs, targets

  def _memory(self, batch: Batch, modalities: Sequence[str], train: bool) -> Tuple[Array, Array]:
    encoded, masks = self.encode(batch, modalities, train=train)
    return (jnp.concatenate([encoded[m] for m in modalities], axis=1),
            jnp.concatenate([masks[m] for m in modalities], axis=1))

  def caption_memory(self, batch: Batch, *, train: bool = False) -> Tuple[Array, Array]:
    """The fused `caption_from` tokens the decoder attends to: ([B, N, D], mask [B, N])."""
    return self._memory(batch, self.caption_from, train)

  def caption_logits(self, tokens: Array, memory: Array, memory_mask: Array, *,
                     train: bool = False, decode: bool = False) -> Array:
    return self.caption_decoder(tokens, memory, memory_mask, train=train, decode=decode)

  def vqa_memory(self, batch: Batch, *, train: bool = False) -> Tuple[Array, Array]:
    """The fused tokens of `modalities` the answer decoder attends to: ([B, N, D], [B, N])."""
    return self._memory(batch, self.modalities, train)

  def vqa_logits(self, tokens: Array, memory: Array, memory_mask: Array, *,
                 train: bool = False, decode: bool = False) -> Array:
    return self.answer_decoder(tokens, memory, memory_mask, train=train, decode=decode)

  def _generated_vqa(self, batch, train):
    """Teacher-forced answer tokens from the fused modalities; token statistics."""
    memory, memory_mask = self.vqa_memory(batch, train=train)
    inputs, targets = self.caption_targets(batch["answer_text"], batch.get("answer_text_mask"))
    return metrics.token_statistics(self.vqa_logits(inputs, memory, memory_mask, train=train),
                                    targets)

  def class_embeddings(self, prompt_tokens: Array, prompt_mask: Optional[Array] = None) -> Array:
    """Zero-shot prompts [C, P, L] (+ mask) -> contrastive text embeddings [C, P, embed_dim]."""
    if prompt_tokens.ndim != 3:
      raise ValueError("Zero-shot prompts must be token ids [classes, prompts, length]; got "
                       f"shape {prompt_tokens.shape}.")
    c, p, length = prompt_tokens.shape
    batch = {"text": prompt_tokens.reshape(c * p, length)}
    if prompt_mask is not None:
      batch["text_mask"] = prompt_mask.reshape(c * p, length)
    return self.embed_text(batch).reshape(c, p, -1)

  def zero_shot_logits(self, batch: Batch, class_embeddings: Array) -> Array:
    """Zero-shot class logits [B, C] of batch['image'] against prompt-ensembled classes."""
    return heads.zero_shot_logits(self.embed_image(batch), class_embeddings)

  def _caption(self, batch, train):
    memory, memory_mask = self.caption_memory(batch, train=train)
    inputs, targets = self.caption_targets(batch["text"], batch.get("text_mask"))
    logits = self.caption_logits(inputs, memory, memory_mask, train=train)
    return metrics.token_statistics(logits, targets)

  # ---------------------------------------------------------------- trainer contract

  def features(self, batch: Batch, train: bool = False) -> Dict[str, Array]:
    """Per-example features: contrastive embeddings, per-example losses and statistics."""
    weights = self.objective_weights()
    generate_vqa = "vqa" in weights and self.vqa_mode == "generate"
    keys = list(self.used_modalities())
    keys += [k for o, k in (("vqa", "answer_text" if generate_vqa else "answer"),
                            ("classify", "label")) if o in weights]
    self.check_batch(batch, keys)
    key = self._sample_key(train)
    out = {}
    if "itc" in weights or "itm" in weights:
      zimg, ztxt = self.embed_image(batch, train=train), self.embed_text(batch, train=train)
      out.update(image_embedding=zimg, text_embedding=ztxt)
    if ("vqa" in weights and not generate_vqa) or "classify" in weights:
      fused = self.pooled(batch, self.modalities, train=train)  # one pass serves both heads
    for objective, label, head in (("vqa", "answer", "vqa_head"), ("classify", "label", "cls_head")):
      if objective in weights and not (objective == "vqa" and generate_vqa):
        logits = getattr(self, head)(fused)
        out[f"{objective}_nll"] = losses.cross_entropy(logits, batch[label])
        out[f"{objective}_correct"] = metrics.correct(logits, batch[label])
    if "itm" in weights:
      # Negatives from the global batch when the trainer gives them (feature_context),
      # else from these rows (the whole batch without accumulation; the eval batch).
      negatives = {k: batch[k] for k in ITM_CONTEXT if k in batch}
      if len(negatives) != len(ITM_CONTEXT):
        negatives = self._itm_negatives(batch, zimg, ztxt, key)
      out["itm_nll"], out["itm_correct"] = self._itm(batch, negatives, train)
    tasks = [("mlm", lambda: self._mlm(batch, key, train)),
             ("caption", lambda: self._caption(batch, train))]
    if generate_vqa:  # answers as text: token statistics, like captions
      tasks.append(("vqa", lambda: self._generated_vqa(batch, train)))
    for objective, fn in tasks:
      if objective in weights:
        out.update({f"{objective}_{k}": v for k, v in fn().items()})
    return out

  def feature_context(self, features: Mapping[str, Array], batch: Batch) -> Dict[str, Array]:
    """ITM's hard negatives drawn from the global batch's similarities (training only)."""
    key = self._sample_key(train=True)
    if "itm" not in self.objective_weights():
      return {}
    zimg = jax.lax.stop_gradient(features["image_embedding"])
    ztxt = jax.lax.stop_gradient(features["text_embedding"])
    return self._itm_negatives(batch, zimg, ztxt, key)

  # ---------------------------------------------------------------------- generation

  def generation_tasks(self) -> Tuple[str, ...]:
    """What `generate` can write: "caption" and / or "vqa" (answers, vqa_mode="generate")."""
    weights = self.objective_weights()
    tasks = ("caption",) if "caption" in weights else ()
    return tasks + (("vqa",) if "vqa" in weights and self.vqa_mode == "generate" else ())

  def generate(self, variables, batch: Batch, *, task: str = "caption",
               beam_size: Optional[int] = None, max_len: Optional[int] = None,
               length_penalty: float = 0.0) -> Array:
    """Generated token ids [B, max_len] (0 after the end) of `task`; see generate_text."""
    return generate_text(self, variables, batch, task=task, beam_size=beam_size,
                         max_len=max_len, length_penalty=length_penalty)


  def loss_from_features(self, features: Mapping[str, Array],
                         train: bool = False) -> Tuple[Array, Dict[str, Array]]:
    del train
    weights = self.objective_weights()
    terms = {}
    if "itc" in weights or "itm" in weights:
      terms["itc"], _ = self.contrastive(features["image_embedding"], features["text_embedding"])
    for objective in ("vqa", "classify", "itm"):
      if objective in weights and f"{objective}_nll" in features:
        terms[objective] = jnp.mean(features[f"{objective}_nll"])
    for objective in ("mlm", "caption", "vqa"):  # token-weighted over the whole batch
      if objective in weights and f"{objective}_num_tokens" in features:
        terms[objective] = (jnp.sum(features[f"{objective}_nll_sum"])
                            / jnp.maximum(jnp.sum(features[f"{objective}_num_tokens"]), 1))
    total = sum(weights[k] * terms[k] for k in weights)
    logged = {f"{k}_loss": v for k, v in terms.items()}
    for objective in ("vqa", "classify"):
      if f"{objective}_correct" in features:
        logged[f"{objective}_accuracy"] = jnp.mean(features[f"{objective}_correct"])
    if "itc" in weights or "itm" in weights:
      scale = jnp.exp(self.contrastive.variables["params"]["logit_scale"])
      logged["logit_scale"] = jnp.minimum(scale, self.contrastive.max_scale)  # in effect
    return total, logged

  def evaluate(self, batch: Batch) -> Dict[str, Array]:
    return self.features(batch, train=False)

  @staticmethod
  def summarize(outputs: Mapping[str, np.ndarray]) -> Dict[str, float]:
    summary = {}
    if "image_embedding" in outputs:
      summary.update(metrics.retrieval_recall(outputs["image_embedding"],
                                              outputs["text_embedding"]))
    for key in ("vqa_correct", "classify_correct", "itm_correct"):
      if key in outputs:
        summary[key.replace("_correct", "_accuracy")] = float(np.mean(outputs[key]))
    for objective in ("mlm", "caption", "vqa"):
      if f"{objective}_num_tokens" in outputs:
        stats = {k: outputs[f"{objective}_{k}"]
                 for k in ("nll_sum", "correct_tokens", "num_tokens")}
        summary.update({f"{objective}_{k}": v for k, v in metrics.summarize_tokens(stats).items()})
    return summary


@MODELS.register("captioning")
class CaptioningModel(MultimodalModel):
  """Encoder-decoder captioner: the multimodal model with only the caption objective."""
  modalities: Sequence[str] = ("image",)
  loss_weights: Mapping[str, float] = None

  def objective_weights(self) -> Dict[str, float]:
    if self.loss_weights is None:
      return {"caption": 1.0}
    return super().objective_weights()


def generate_captions(model: MultimodalModel, variables, batch: Batch, *,
                      beam_size: Optional[int] = None, max_len: Optional[int] = None,
                      length_penalty: float = 0.0) -> Array:
  """Captions [B, max_len] (data token ids, 0 after the end); see generate_text."""
  return generate_text(model, variables, batch, task="caption", beam_size=beam_size,
                       max_len=max_len, length_penalty=length_penalty)


def generate_text(model: MultimodalModel, variables, batch: Batch, *, task: str = "caption",
                  beam_size: Optional[int] = None, max_len: Optional[int] = None,
                  length_penalty: float = 0.0) -> Array:
  """Captions or answers [B, max_len] (data token ids, 0 after the end): greedy decoding
  when `beam_size` is None, else beam search. Jit it with `static_argnames=("task",
  "beam_size", "max_len")` (and the model bound by functools.partial) to compile once.

  Encodes the decoder's memory once (`caption_from`, or the fused `modalities` for
  "vqa"), sizes the decoder's key/value cache for B * beam_size rows (zeros:
  `jax.eval_shape`, no decoder pass) and runs decoding.py.
  """
  if task not in model.generation_tasks():
    raise ValueError(f"This model generates {model.generation_tasks() or 'nothing'}; got task "
                     f"{task!r} (captions need the 'caption' objective, answers "
                     f"vqa_mode='generate'; loss_weights={model.loss_weights}).")
  limit = (model.max_text_len if task == "caption" else model.max_answer_len) + 1
  max_len = max_len or limit
  if max_len > limit:
    raise ValueError(f"max_len={max_len} exceeds the {task} decoder's {limit} positions.")
  params = {"params": variables["params"]}
  memory, mask = model.apply(params, batch, method=f"{task}_memory")
  batch_size = memory.shape[0]
  rows = batch_size * (beam_size or 1)
  memory, mask = (jnp.repeat(x, rows // batch_size, axis=0) for x in (memory, mask))

  def run(tokens, cache=None):
    v = dict(params, cache=cache) if cache is not None else params
    return model.apply(v, tokens, memory, mask, decode=True, method=f"{task}_logits",
                       mutable=["cache"])

  shapes = jax.eval_shape(lambda: run(jnp.zeros((rows, max_len), jnp.int32)))[1]["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  bos, eos = model.vocab_size + 1, model.vocab_size + 2
  never = jnp.array([0, model.vocab_size, bos])  # padding, MASK and BOS are never emitted

  def step_fn(token, cache):
    logits, updated = run(token[:, None], cache)
    return logits[:, 0].at[:, never].set(-jnp.inf), updated["cache"]

  if beam_size is None:
    tokens = decoding.greedy_decode(step_fn, cache, batch_size=batch_size, max_len=max_len,
                                    bos_id=bos, eos_id=eos)
  else:
    tokens, _ = decoding.beam_search(step_fn, cache, batch_size=batch_size,
                                     beam_size=beam_size, max_len=max_len, bos_id=bos,
                                     eos_id=eos, length_penalty=length_penalty)
  return jnp.where(tokens == eos, 0, tokens)


def example_model_and_batch(fusion: str = "hybrid", batch_size: int = 4, **overrides):
  """A small demo-shaped model and a random batch (image, question, audio, sensor, text).

  The shared configuration of the fusion table (`python -m mmjax.models.flops`) and of
  the tests: width 64, 4 layers, 32x32 images, 0.5 s of 16 kHz audio, 32-step sensors.
  """
  fields = dict(fusion=fusion, modalities=("image", "question", "audio", "sensor"),
                width=64, num_layers=4, num_heads=4, mlp_dim=256, vocab_size=100,
                max_text_len=16, num_answers=10, loss_weights={"itc": 1.0, "vqa": 1.0})
  # Mid fusion through 4 bottleneck tokens (MBT), where the strategy has these fields.
  if fusion in FUSIONS:  # (an unknown one is the model's error, raised at init)
    fields.update(_fusion.fields_for(fusion, dict(fusion_layer=2, num_bottlenecks=4)))
  fields.update(overrides)
  model = MultimodalModel(**fields)
  rng = np.random.default_rng(0)
  length = fields["max_text_len"]
  batch = {
      "image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
      "audio": rng.normal(size=(batch_size, 8000)).astype(np.float32),
      "sensor": rng.normal(size=(batch_size, 32, 6)).astype(np.float32),
      "text": rng.integers(1, fields["vocab_size"], (batch_size, length)).astype(np.int32),
      "question": rng.integers(1, fields["vocab_size"], (batch_size, length)).astype(np.int32),
      "answer": rng.integers(0, max(fields["num_answers"], 1), (batch_size,)).astype(np.int32),
      "label": rng.integers(0, 10, (batch_size,)).astype(np.int32),
  }
  batch["text"][:, length // 2:] = 0  # some padding
  return model, {k: jnp.asarray(v) for k, v in batch.items()}
