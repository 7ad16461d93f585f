"""Fusion ablation (MBT, Nagrani et al. 2021, Fig. 3 / Table 1 style) on the offline task.

  python -m mmjax.sweep --config configs/ablations/fusion.py --workdir /tmp/fusion_ablation

Every classic way to fuse image, question, audio and sensor streams, at the same width
and depth, trained for the same steps on `shapes` VQA (the demo's cheaper "ablation"
variant, configs/demo.py): early, late, hybrid (mid) fusion at each layer, MBT
bottlenecks with 1, 4 and 16 tokens, co-attention, fusion-in-transformer. The table
reports VQA accuracy (mean ± std over seeds) with parameters and forward GFLOPs per
example; the plot shows accuracy against GFLOPs. MBT's claim to check: mid fusion
through a few bottleneck tokens is at least as good as early or late fusion, at lower
cost than early fusion.

Cheaper / more thorough: `--config.num_seeds=1`, `--config.base.total_steps=1000`.
"""
import os

import ml_collections

from mmjax.train.config import load_config_file

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "demo.py")


def get_config(arg=None):
  del arg
  sweep = ml_collections.ConfigDict()
  sweep.base = load_config_file(DEMO + ":ablation")
  num_layers = sweep.base.model.num_layers
  sweep.points = (
      [{"label": "early", "model.fusion": "early"}]
      + [{"label": f"hybrid L{layer}", "model.fusion": "hybrid", "model.fusion_layer": layer}
         for layer in range(1, num_layers)]
      + [{"label": "late", "model.fusion": "late"}]
      + [{"label": f"bottleneck B{k}", "model.fusion": "bottleneck",
          "model.fusion_layer": num_layers // 2, "model.num_bottlenecks": k}
         for k in (1, 4, 16)]
      + [{"label": "cross", "model.fusion": "cross", "model.fusion_layer": num_layers // 2},
         {"label": "fusion-in-transformer", "model.fusion": "fusion_in_transformer"}])
  sweep.num_seeds = 3
  sweep.table = ("eval/vqa_accuracy", "train/vqa_accuracy", "train/loss")
  sweep.plot = ml_collections.ConfigDict(dict(
      x="gflops", y=("eval/vqa_accuracy",), title="Fusion strategies on shapes VQA"))
  return sweep
