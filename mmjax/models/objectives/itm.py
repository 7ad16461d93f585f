"""ITM, image-text matching with hard negatives (ALBEF).

The fused (image, caption) pair is classified as a match or not (`itm_head`, two classes)
for each positive pair and two hard negatives: a wrong caption for its image and a wrong
image for its caption, drawn in proportion to the contrastive similarities, so ITM needs
ITC's embeddings. In training the negatives come from the *global* batch (`context`, which
the trainer adds to the batch before computing features again), one draw per example keyed
by its id, so they do not depend on how the batch is split; in evaluation, the hardest
valid wrong partner within the eval batch. Padding rows (`valid` False) are never
negatives. Logged: `itm_loss`; evaluation: `itm_accuracy` over the three pairs.
"""
import jax
import jax.numpy as jnp

from mmjax import losses, metrics
from mmjax.models import heads as heads_lib
from mmjax.models.base import example_ids
from mmjax.models.objectives.base import Objective, accuracy_summary, classifier
from mmjax.registry import OBJECTIVES

CONTEXT = ("itm_negative_text", "itm_negative_image")  # batch keys of the global negatives
PAIR = ("image", "text")  # what is matched


@OBJECTIVES.register("itm")
class ImageTextMatching(Objective):
  needs = ("itc",)  # negatives are drawn from the contrastive similarities

  def check(self, model):
    if model.contrastive_impl == "ring":
      raise ValueError("contrastive_impl='ring' cannot serve the 'itm' objective: its hard "
                       "negatives are drawn from the full similarity matrix, which the ring "
                       "never builds; use contrastive_impl='dense' with itm.")

  def inputs(self, model):
    return PAIR

  def heads(self, model):
    heads = {"itm_head": classifier(model, 2)}
    if self._own_combiner(model):
      heads["itm_combiner"] = heads_lib.Combine("gate", dtype=jnp.dtype(model.dtype))
    return heads

  @staticmethod
  def _own_combiner(model) -> bool:
    """A gate weighs a fixed set of modalities: when another head gates the model's
    modalities with the model's combiner (e.g. image + question for VQA), the (image,
    text) pair gets its own."""
    return (model.combine == "gate" and tuple(model.modalities) != PAIR
            and any(o.combines(model) for o in model.objectives().values()))

  def features(self, model, batch, run):
    # Negatives from the global batch when the trainer gives them (context), else from
    # these rows (the whole batch without accumulation; the eval batch).
    negatives = {k: batch[k] for k in CONTEXT if k in batch}
    if len(negatives) != len(CONTEXT):
      negatives = self.negatives(model, batch, run.features["image_embedding"],
                                 run.features["text_embedding"], run.key)
    images = jnp.concatenate([batch["image"], batch["image"], negatives["itm_negative_image"]])
    texts = jnp.concatenate([batch["text"], negatives["itm_negative_text"], batch["text"]])
    n = batch["image"].shape[0]
    combiner = model.itm_combiner if self._own_combiner(model) else None
    logits = model.itm_head(model.pooled({"image": images, "text": texts}, PAIR,
                                         train=run.train, combiner=combiner))
    labels = jnp.concatenate([jnp.ones(n, jnp.int32), jnp.zeros(2 * n, jnp.int32)])
    nll = losses.cross_entropy(logits, labels).reshape(3, n)
    hits = metrics.correct(logits, labels).reshape(3, n)
    return {"itm_nll": jnp.mean(nll, axis=0), "itm_correct": jnp.mean(hits, axis=0)}

  def context(self, model, features, batch, key):
    return self.negatives(model, batch, jax.lax.stop_gradient(features["image_embedding"]),
                          jax.lax.stop_gradient(features["text_embedding"]), key)

  @staticmethod
  def negatives(model, batch, zimg, ztxt, key):
    """A wrong caption per image and a wrong image per caption, drawn from these rows'
    similarities; padding rows (`valid` False) are never negatives."""
    if batch["image"].shape[0] < 2 and model.is_initializing():  # 1 row: shapes only
      return {"itm_negative_text": batch["text"], "itm_negative_image": batch["image"]}
    neg_text, neg_image = losses.hard_negatives(
        zimg @ ztxt.T, None if key is None else jax.random.fold_in(key, 1),
        example_ids=example_ids(batch), candidates=batch.get("valid"))
    return {"itm_negative_text": batch["text"][neg_text],
            "itm_negative_image": batch["image"][neg_image]}

  def loss(self, model, features):
    return jnp.mean(features["itm_nll"]), {}

  @staticmethod
  def summarize(outputs):
    return accuracy_summary("itm", outputs)
