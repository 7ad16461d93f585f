"""The sweep runner: expands points x seeds, trains each once, tabulates and plots."""
import csv
import os

import ml_collections
import pytest

from mmjax import sweep as sweep_lib
from mmjax.errors import ConfigError


def _fake_sweep():
  base = ml_collections.ConfigDict(dict(
      seed=0, total_steps=3, model=dict(name="fake", fusion="early", num_bottlenecks=4)))
  return ml_collections.ConfigDict(dict(
      base=base, num_seeds=2,
      points=[{"model.fusion": "early"},
              {"label": "bn4", "model.fusion": "bottleneck", "model.num_bottlenecks": 4}],
      plot=dict(x="gflops", y=("accuracy",))))


def _fake_train(calls):
  def train(config, workdir):
    calls.append((config.model.fusion, config.seed, workdir))
    bonus = 0.2 if config.model.fusion == "bottleneck" else 0.0
    return {"accuracy": 0.5 + bonus + 0.01 * config.seed, "loss": 1.0, "workdir": workdir}
  return train


def _fake_cost(config):
  return {"params": 1000, "gflops": 2.0 if config.model.fusion == "early" else 1.0}


def test_expand_resolves_points_and_seeds():
  runs = sweep_lib.expand(_fake_sweep())
  assert [(r.label, r.seed) for r in runs] == [
      ("fusion=early", 0), ("fusion=early", 1), ("bn4", 0), ("bn4", 1)]
  assert runs[2].config.model.fusion == "bottleneck"
  assert len({r.key for r in runs}) == 4  # the seed is part of a run's identity


def test_bad_override_names_valid_fields():
  with pytest.raises(ConfigError, match="valid keys of config.model.*fusion"):
    sweep_lib.apply_overrides(_fake_sweep().base, {"model.fuson": "late"})


def test_sweep_writes_table_and_plot_and_skips_finished_runs(tmp_path):
  calls = []
  sweep = _fake_sweep()
  sweep_lib.run_sweep(sweep, str(tmp_path), train_fn=_fake_train(calls),
                      cost_fn=_fake_cost, log=lambda _: None)
  assert len(calls) == 4
  with open(tmp_path / "results.csv") as f:
    rows = {r["label"]: r for r in csv.DictReader(f)}
  assert float(rows["bn4"]["accuracy_mean"]) == pytest.approx(0.705)
  assert float(rows["bn4"]["accuracy_std"]) == pytest.approx(0.00707, rel=1e-2)
  assert float(rows["fusion=early"]["gflops_mean"]) == 2.0
  assert "| bn4 | 2 |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "results.png").stat().st_size > 1000

  # Again: nothing to train. A changed point trains only its own runs.
  sweep_lib.run_sweep(sweep, str(tmp_path), train_fn=_fake_train(calls),
                      cost_fn=_fake_cost, log=lambda _: None)
  assert len(calls) == 4
  sweep.base.total_steps = 4
  sweep.points = sweep.points[:1]
  sweep_lib.run_sweep(sweep, str(tmp_path), train_fn=_fake_train(calls),
                      cost_fn=_fake_cost, log=lambda _: None)
  assert len(calls) == 6


def test_launch_list_has_one_command_per_unfinished_run(tmp_path):
  path = sweep_lib.write_launch_list(
      _fake_sweep(), str(tmp_path), ["--config=configs/ablations/fusion.py", "--mode=launch_list"])
  lines = open(path).read().splitlines()
  assert len(lines) == 4
  assert all("--only=" in line and "--mode" not in line for line in lines)
  assert os.path.basename(path) == "launch.txt"


def test_real_tiny_runs_through_the_trainer(tmp_path):
  """2 points x 2 seeds of a tiny ViT on the offline digits, with the real trainer."""
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmjax.train.config import default_config  # pylint: disable=g-import-not-at-top
  base = default_config()
  base.update(dict(total_steps=2, batch_size=16, eval_batch_size=16, log_every=1,
                   eval_every=0, checkpoint_every=0, progress_bar=False))
  base.schedule.warmup_steps = 1
  base.data = pipeline.default_config("digits", data_dir=str(tmp_path / "data"))
  base.model = ml_collections.ConfigDict(dict(
      name="vit", variant=None, width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4,
      num_classes=10, pool_type="gap"))
  sweep = ml_collections.ConfigDict(dict(
      base=base, num_seeds=2, points=[{"model.pool_type": "gap"}, {"model.pool_type": "cls"}],
      plot=dict(x="gflops", y=("eval/accuracy",))))
  lines = []
  sweep_lib.run_sweep(sweep, str(tmp_path / "sweep"), log=lines.append)
  with open(tmp_path / "sweep" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["label"] for r in rows] == ["pool_type=gap", "pool_type=cls"]
  assert all(r["seeds"] == "2" and 0 <= float(r["eval/accuracy_mean"]) <= 1 for r in rows)
  assert float(rows[0]["params_mean"]) > 0 and float(rows[0]["gflops_mean"]) > 0
  assert (tmp_path / "sweep" / "results.png").exists()
  lines.clear()
  sweep_lib.run_sweep(sweep, str(tmp_path / "sweep"), log=lines.append)
  assert sum(line.endswith("finished earlier, skipped.") for line in lines) == 4
