"""Sigmoid (SigLIP) vs softmax (CLIP) contrastive loss across batch sizes.

  python -m mmjax.sweep --config configs/ablations/siglip_vs_clip.py --workdir /tmp/siglip

Zhai et al. 2023 ("Sigmoid Loss for Language Image Pre-Training", Fig. 2 / Table 2)
find the sigmoid loss clearly better than the softmax loss at small batch sizes and the
two about equal at large ones. This sweep repeats the comparison at toy scale: a small
two-tower model (ViT image tower, Transformer text tower) on the offline `shapes`
image-caption pairs, each loss at batch sizes 16, 64 and 256 with the same number of
examples seen, scored by image->text and text->image recall@1 on the 1,000 validation
scenes (chance 0.001).

The "b256 = 16x16" points reach batch 256 by accumulating 16 micro-batches of 16
(`grad_accum_steps=16`): accumulation is exact for both losses (every image meets all
256 texts), so they train the batch-256 model with the activation memory of batch 16
and should match the "b256" points up to float rounding.
"""
import ml_collections

from mmjax.data import pipeline
from mmjax.train.config import default_config

EXAMPLES_SEEN = 25_600
TEXT_LEN = 24


def base_config() -> ml_collections.ConfigDict:
  """The small two-tower model every point starts from."""
  config = default_config()
  config.total_steps = EXAMPLES_SEEN // 64
  config.batch_size = 64
  config.eval_batch_size = 500
  config.log_every = 50
  config.eval_every = 0
  config.checkpoint_every = 0
  config.progress_bar = False
  config.data = pipeline.default_config("shapes", max_text_len=TEXT_LEN)
  config.model = ml_collections.ConfigDict(dict(
      name="two_tower", loss_type="softmax", embed_dim=64, vocab_size=256,
      patch_size=8, image_width=64, image_depth=2, image_heads=4, image_pool="gap",
      text_width=64, text_depth=2, text_heads=4, max_text_len=TEXT_LEN))
  config.optimizer.lr = 1e-3
  config.schedule.warmup_steps = config.total_steps // 10
  return config


def get_config(arg=None):
  del arg
  sweep = ml_collections.ConfigDict()
  sweep.base = base_config()
  sweep.points = [
      {"label": f"{name} b{batch}", "model.loss_type": loss, "batch_size": batch,
       "total_steps": EXAMPLES_SEEN // batch,
       "schedule.warmup_steps": EXAMPLES_SEEN // batch // 10}
      for name, loss in (("CLIP", "softmax"), ("SigLIP", "sigmoid"))
      for batch in (16, 64, 256)]
  sweep.points += [
      {"label": f"{name} b256 = 16x16", "model.loss_type": loss, "batch_size": 256,
       "grad_accum_steps": 16, "total_steps": EXAMPLES_SEEN // 256,
       "schedule.warmup_steps": EXAMPLES_SEEN // 256 // 10}
      for name, loss in (("CLIP", "softmax"), ("SigLIP", "sigmoid"))]
  sweep.num_seeds = 2
  sweep.table = ("eval/i2t_recall@1", "eval/t2i_recall@1", "eval/i2t_recall@5",
                 "eval/t2i_recall@5", "train/loss")
  sweep.plot = ml_collections.ConfigDict(dict(
      x="batch_size", y=("eval/i2t_recall@1", "eval/t2i_recall@1"),
      title="SigLIP (sigmoid) vs CLIP (softmax) loss on shapes image-caption retrieval"))
  return sweep
