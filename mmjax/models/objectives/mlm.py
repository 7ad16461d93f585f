"""MLM, masked language modelling of the caption, fused with the image.

A `mlm_rate` share of the caption's tokens is corrupted (BERT's 80 / 10 / 10 MASK / random
/ kept), the (image, corrupted caption) pair is fused, and the text tokens are scored
against the originals through the text embedding table (`token_embed`, tied: no head of
its own). Masks are drawn per example (keyed by its id), so they do not depend on how the
batch is split; in evaluation the mask is fixed, so numbers compare between runs. The
loss is the nll per masked token over the whole batch; logged `mlm_loss`, evaluation
`mlm_*` token accuracy and perplexity.
"""
import jax
import jax.numpy as jnp

from mmjax import losses
from mmjax.models.base import example_ids
from mmjax.models.objectives.base import Objective, token_features, token_loss, token_summary
from mmjax.registry import OBJECTIVES


@OBJECTIVES.register("mlm")
class MaskedLanguageModelling(Objective):

  def inputs(self, model):
    return ("image", "text")

  def features(self, model, batch, run):
    key = jax.random.key(0) if run.key is None else jax.random.fold_in(run.key, 2)
    corrupted, targets = losses.mask_tokens(
        key, batch["text"], mask_id=model.vocab_size, vocab_size=model.vocab_size,
        rate=model.mlm_rate, example_ids=example_ids(batch))
    encoded, _ = model.encode(batch, ("image", "text"), train=run.train,
                              overrides={"text": corrupted})
    logits = model.token_embed.attend(encoded["text"]).astype(jnp.float32)
    return token_features("mlm", logits, targets)

  def loss(self, model, features):
    return token_loss("mlm", features)

  @staticmethod
  def summarize(outputs):
    return token_summary("mlm", outputs)
