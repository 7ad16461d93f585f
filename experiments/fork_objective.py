"""A research fork's objective: defined outside mmjax, composed by the unchanged model.

Image-audio contrastive learning ("iac"), as ImageBind (Girdhar et al. 2023) binds audio
to images: the image alone and the audio alone go through the model's fusion encoder,
are mean-pooled, projected and L2-normalised, and a CLIP / SigLIP loss
(`config.model.contrastive_loss`) pulls each clip towards its own image among all images
of the global batch. On the demo's `shapes` data the tone names one shape of the scene,
so the pairing is learnable.

Nothing in mmjax/ knows this file. It registers the objective by name; the config imports
it and weights it next to the built-in ones:

    python -m mmjax.main --config configs/demo.py --workdir /tmp/iac \
        --config.imports='("experiments.fork_objective",)' \
        --config.model.loss_weights='{"itc": 1.0, "vqa": 1.0, "iac": 0.5}'

(run from the repository root, so `experiments` is importable). The contract it meets is
mmjax/models/objectives/base.py's. The embeddings are per-example `features` and the loss
over the batch is taken in `loss`, so gradient accumulation stays exact.

Parameters: `iac_image_proj`, `iac_audio_proj` and `iac_contrastive` (the temperature).
Logged: `iac_loss`; evaluation: `iac_i2t_recall@K` (image -> audio) and `iac_t2i_recall@K`.
"""
import flax.linen as nn
import jax.numpy as jnp

from mmjax import metrics
from mmjax.models import heads
from mmjax.models.objectives import Objective
from mmjax.registry import OBJECTIVES


@OBJECTIVES.register("iac")
class ImageAudioContrastive(Objective):

  def inputs(self, model):
    return ("image", "audio")

  def heads(self, model):
    dense = lambda: nn.Dense(model.embed_dim, use_bias=False, dtype=jnp.dtype(model.dtype))
    return {"iac_image_proj": dense(), "iac_audio_proj": dense(),
            "iac_contrastive": heads.ContrastiveHead(model.contrastive_loss)}

  def features(self, model, batch, run):
    def embed(modality, projection):
      encoded, masks = model.encode(batch, (modality,), train=run.train)
      return heads.l2_normalize(projection(heads.masked_mean(encoded[modality],
                                                             masks[modality])))
    return {"iac_image_embedding": embed("image", model.iac_image_proj),
            "iac_audio_embedding": embed("audio", model.iac_audio_proj)}

  def loss(self, model, features):
    loss, _ = model.iac_contrastive(features["iac_image_embedding"],
                                    features["iac_audio_embedding"])
    return loss, {}

  @staticmethod
  def summarize(outputs):
    if "iac_image_embedding" not in outputs:
      return {}
    recall = metrics.retrieval_recall(outputs["iac_image_embedding"],
                                      outputs["iac_audio_embedding"])
    return {f"iac_{k}": v for k, v in recall.items()}
