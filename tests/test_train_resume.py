"""Exact resume: 10 straight steps == 5 steps, stop, resume, 5 more (bit for bit)."""
import shutil

import numpy as np

from test_train_fixtures import losses, tiny_config

from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import trainer


def test_stop_and_resume_gives_bit_identical_params(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  config = tiny_config(total_steps=10, checkpoint_every=5, keep_checkpoints=2,
                       grad_accum_steps=2, **{"optimizer.frozen": (r"hidden/bias",),
                                              "optimizer.lr_multipliers": ((r"head/.*", 0.5),)})
  trainer.train_and_evaluate(config, str(straight))

  # "Stop at step 5": a workdir holding only what the run had written by then.
  shutil.copytree(straight / "checkpoints" / "5", resumed / "checkpoints" / "5")
  results = trainer.train_and_evaluate(config, str(resumed))

  assert results["step"] == 10
  assert sorted(losses(resumed)) == list(range(6, 11))  # resumed at 6, not from scratch
  want = checkpoint_lib.load_params(str(straight))
  got = checkpoint_lib.load_params(str(resumed))
  assert sorted(want) == sorted(got)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert {s: losses(resumed)[s] for s in range(6, 11)} == {
      s: losses(straight)[s] for s in range(6, 11)}

