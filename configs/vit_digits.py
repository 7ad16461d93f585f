"""A small ViT on scikit-learn's real 8x8 handwritten digits: the quickest real run.

  python -m mmjax.main --config configs/vit_digits.py --workdir /tmp/vit_digits

Accuracy and wall time per number of steps are in README.md ("Run experiments").
Try `--config.mesh.fsdp=2` on 2+ devices, `--config.model.dtype=bfloat16`, or
`--config.optimizer.name=sgd --config.optimizer.lr=0.1`.
"""
import ml_collections

from mmjax.data import pipeline
from mmjax.train.config import default_config


def get_config(arg=None):
  del arg
  config = default_config()
  config.seed = 0
  config.total_steps = 1500
  config.batch_size = 128
  config.eval_batch_size = 256
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500

  config.data = pipeline.default_config("digits")
  config.model = ml_collections.ConfigDict(dict(
      name="vit",
      variant=None,        # sizes below instead of a named variant like "B/16"
      num_classes=10,
      patch_size=2,        # 8x8 digits -> a 4x4 grid of 16 patches
      width=64,
      depth=4,
      num_heads=4,
      mlp_dim=128,
      pool_type="gap",
      dropout_rate=0.0,
      dtype="float32",     # compute dtype: "bfloat16" on accelerators; params stay float32
  ))

  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = 100
  return config
