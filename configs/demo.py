"""The demo run (first version: ViT on real handwritten digits; it becomes the
multimodal demo once the multimodal models land).

  python -m mmjax.main --config configs/demo.py --workdir /tmp/demo
"""
import os

from mmjax.train.config import load_config_file


def get_config(arg=None):
  config = load_config_file(os.path.join(os.path.dirname(__file__), "vit_digits.py"))
  del arg
  config.total_steps = 600
  config.eval_every = 200
  config.checkpoint_every = 200
  return config
