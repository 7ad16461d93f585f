"""Prefix-LM vs causal attention over the prefix, and a frozen vs trained image encoder.

  python -m mmjax.sweep --config configs/ablations/vlm_prefix.py --workdir /tmp/vlm_prefix

The PaliGemma paper (Beyer et al. 2024, Sec. 5 / Fig. 6-7) finds that letting the image
and prompt tokens attend to each other in both directions (prefix-LM) beats a fully
causal sequence, and that training the image encoder during multimodal pretraining
beats freezing it. This sweep repeats both comparisons at toy scale with the small VLM
of configs/vlm_shapes.py ("ablation" variant, trained from scratch): prefix_attention
full vs causal, each with the ViT encoder trained or frozen at its random
initialisation (a frozen *random* encoder is harsher than the paper's frozen
*pretrained* one: only the projector can adapt its features). Scored by CIDEr on the
1,000 validation captions and VQA accuracy on their questions; the plot puts both
against the final training loss (does the better point also fit better?).
"""
import os

import ml_collections

from mmjax.train.config import load_config_file

VLM_SHAPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vlm_shapes.py")
FROZEN = ("image_encoder/.*",)


def get_config(arg=None):
  del arg
  sweep = ml_collections.ConfigDict()
  sweep.base = load_config_file(VLM_SHAPES + ":ablation")
  sweep.points = [
      {"label": f"{attention} prefix, {'frozen' if frozen else 'trained'} encoder",
       "model.prefix_attention": attention, "optimizer.frozen": frozen}
      for attention in ("full", "causal") for frozen in ((), FROZEN)]
  sweep.num_seeds = 1
  sweep.table = ("eval/cider", "eval/vqa_accuracy", "eval/bleu4", "eval/suffix_perplexity",
                 "train/loss")
  sweep.plot = ml_collections.ConfigDict(dict(
      x="train/loss", y=("eval/cider", "eval/vqa_accuracy"),
      title="VLM on shapes: prefix-LM vs causal prefix, frozen vs trained encoder"))
  return sweep
