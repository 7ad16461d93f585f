"""ITC, image-text contrastive learning (CLIP / SigLIP).

The image alone and the caption (`text`) alone go through the shared fusion encoder (every
strategy accepts any subset of its modalities), are mean-pooled, projected
(`image_proj`, `text_proj`) and L2-normalised; `contrastive` holds the temperature (and
SigLIP's bias) and computes `contrastive_loss` ("softmax" or "sigmoid") over every pair of
the global batch, densely or around a ring of devices (`contrastive_impl`, see
mmjax/ring_loss.py). Logged: `itc_loss` and `logit_scale` (the inverse temperature in
effect). Evaluation: image <-> caption retrieval recall@1/5/10 over the whole split.
"""
import flax.linen as nn
import jax.numpy as jnp

from mmjax import metrics
from mmjax.models import heads
from mmjax.models.objectives.base import Objective
from mmjax.registry import OBJECTIVES


@OBJECTIVES.register("itc")
class ImageTextContrastive(Objective):

  def inputs(self, model):
    return ("image", "text")

  def heads(self, model):
    dense = lambda: nn.Dense(model.embed_dim, use_bias=False, dtype=jnp.dtype(model.dtype))
    return {"image_proj": dense(), "text_proj": dense(),
            "contrastive": heads.ContrastiveHead(model.contrastive_loss,
                                                 impl=model.contrastive_impl)}

  def features(self, model, batch, run):
    return {"image_embedding": model.embed_image(batch, train=run.train),
            "text_embedding": model.embed_text(batch, train=run.train)}

  def loss(self, model, features):
    loss, _ = model.contrastive(features["image_embedding"], features["text_embedding"])
    scale = jnp.exp(model.contrastive.variables["params"]["logit_scale"])
    return loss, {"logit_scale": jnp.minimum(scale, model.contrastive.max_scale)}  # in effect

  @staticmethod
  def summarize(outputs):
    if "image_embedding" not in outputs:
      return {}
    return metrics.retrieval_recall(outputs["image_embedding"], outputs["text_embedding"])
