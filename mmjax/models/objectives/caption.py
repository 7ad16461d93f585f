"""Captioning: a causal text decoder writes the caption from the fused `caption_from`.

`caption_decoder` (a Transformer decoder, `decoder_layers` deep) cross-attends to the fused
tokens of the `caption_from` modalities and predicts the caption (`text`) by teacher
forcing: inputs [BOS, t_1..t_L], targets [t_1..t_L, EOS]. The loss is the nll per token
over the whole batch; logged `caption_loss`, evaluation `caption_*` token accuracy and
perplexity. `multimodal.generate_text(task="caption")` decodes greedily or with beam
search through `memory` and `logits`; config.generation scores the captions (CIDEr, ...).
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from mmjax.models.objectives.base import Objective, token_features, token_loss, token_summary
from mmjax.models.text import TextDecoder
from mmjax.registry import OBJECTIVES


def text_decoder(model, max_len: int) -> TextDecoder:
  """The model's causal text decoder over its vocabulary and special tokens, for `max_len`
  tokens plus BOS (captions; generated VQA answers)."""
  return TextDecoder(model.vocab_size + model.num_special_tokens, model.block_config(),
                     model.width, model.decoder_layers, max_len=max_len + 1)


def teacher_forcing(text: jax.Array, mask: Optional[jax.Array], vocab_size: int
                    ) -> Tuple[jax.Array, jax.Array]:
  """Decoder inputs [BOS, t_1..t_L] and targets [t_1..t_L, 0] with EOS after the last token.

  Padding is `mask` when the pipeline sends one (a tokenizer whose pad id is a real
  token), else id 0; it becomes 0, the decoder's padding target, either way (so a real
  id 0 inside a masked text, CLIP's "!", is not scored as a target).
  """
  bos, eos = vocab_size + 1, vocab_size + 2
  if mask is not None:
    text = jnp.where(mask, text, 0)
  batch = text.shape[0]
  inputs = jnp.concatenate([jnp.full((batch, 1), bos, text.dtype), text], axis=1)
  targets = jnp.concatenate([text, jnp.zeros((batch, 1), text.dtype)], axis=1)
  length = jnp.sum(text != 0 if mask is None else mask, axis=1)
  targets = targets.at[jnp.arange(batch), length].set(eos)
  return inputs, targets


@OBJECTIVES.register("caption")
class Captioning(Objective):

  def inputs(self, model):
    return tuple(model.caption_from)

  def targets(self, model):
    return ("text",)

  def heads(self, model):
    return {"caption_decoder": text_decoder(model, model.max_text_len)}

  def features(self, model, batch, run):
    memory, memory_mask = self.memory(model, batch, train=run.train)
    inputs, targets = teacher_forcing(batch["text"], batch.get("text_mask"), model.vocab_size)
    return token_features("caption", self.logits(model, inputs, memory, memory_mask,
                                                 train=run.train), targets)

  def loss(self, model, features):
    return token_loss("caption", features)

  @staticmethod
  def summarize(outputs):
    return token_summary("caption", outputs)

  def generates(self, model):
    return True

  def max_len(self, model):
    return model.max_text_len

  def memory(self, model, batch, train=False):
    """The fused `caption_from` tokens the decoder attends to: ([B, N, D], mask [B, N])."""
    return model.memory(batch, model.caption_from, train=train)

  def logits(self, model, tokens, memory, memory_mask, *, train=False, decode=False):
    return model.caption_decoder(tokens, memory, memory_mask, train=train, decode=decode)
