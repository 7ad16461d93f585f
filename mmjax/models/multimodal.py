"""The multimodal model: modality tokenizers -> fusion strategy -> objectives.

    batch ──► tokenizers (one per modality, shared width) ──► fusion (config.model.fusion)
          ──► objectives (their heads, losses, evaluation summaries)

Objectives live in mmjax/models/objectives/, one file each, registered by name; the
model runs those `loss_weights` gives a positive weight (the total loss is the weighted
sum; every term is also logged as `{objective}_loss`), plus those they need:

  itc       image-text contrastive (CLIP / SigLIP), retrieval recall     objectives/itc.py
  itm       image-text matching with hard negatives (needs itc)          objectives/itm.py
  mlm       masked language modelling of the caption with the image      objectives/mlm.py
  vqa       answers over `num_answers`, or generated (`vqa_mode`)        objectives/vqa.py
  classify  classes of the fused `modalities` over `num_classes`         objectives/classify.py
  caption   a causal decoder writes the caption from `caption_from`      objectives/caption.py

A fork adds one in its own file (see objectives/base.py for what an objective defines).
The model owns what the objectives share: the tokenizers, the fusion encoder, the
`combine` of pooled modalities, and the encoder passes `encode`, `pooled`, `memory`,
`embed_image` / `embed_text`; objective settings (`num_answers`, `mlm_rate`, ...) are
fields of this model, so a config sets every one of them as `config.model.X`.

Generation: `generation_tasks()` names what the model can write ("caption", "vqa") and
`generate(variables, batch, task=...)` decodes it greedily or with beam search.

Zero-shot classification (as two_tower): `class_embeddings(prompt_tokens)` embeds class
prompts with the contrastive text path, `zero_shot_logits(batch, class_embeddings)`.

Trainer contract: `features` gives each objective's per-example features (embeddings,
per-example losses and statistics), `loss_from_features` the weighted total over the
batch (token objectives weighted by tokens over the whole batch), and `feature_context`
ITM's negatives from the global batch, so gradient accumulation is exact for every
objective (mmjax/models/base.py).

Token ids: the data vocabulary is [0, vocab_size) with 0 = padding; the model appends
three ids of its own, MASK = vocab_size, BOS = vocab_size + 1, EOS = vocab_size + 2.

Parameter tree (names are the checkpoint format): `token_embed` (shared by the text
modalities), `embed_{modality}` (tokenizers), `fusion_encoder` (see fusion.py),
`combiner`, and the objectives' heads under the names they give: `image_proj` /
`text_proj` / `contrastive` (itc), `itm_head`, `vqa_head` or `answer_decoder`, `cls_head`,
`caption_decoder`. tests/test_multimodal_params.py holds them fixed.
"""
from typing import Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import decoding, heads, tokenizers
from mmjax.models.base import Model
from mmjax.models.objectives import RUN_ORDER, FeaturePass, Objective
from mmjax.models.objectives.caption import teacher_forcing
from mmjax.nn.embed import PositionGrid, TokenEmbed
from mmjax.nn.transformer import BlockConfig
from mmjax.registry import FUSIONS, MODELS, OBJECTIVES

# Importing fusion registers the built-in strategies.
from mmjax.models import fusion as _fusion  # noqa: F401  pylint: disable=unused-import

Array = jax.Array
Batch = Mapping[str, Array]

# Batch key -> tokenizer kind. `question` and `text` (caption) are both text.
MODALITY_KINDS = {"image": "image", "video": "video", "audio": "audio", "sensor": "sensor",
                  "text": "text", "question": "text"}
NUM_SPECIAL_TOKENS = 3  # MASK, BOS, EOS appended after the data vocabulary


def fusion_names():
  return FUSIONS.names()


def _run_rank(objective: str, model=None) -> float:
  """Built-in objectives run in RUN_ORDER; a fork's after them (a stable sort keeps the
  order of `loss_weights`, objectives they need first)."""
  if objective == "vqa" and model is not None and model.vqa_mode == "generate":
    # Generated answers run after captions, as before objectives were modules: the order
    # fixes which dropout draws each fusion pass gets.
    return RUN_ORDER.index("caption") + 0.5
  return RUN_ORDER.index(objective) if objective in RUN_ORDER else len(RUN_ORDER)


