"""Exact gradient accumulation: 4 micro-batches == one big batch, through the trainer's step.

The contrastive losses compare every image with every text of the *global* batch, so the
naive average of micro-batch gradients would train a smaller-batch model; the trainer's
GradCache path (features of every micro-batch, the global loss, micro-batch VJPs) must
give the big batch's loss and gradient. Checked at step 3 (after two updates) on a
data 2 x fsdp 2 mesh, for two-tower CLIP and SigLIP and the demo's multimodal model
(ITC + VQA), with ITM and MLM switched on as well (their hard negatives and masks are
drawn per example, so they must not change when the batch is split).
"""
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import demo
from mmjax import sweep as sweep_lib
from fixtures import example_model_and_batch
from mmjax.train import config as config_lib
from mmjax.train import program as program_lib
from mmjax.train import sharding
from mmjax.train import trainer
from mmjax.train.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BATCH, STEPS = 32, 3
TINY_TOWER = dict(vocab_size=50, max_text_len=8, image_width=32, text_width=32, image_depth=1,
                  text_depth=1, image_heads=2, text_heads=2, embed_dim=16, patch_size=8)
# The demo's model (bottleneck fusion, ITC + VQA) at tiny sizes; audio and sensor are
# per-example inputs like the question, so image + question keep the test cheap.
TINY_FUSION = dict(width=32, num_layers=2, num_heads=2, mlp_dim=64, fusion_layer=1,
                   num_bottlenecks=2, modalities=("image", "question"))


def _two_tower(loss_type):
  rng = np.random.default_rng(0)
  text = rng.integers(1, 50, (BATCH, 8)).astype(np.int32)
  text[:, 5:] = 0
  return (dict(name="two_tower", loss_type=loss_type, **TINY_TOWER),
          {"image": rng.normal(size=(BATCH, 16, 16, 3)).astype(np.float32), "text": text})


def _demo():
  fields = {**demo.get_config().model.to_dict(), **TINY_FUSION}
  fields["loss_weights"] = {**fields["loss_weights"], "itm": 1.0, "mlm": 1.0}
  model_config = dict(fields)
  fields.pop("name")
  _, batch = example_model_and_batch(batch_size=BATCH, **fields)
  return model_config, {k: np.asarray(batch[k]) for k in ("image", "question", "text", "answer")}


def _run(model_config, batch, grad_accum_steps):
  """Metrics of step STEPS of the trainer's own program on a (data 2, fsdp 2) mesh."""
  config = config_lib.default_config()
  config.model = ml_collections.ConfigDict(model_config)
  config.batch_size, config.grad_accum_steps = BATCH, grad_accum_steps
  config.eval_batch_size = BATCH
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 1
  config.schedule.warmup_steps = 1
  spec = {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
  program = program_lib.build(config, spec, jax.devices()[:4])
  state = program.init()
  with program.context():
    global_batch = sharding.global_batch(batch, program.mesh)
    for _ in range(STEPS):
      state, metrics = program.train_step(state, global_batch)
  metrics.pop(trainer.GRADS_FINITE)
  return jax.device_get(metrics)


@pytest.mark.parametrize("case", ["clip", "siglip", "demo itc+vqa+itm+mlm"])
def test_accumulating_4_micro_batches_equals_one_big_batch(case):
  model_config, batch = {
      "clip": lambda: _two_tower("softmax"),
      "siglip": lambda: _two_tower("sigmoid"),
      "demo itc+vqa+itm+mlm": _demo,
  }[case]()
  big, accumulated = _run(model_config, batch, 1), _run(model_config, batch, 4)
  assert set(big) == set(accumulated)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(accumulated[key], big[key], rtol=1e-5, err_msg=key)
  for key, value in big.items():  # every logged term (itc_loss, vqa_accuracy, ...) too
    np.testing.assert_allclose(accumulated[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_siglip_vs_clip_sweep_reaches_batch_256_by_accumulating_16_x_16():
  sweep = load_config_file(os.path.join(ROOT, "configs", "ablations", "siglip_vs_clip.py"))
  configs = {r.label: r.config for r in sweep_lib.expand(sweep) if r.seed == sweep.base.seed}
  for name in ("CLIP", "SigLIP"):
    big, accumulated = configs[f"{name} b256"], configs[f"{name} b256 = 16x16"]
    assert accumulated.batch_size == 256 and accumulated.grad_accum_steps == 16
    assert big.grad_accum_steps == 1
    big.grad_accum_steps = 16  # the only difference from the batch-256 point
    assert accumulated.to_dict() == big.to_dict()
