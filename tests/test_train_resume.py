"""Exact resume: 10 straight steps == 5 steps, stop, resume, 5 more (bit for bit)."""
import shutil

import numpy as np

from test_train_fixtures import losses, read_metrics, tiny_config

from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import trainer


def test_stop_and_resume_gives_bit_identical_params(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  config = tiny_config(total_steps=10, checkpoint_every=5, keep_checkpoints=2,
                       grad_accum_steps=2)
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


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path):
  config = tiny_config(total_steps=4, checkpoint_every=2, keep_checkpoints=3)
  trainer.train_and_evaluate(config, str(tmp_path))
  state_dir = tmp_path / "checkpoints" / "4" / "state"
  for path in state_dir.rglob("*"):  # zero every array file of the newest step
    if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
      path.write_bytes(b"\0" * path.stat().st_size)
  config.total_steps = 6
  results = trainer.train_and_evaluate(config, str(tmp_path))
  assert results["step"] == 6
  moved = [p.name for p in (tmp_path / "checkpoints.corrupt").iterdir()]
  assert [name.split("-")[0] for name in moved] == ["4"]
  steps = [r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r]
  assert steps == [1, 2, 3, 4, 3, 4, 5, 6]  # resumed from the good step 2