@MODELS.register("multimodal")
class MultimodalModel(Model):
  """Tokenizers + a registered fusion strategy + the objectives `loss_weights` names
  (mmjax/models/objectives/, one file each)."""
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

  num_special_tokens = NUM_SPECIAL_TOKENS  # not a field: the token ids are fixed

  # ----------------------------------------------------------------------------- setup

  def objective_weights(self) -> Dict[str, float]:
    weights = dict(self.loss_weights if self.loss_weights is not None
                   else {"itc": 1.0, "vqa": 1.0})
    unknown = sorted(set(weights) - set(OBJECTIVES.names()))
    if unknown:
      raise ValueError(f"Unknown objectives {unknown} in loss_weights; expected some of "
                       f"{OBJECTIVES.names()} (a fork's once `config.imports` imports it).")
    active = {k: float(v) for k, v in weights.items() if v}
    if not active:
      raise ValueError(f"loss_weights {weights} enables no objective; give at least one of "
                       f"{OBJECTIVES.names()} a non-zero weight.")
    return active

  def block_config(self) -> BlockConfig:
    """The settings of every Transformer block: the fusion layers and the text decoders."""
    return BlockConfig.of(self)

  def objectives(self) -> Dict[str, Objective]:
    """The objectives this model runs, in the order they run: those `loss_weights`
    enables and those they need (built-ins in RUN_ORDER, then a fork's)."""
    composed = {}

    def add(name):
      if name not in composed:
        objective = OBJECTIVES.get(name)()
        for needed in objective.needs:
          add(needed)
        composed[name] = objective
    for name in self.objective_weights():
      add(name)
    return {name: composed[name]
            for name in sorted(composed, key=lambda name: _run_rank(name, self))}

  def used_modalities(self) -> Tuple[str, ...]:
    """Every batch key the enabled objectives read as a modality."""
    composed = self.objectives()
    names = list(self.objective_weights()) + list(composed)
    return tuple(dict.fromkeys(m for name in names for m in composed[name].inputs(self)))

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    for m in tuple(self.modalities) + tuple(self.caption_from):
      if m not in MODALITY_KINDS:
        raise ValueError(f"Unknown modality {m!r}; expected one of {sorted(MODALITY_KINDS)}.")
    if not self.modalities:
      raise ValueError("`modalities` is empty; list the batch keys to fuse, e.g. "
                       "('image', 'question').")
    for objective in self.objectives().values():
      objective.check(self)
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
    # Each objective's heads, under the names it gives: they are the parameter names.
    for objective_name, objective in self.objectives().items():
      for name, head in objective.heads(self).items():
        if hasattr(self, name):
          raise ValueError(f"Objective {objective_name!r} names a head {name!r}, which the "
                           "model already has (a field, method or another objective's head).")
        setattr(self, name, head)

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
             overrides: Optional[Mapping[str, Array]] = None,
             combiner: Optional[nn.Module] = None) -> Array:
    """Fused, mean-pooled per modality, combined (by the model's `combiner` unless another
    is given): [B, D'] (what the heads classify)."""
    encoded, masks = self.encode(batch, modalities, train=train, overrides=overrides)
    combiner = combiner or self.combiner
    return combiner([heads.masked_mean(encoded[m], masks[m]) for m in modalities])

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

  def memory(self, batch: Batch, modalities: Sequence[str], *,
             train: bool = False) -> Tuple[Array, Array]:
    """The fused tokens of `modalities`, concatenated, for a decoder to cross-attend to:
    ([B, N, D], mask [B, N])."""
    encoded, masks = self.encode(batch, modalities, train=train)
    return (jnp.concatenate([encoded[m] for m in modalities], axis=1),
            jnp.concatenate([masks[m] for m in modalities], axis=1))

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

  # ---------------------------------------------------------------- trainer contract

  def _sample_key(self, train: bool) -> Optional[Array]:
    """The one "sample" key of a training call (None in evaluation): drawn once, first,
    so that `features` and `feature_context` see the same key; objectives fold in a tag."""
    return self.make_rng("sample") if train and self.has_rng("sample") else None

  def features(self, batch: Batch, train: bool = False) -> Dict[str, Array]:
    """Per-example features of every objective, computed in turn (see objectives/)."""
    composed = self.objectives()
    targets = [k for objective in composed.values() for k in objective.targets(self)]
    self.check_batch(batch, tuple(dict.fromkeys(list(self.used_modalities()) + targets)))
    run = FeaturePass(train=train, key=self._sample_key(train))
    for objective in composed.values():
      run.features.update(objective.features(self, batch, run))
    return run.features

  def feature_context(self, features: Mapping[str, Array], batch: Batch) -> Dict[str, Array]:
    """Per-example entries drawn from the global batch's features (ITM's hard negatives)."""
    key = self._sample_key(train=True)
    context = {}
    for objective in self.objectives().values():
      context.update(objective.context(self, features, batch, key))
    return context

  def loss_from_features(self, features: Mapping[str, Array],
                         train: bool = False) -> Tuple[Array, Dict[str, Array]]:
    """The weighted sum of the objectives' losses; each logged as `{objective}_loss`."""
    del train
    weights = self.objective_weights()
    terms, logged = {}, {}
    for name, objective in self.objectives().items():
      terms[name], metrics = objective.loss(self, features)
      logged.update(metrics)
    total = sum(weights[k] * terms[k] for k in weights)  # needed-only objectives: logged
    return total, {**{f"{k}_loss": v for k, v in terms.items()}, **logged}

  def evaluate(self, batch: Batch) -> Dict[str, Array]:
    return self.features(batch, train=False)

  @staticmethod
  def summarize(outputs: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """Every registered objective's summary of its outputs (those absent give none)."""
    summary = {}
    for name in sorted(OBJECTIVES, key=_run_rank):
      summary.update(OBJECTIVES.get(name).summarize(outputs))
    return summary

  # ---------------------------------------------------------------------- generation

  def generation_tasks(self) -> Tuple[str, ...]:
    """What `generate` can write: "caption" and / or "vqa" (answers, vqa_mode="generate")."""
    return tuple(name for name, objective in self.objectives().items()
                 if objective.generates(self))

  def generate(self, variables, batch: Batch, *, task: str = "caption",
               beam_size: Optional[int] = None, max_len: Optional[int] = None,
               length_penalty: float = 0.0) -> Array:
    """Generated token ids [B, max_len] (0 after the end) of `task`; see generate_text."""
    return generate_text(self, variables, batch, task=task, beam_size=beam_size,
                         max_len=max_len, length_penalty=length_penalty)

  # `method=` entry points of the decoders (objectives/caption.py and vqa.py).
  def caption_targets(self, text: Array, mask: Optional[Array] = None) -> Tuple[Array, Array]:
    return teacher_forcing(text, mask, self.vocab_size)

  def caption_memory(self, batch: Batch, *, train: bool = False) -> Tuple[Array, Array]:
    return OBJECTIVES.get("caption")().memory(self, batch, train=train)

  def caption_logits(self, tokens: Array, memory: Array, memory_mask: Array, *,
                     train: bool = False, decode: bool = False) -> Array:
    return OBJECTIVES.get("caption")().logits(self, tokens, memory, memory_mask, train=train,
                                              decode=decode)

  def vqa_memory(self, batch: Batch, *, train: bool = False) -> Tuple[Array, Array]:
    return OBJECTIVES.get("vqa")().memory(self, batch, train=train)

  def vqa_logits(self, tokens: Array, memory: Array, memory_mask: Array, *,
                 train: bool = False, decode: bool = False) -> Array:
    return OBJECTIVES.get("vqa")().logits(self, tokens, memory, memory_mask, train=train,
                                          decode=decode)


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

  Encodes the decoder's memory once (the `task` objective's `memory`: `caption_from`, or
  the fused `modalities` for "vqa"), sizes the decoder's key/value cache for
  B * beam_size rows (zeros: `jax.eval_shape`, no decoder pass) and runs decoding.py.
  """
  if task not in model.generation_tasks():
    raise ValueError(f"This model generates {model.generation_tasks() or 'nothing'}; got task "
                     f"{task!r} (captions need the 'caption' objective, answers "
                     f"vqa_mode='generate'; loss_weights={model.loss_weights}).")
  objective = OBJECTIVES.get(task)()
  limit = objective.max_len(model) + 1
  max_len = max_len or limit
  if max_len > limit:
    raise ValueError(f"max_len={max_len} exceeds the {task} decoder's {limit} positions.")
  params = {"params": variables["params"]}
  memory, mask = model.apply(params, batch, method=objective.memory)
  batch_size = memory.shape[0]
  rows = batch_size * (beam_size or 1)
  memory, mask = (jnp.repeat(x, rows // batch_size, axis=0) for x in (memory, mask))

  def run(tokens, cache=None):
    v = dict(params, cache=cache) if cache is not None else params
    return model.apply(v, tokens, memory, mask, decode=True, method=objective.logits,
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
