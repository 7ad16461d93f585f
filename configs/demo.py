"""The demo run (first version: ViT on real handwritten digits; it becomes the
multimodal demo once the multimodal models land).

  python -m mmjax.main --config configs/demo.py --workdir /tmp/demo
"""
from configs import vit_digits


def get_config(arg=None):
  config = vit_digits.get_config(arg)
  config.total_steps = 600
  config.eval_every = 200
  config.checkpoint_every = 200
  return config
