"""Metric records, MFU peaks and the end-of-run summary."""
import json
import types

import jax
import ml_collections
import numpy as np

from mmjax.train import trainer
from mmjax.train import writers


def test_peak_flops_from_table_and_measured_on_cpu():
  tpu = types.SimpleNamespace(device_kind="TPU v5 lite", platform="tpu")
  gpu = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
  assert writers.device_peak_flops(tpu) == 197e12
  assert writers.device_peak_flops(gpu) == 989e12
  assert 1e6 < writers.device_peak_flops(jax.devices()[0]) < 1e14  # a measured CPU rate


def test_metric_writer_appends_json_lines_and_tensorboard_events(tmp_path):
  writer = writers.MetricWriter(str(tmp_path))
  writer.write(1, {"loss": np.float32(0.5), "lr": jax.numpy.array(1e-3)})
  writer.write(2, {"loss": 0.25, "eval/accuracy": 0.9})
  writer.close()
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert records == [{"step": 1, "loss": 0.5, "lr": np.float32(1e-3).item()},
                     {"step": 2, "loss": 0.25, "eval/accuracy": 0.9}]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_inactive_writer_writes_nothing(tmp_path):
  writers.MetricWriter(str(tmp_path / "other"), active=False).write(1, {"loss": 1.0})
  assert not (tmp_path / "other").exists()


def test_summary_lists_results_and_runs_hooks():
  config = ml_collections.ConfigDict({"name": "run-a"})
  trainer.SUMMARY_HOOKS.append(
      lambda r, c, w: f"{c.name} in {w}: best accuracy {r['eval/accuracy']:.0%}")
  try:
    text = trainer.format_summary({"step": 10, "eval/accuracy": 0.875}, config, "/tmp/run-a")
  finally:
    trainer.SUMMARY_HOOKS.pop()
  assert "eval/accuracy  0.875" in text and "step" in text
  assert text.endswith("run-a in /tmp/run-a: best accuracy 88%")
