"""A non-finite loss stops the run naming the step, or is skipped, as config.on_nonfinite says."""
import numpy as np
import pytest

from test_train_fixtures import read_metrics, tiny_config

from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import trainer


def test_nonfinite_loss_raises_naming_the_step(tmp_path):
  config = tiny_config(total_steps=4, log_every=2, **{"data.nan_at_steps": (3,)})
  with pytest.raises(trainer.NonFiniteError, match=r"at step 3.*'embed/kernel'"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints" / "4").exists()


def test_nonfinite_step_is_skipped_and_state_stays_finite(tmp_path):
  config = tiny_config(total_steps=4, checkpoint_every=4, on_nonfinite="skip",
                       **{"data.nan_at_steps": (3,)})
  trainer.train_and_evaluate(config, str(tmp_path))
  finite = {r["step"]: r["finite"] for r in read_metrics(str(tmp_path)) if "finite" in r}
  assert finite == {1: True, 2: True, 3: False, 4: True}
  params = checkpoint_lib.load_params(str(tmp_path))
  assert all(np.all(np.isfinite(v)) for v in params.values())


def test_skipped_steps_are_counted_in_metrics_and_summary(tmp_path):
  config = tiny_config(total_steps=5, log_every=2, on_nonfinite="skip",
                       **{"data.nan_at_steps": (2, 4)})
  results = trainer.train_and_evaluate(config, str(tmp_path))
  assert results["train/skipped_steps"] == 2
  counts = {r["step"]: r["skipped_steps"] for r in read_metrics(str(tmp_path))
            if "skipped_steps" in r}
  assert counts == {2: 1, 4: 2, 5: 2}


def test_a_run_that_only_skips_is_stopped_by_max_skipped_steps(tmp_path):
  config = tiny_config(total_steps=30, on_nonfinite="skip", max_skipped_steps=4,
                       **{"data.nan_at_steps": tuple(range(5, 31))})
  with pytest.raises(trainer.NonFiniteError, match=r"4 steps in a row \(up to step 8\)"):
    trainer.train_and_evaluate(config, str(tmp_path))
