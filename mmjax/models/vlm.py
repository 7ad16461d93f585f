"""A generative vision-language model (PaliGemma-style), registered as model "vlm".

    image ─► ViT / SigLIP encoder (all patch tokens) ─► projector (linear | 2-layer MLP) ─┐
    prefix (prompt ids) ─► LM token embedding ──────────────────────────────────────────┤
    suffix (target ids) ─► LM token embedding ──────────────────────────────────────────┘
        ─► decoder-only LM (Gemma / Llama blocks: RMSNorm, RoPE, GQA, gated MLP) ─► logits

The LM may be a Gemma 2 (post-norms, soft-capped attention and logits, sliding-window
local layers: the fields after `tie_embeddings`, all off by default).

Attention (`prefix_attention`): "full" is PaliGemma's prefix-LM, the image tokens and
the prompt see each other in both directions and the suffix is causal; "causal" makes
the whole sequence causal (the ablation of the PaliGemma paper). The loss is the
next-token cross-entropy on the suffix only.

Batch (see mmjax.data): `image` [B, H, W, 3]; `prefix` int32 [B, P], the prompt,
right-padded with 0, at least one token per row; `suffix` int32 [B, S], the target
ending with `eos_id`, right-padded with 0; optional `task` int32 [B] (0 caption, 1 VQA
answer; see mmjax.data.preprocess.VLM_TASKS) says which metric scores a row.

Layout of one sequence: [image tokens | prompt, padding moved in front of it | suffix].
Padding is masked out as a key and does not consume rotary positions, so a prompt's
first token is always at position `num_image_tokens`, whatever its padding.

Generation (`generate_tokens`; `generate` for the evaluator): the image and prompt are
computed once into the key/value cache (the prefill, with the prefix-LM mask), then
greedy, beam or temperature / top-k decoding continues token by token (decoding.py).

Metrics: `loss` logs the suffix loss and token accuracy, `evaluate` / `summarize` the
teacher-forced suffix perplexity. Generated text is scored by the generation
evaluation (`config.generation.decode`, mmjax/train/text_eval.py): for each of `tasks`
("caption", "vqa") it calls `generate`, decodes with the data's tokenizer and logs
eval/cider, eval/bleu4, ... and eval/vqa_accuracy.

Parameter tree: `image_encoder` (a "vit" with pool_type "none"), `projection`
(`kernel`/`bias`, or `fc1`/`fc2` for the MLP), `lm` (see language_model.py). The
encoder is frozen with `config.optimizer.frozen = ("image_encoder/.*",)`.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import metrics
from mmjax.models import decoding as decoding_lib
from mmjax.models.base import Model
from mmjax.models.language_model import DecoderLM
from mmjax.models.vit import ViT
from mmjax.nn.embed import PositionGrid
from mmjax.nn.lm_block import LMBlockConfig
from mmjax.nn.transformer import Mlp
from mmjax.registry import MODELS

Array = jax.Array
Batch = Mapping[str, Array]

PREFIX_ATTENTION = ("full", "causal")
PROJECTORS = ("linear", "mlp")
DECODINGS = ("greedy", "beam", "sample")
# The image tower: every patch token, no class token, no head (PaliGemma's SigLIP use).
_ENCODER_FIXED = dict(pool_type="none", num_classes=0, class_token=False)
_ENCODER_DEFAULT = dict(variant="So400m/14", activation="gelu_tanh", layer_norm_epsilon=1e-6)


def move_padding_first(tokens: Array) -> Array:
  """Right-padded ids [B, L] -> the same ids with their padding in front (left-padded)."""
  length = tokens.shape[1]
  shift = jnp.sum(tokens != 0, axis=1, keepdims=True)
  return jnp.take_along_axis(tokens, (jnp.arange(length)[None] + shift) % length, axis=1)


def prefix_lm_mask(valid: Array, num_prefix: int, full_prefix: bool) -> Array:
  """bool [B, 1, T, T]: causal, the first `num_prefix` positions mutually visible when
  `full_prefix`, padding (`valid` False) never visible as a key."""
  length = valid.shape[1]
  i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  allowed = j <= i
  if full_prefix:
    allowed = allowed | ((i < num_prefix) & (j < num_prefix))
  return allowed[None, None] & valid[:, None, None, :]


def positions_of(valid: Array) -> Array:
  """Rotary positions [B, T]: 0, 1, ... over the valid tokens (padding repeats one)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


@MODELS.register("vlm")
class VLM(Model):
  """Image encoder -> projector -> decoder-only LM with a prefix-LM mask."""
  SUB_MODELS = {"encoder": "vit"}  # `encoder` holds "vit" fields (config keys checked as such)
  # Image encoder: fields of the "vit" model (variant, width, depth, patch_size, ...).
  encoder: Optional[Mapping[str, Any]] = None   # None: SigLIP So400m/14
  projector: str = "linear"                     # "linear" | "mlp" (2 layers, GELU)
  # Language model (defaults: Gemma 2B).
  vocab_size: int = 257_152
  width: int = 2048
  depth: int = 18
  num_heads: int = 8
  num_kv_heads: Optional[int] = 1
  head_dim: int = 256
  mlp_dim: int = 16_384
  activation: str = "gelu_tanh"                 # GeGLU; "silu": SwiGLU (Llama)
  norm_epsilon: float = 1e-6
  norm_scale_offset: float = 1.0                # Gemma RMSNorm (1 + scale); Llama 0
  rope_base: float = 10_000.0
  embed_scale: bool = True                      # Gemma: embeddings x sqrt(width)
  tie_embeddings: bool = True
  # Gemma 2 (defaults off: Gemma 1 / Llama); see language_model.py and lm_block.py.
  post_norms: bool = False                      # RMSNorm after attention and MLP
  query_pre_attn_scalar: Optional[float] = None  # scores x this^-1/2 (None: head_dim)
  attn_logit_softcapping: Optional[float] = None   # scores -> c tanh(scores / c)
  final_logit_softcapping: Optional[float] = None  # logits -> c tanh(logits / c)
  sliding_window: Optional[int] = None          # local layers see |p_q - p_k| < window
  sliding_window_pattern: int = 2               # every n-th layer global, others local
  prefix_attention: str = "full"                # "full" (prefix-LM) | "causal"
  tasks: Tuple[str, ...] = ("caption",)         # what the generation evaluation asks for
  # Generation (`generate_tokens`; the evaluation decodes as config.generation says).
  eos_id: int = 1                               # Gemma's <eos>
  max_decode_len: int = 32
  decoding: str = "greedy"                      # "greedy" | "beam" | "sample"
  beam_size: int = 4
  temperature: float = 1.0
  top_k: int = 0
  dtype: str = "float32"
  implementation: Optional[str] = None
  # Both towers' blocks recomputed in the backward pass (REMAT_POLICIES in nn.transformer);
  # `encoder.remat_policy` sets the image tower's alone.
  remat_policy: str = "none"

  def encoder_config(self) -> Dict[str, Any]:
    """The ViT fields of the image tower."""
    given = dict(self.encoder or {})
    clash = {k: given[k] for k in _ENCODER_FIXED if k in given and given[k] != _ENCODER_FIXED[k]}
    if clash:
      raise ValueError(f"vlm.encoder must output every patch token; given {clash}, expected "
                       f"{ {k: _ENCODER_FIXED[k] for k in clash} } (or leave them out).")
    return {**_ENCODER_DEFAULT, "remat_policy": self.remat_policy, **given, **_ENCODER_FIXED}

  @nn.nowrap  # plain arithmetic: callable on an unbound model
  def position_grids(self, batch: Batch) -> Dict[str, PositionGrid]:
    """The image encoder's position table ('image_encoder/pos_embedding')."""
    tower = ViT(**self.encoder_config())
    return {f"image_encoder/{k}": v for k, v in tower.position_grids(batch).items()}

  def lm_module(self, decode: bool = False) -> DecoderLM:
    """The LM; `decode=True` gives an unbound copy with a key/value cache (generate)."""
    block = LMBlockConfig(
        num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim,
        num_kv_heads=self.num_kv_heads, activation=self.activation,
        norm_epsilon=self.norm_epsilon, norm_scale_offset=self.norm_scale_offset,
        rope_base=self.rope_base, implementation=self.implementation,
        post_norms=self.post_norms, query_pre_attn_scalar=self.query_pre_attn_scalar,
        attn_logit_softcapping=self.attn_logit_softcapping,
        sliding_window=self.sliding_window)
    return DecoderLM(self.vocab_size, self.width, self.depth, block,
                     embed_scale=self.embed_scale, tie_embeddings=self.tie_embeddings,
                     sliding_window_pattern=self.sliding_window_pattern,
                     final_logit_softcapping=self.final_logit_softcapping,
                     remat_policy=self.remat_policy, decode=decode, dtype=jnp.dtype(self.dtype),
                     **(dict(parent=None) if decode else dict(name="lm")))

  def setup(self):
    for field, value, allowed in (("prefix_attention", self.prefix_attention, PREFIX_ATTENTION),
                                  ("projector", self.projector, PROJECTORS),
                                  ("decoding", self.decoding, DECODINGS)):
      if value not in allowed:
        raise ValueError(f"vlm.{field}={value!r}; expected one of {allowed}.")
    dtype = jnp.dtype(self.dtype)
    self.image_encoder = ViT(**self.encoder_config(), dtype=dtype,
                             implementation=self.implementation)
    if self.projector == "linear":
      # Encoder width on 'mlp' (tensor), LM width on 'embed' (fsdp): both axes sharded.
      self.projection = nn.Dense(
          self.width, dtype=dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   ("mlp", "embed")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    else:
      self.projection = Mlp(self.width, out_dim=self.width, activation="gelu_tanh", dtype=dtype)
    self.lm = self.lm_module()

  # ------------------------------------------------------------------------ the sequence

  def image_tokens(self, image: Array, train: bool = False) -> Array:
    """Images [B, H, W, 3] -> projected image tokens [B, N, width]."""
    return self.projection(self.image_encoder(image, train=train).astype(jnp.dtype(self.dtype)))

  def _check(self, batch: Batch, keys) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f"vlm needs batch keys {list(keys)}; missing {missing}, given "
                       f"{sorted(batch)}.")
    for k in keys[1:]:
      if batch[k].ndim != 2 or batch[k].shape[0] != batch["image"].shape[0]:
        raise ValueError(f"vlm: batch[{k!r}] must be token ids [batch, length] with batch "
                         f"{batch['image'].shape[0]}; given shape {batch[k].shape}.")

  def prefix(self, batch: Batch, train: bool = False) -> Tuple[Array, Array]:
    """(embeddings [B, N + P, width], valid [B, N + P]) of image tokens + prompt."""
    image = self.image_tokens(batch["image"], train)
    prompt = move_padding_first(batch["prefix"])
    x = jnp.concatenate([image, self.lm.embed(prompt).astype(image.dtype)], axis=1)
    valid = jnp.concatenate([jnp.ones(image.shape[:2], bool), prompt != 0], axis=1)
    return x, valid

  def suffix_logits(self, batch: Batch, train: bool = False) -> Array:
    """Teacher-forced logits [B, S, vocab]: entry t predicts suffix[t]."""
    self._check(batch, ("image", "prefix", "suffix"))
    x, valid = self.prefix(batch, train)
    num_prefix = x.shape[1]
    inputs = batch["suffix"][:, :-1]
    x = jnp.concatenate([x, self.lm.embed(inputs).astype(x.dtype)], axis=1)
    valid = jnp.concatenate([valid, inputs != 0], axis=1)
    mask = prefix_lm_mask(valid, num_prefix, self.prefix_attention == "full")
    logits = self.lm(x, positions_of(valid), mask)
    return logits[:, num_prefix - 1:]

  # ------------------------------------------------------------------- trainer contract

  def _token_stats(self, batch: Batch, train: bool) -> Dict[str, Array]:
    logits = self.suffix_logits(batch, train)
    targets = batch["suffix"]
    return metrics.token_statistics(logits, targets)

  def loss(self, batch: Batch, train: bool = False) -> Tuple[Array, Dict[str, Array]]:
    stats = self._token_stats(batch, train)
    num = jnp.maximum(jnp.sum(stats["num_tokens"]), 1)
    loss = jnp.sum(stats["nll_sum"]) / num
    return loss, {"token_accuracy": jnp.sum(stats["correct_tokens"]) / num}

  def evaluate(self, batch: Batch) -> Dict[str, Array]:
    return self._token_stats(batch, False)

  @staticmethod
  def summarize(outputs: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """Teacher-forced suffix token accuracy and perplexity over the split (generated text
    is scored by the generation evaluation, `config.generation`)."""
    return {f"suffix_{k}": v for k, v in metrics.summarize_tokens(dict(outputs)).items()}

  # ------------------------------------------------------------------------ generation

  def generation_tasks(self) -> Tuple[str, ...]:
    """What the generation evaluation asks `generate` for (mmjax/train/text_eval.py)."""
    return tuple(self.tasks)

  def generate(self, variables, batch: Batch, *, task: str = "caption",
               beam_size: Optional[int] = None, max_len: Optional[int] = None,
               length_penalty: float = 0.0) -> Array:
    """Generated ids [B, max_len] for `task` (0 from the end token on), the interface of
    the generation evaluation: greedy, or beam search when `beam_size` is given.

    The prompt is `batch["prompt_{task}"]` when the batch has it (vlm_task writes one per
    task, so one eval split serves captions and answers), else `batch["prefix"]`.
    """
    prompt = batch.get(f"prompt_{task}", batch.get("prefix"))
    if prompt is None:
      raise ValueError(f"vlm.generate(task={task!r}) needs batch['prompt_{task}'] or "
                       f"batch['prefix']; given keys {sorted(batch)}.")
    model = self.clone(beam_size=beam_size or self.beam_size)
    tokens = model.apply({"params": variables["params"]}, {**batch, "prefix": prompt},
                         method="generate_tokens", max_len=max_len,
                         decoding="beam" if beam_size else "greedy",
                         length_penalty=length_penalty)
    return jnp.where(tokens == self.eos_id, 0, tokens)

  def generate_tokens(self, batch: Batch, *, decoding: Optional[str] = None,
                      max_len: Optional[int] = None, rng: Optional[Array] = None,
                      length_penalty: float = 0.0) -> Array:
    """Suffix tokens [B, max_len] for image + prompt (0 after `eos_id`, eos included).

    The prefix goes through the LM once (prefill into a cache of N + P + max_len
    positions, with the prefix-LM mask); then `decoding` ("greedy", "beam": `beam_size`
    beams, or "sample": `temperature`, `top_k`, `rng`) feeds one token per step.
    """
    self._check(batch, ("image", "prefix"))
    x, valid = self.prefix(batch)
    return self.generate_after(x, valid, decoding=decoding, max_len=max_len, rng=rng,
                               length_penalty=length_penalty)

  def generate_after(self, x: Array, valid: Array, *, decoding: Optional[str] = None,
                     max_len: Optional[int] = None, rng: Optional[Array] = None,
                     length_penalty: float = 0.0) -> Array:
    """Tokens [B, max_len] continuing the prefix embeddings `x` [B, P, width] (`valid`
    [B, P] marks padding), as `generate_tokens` does after building its prefix: also
    how the LM alone continues a text prompt (`x = lm.embed(ids)`)."""
    decoding = decoding or self.decoding
    max_len = max_len or self.max_decode_len
    if decoding not in DECODINGS:
      raise ValueError(f"vlm.generate: decoding={decoding!r}; expected one of {DECODINGS}.")
    batch_size, num_prefix = valid.shape
    beams = self.beam_size if decoding == "beam" else 1
    rows = batch_size * beams
    x, valid = (jnp.repeat(a, beams, axis=0) for a in (x, valid))
    cache_len = num_prefix + max_len
    lm = self.lm_module(decode=True)
    params = {"params": self.lm.variables["params"]}
    key_valid = jnp.concatenate([valid, jnp.ones((rows, max_len), bool)], axis=1)

    def run(cache, inputs, positions, mask):
      return lm.apply(dict(params, cache=cache), inputs, positions, mask, mutable=["cache"])

    sized = jax.eval_shape(lambda: lm.init(
        jax.random.key(0), jnp.zeros((rows, cache_len, self.width), x.dtype),
        jnp.zeros((rows, cache_len), jnp.int32),
        jnp.ones((rows, 1, cache_len, cache_len), bool))["cache"])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sized)
    prefill_mask = prefix_lm_mask(valid, num_prefix, self.prefix_attention == "full")
    prefill_mask = jnp.pad(prefill_mask, ((0, 0), (0, 0), (0, 0), (0, max_len)))
    logits, variables = run(cache, x, positions_of(valid), prefill_mask)
    first = logits[:, -1]
    num_valid = jnp.sum(valid, axis=1)

    # Step t >= 1 feeds the token chosen at step t - 1 (written at cache index
    # num_prefix + t - 1); step 0 returns the prefill's last logits.
    def step_fn(token, state):
      cache, t, first = state
      def decode_one():
        index = num_prefix + t - 1
        mask = (key_valid & (jnp.arange(cache_len) <= index))[:, None, None, :]
        positions = (num_valid + t - 1)[:, None]
        embedded = self.lm.embed(token[:, None]).astype(x.dtype)
        step_logits, updated = run(cache, embedded, positions, mask)
        return step_logits[:, 0], updated["cache"]
      logits, cache = jax.lax.cond(t == 0, lambda: (first, cache), decode_one)
      return logits, (cache, t + 1, first)

    state = (variables["cache"], jnp.array(0, jnp.int32), first)
    common = dict(batch_size=batch_size, max_len=max_len, bos_id=0, eos_id=self.eos_id)
    if decoding == "greedy":
      return decoding_lib.greedy_decode(step_fn, state, **common)
    if decoding == "beam":
      return decoding_lib.beam_search(step_fn, state, beam_size=beams,
                                      length_penalty=length_penalty, **common)[0]
    if rng is None:
      rng = self.make_rng("sample") if self.has_rng("sample") else jax.random.key(0)
    return decoding_lib.sample_decode(step_fn, state, rng=rng, temperature=self.temperature,
                                      top_k=self.top_k, **common)
