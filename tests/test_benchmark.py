"""Smoke tests of experiments/benchmark.py: its smallest cases run and report every figure.

No timing assertions (the machine is shared): only that each figure exists and is sane.
"""
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

# experiments/ is a folder of scripts, not part of the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import baselines, benchmark  # noqa: E402


def _records(path):
  with open(path) as f:
    results = json.load(f)
  assert results["peak_flops_per_s_at_start"] > 0
  return results["records"]


def test_attention_case_reports_time_mfu_memory_and_ratios(tmp_path):
  path = tmp_path / "bench.json"
  benchmark.main(["--quick", "--cases", "attention", "--attention-masks", "none,causal",
                  "--steps", "1", "--json", str(path), "--markdown", str(tmp_path / "b.md")])
  records = _records(path)
  names = {r["name"] for r in records}
  assert {"mmjax", "jax.nn", "flax.linen", "mmjax chunked", "mmjax MHA",
          "flax MHDPA"} <= names
  assert {r["mask"] for r in records if r["name"] == "mmjax"} == {"none", "causal"}
  for r in records:
    assert r["step_s"] > 0 and r["examples_per_s"] > 0 and r["compile_s"] > 0
    assert 0 < r["mfu"] and math.isfinite(r["mfu"])
    assert r["flops_per_step"] > 0 and r["temp_bytes"] is not None
  subject = next(r for r in records if r["name"] == "mmjax")
  baselines_and_other_backend = {"jax.nn", "flax.linen", "mmjax chunked"}
  assert set(subject["speedup_vs"]) == baselines_and_other_backend
  assert set(subject["temp_bytes_vs"]) == baselines_and_other_backend
  assert "| attention L=64 none | mmjax |" in (tmp_path / "b.md").read_text()


def test_train_step_candidate_runs_the_trainer_step_and_counts_flops():
  args = benchmark.parse_args(["--quick", "--steps", "1"])
  ctx = benchmark.Context(args, peak=benchmark.matmul_peak(64))
  model = baselines.ImageClassifier(baselines.StockViT(
      num_classes=10, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64))
  batch = benchmark._image_batch(2, 16, 10)
  candidate = benchmark.train_step_candidate(model, batch)
  losses = [float(candidate["fn"]()) for _ in range(2)]
  assert all(math.isfinite(l) for l in losses) and losses[0] != losses[1]  # state advances
  ctx.time_group("tiny", {"stock": candidate}, examples=2)
  (record,) = ctx.records
  # Forward matmuls of one block + head, x3 for the backward pass, lower bound.
  assert record["flops_per_step"] >= 3 * 2 * 2 * 5 * 32 * 64 * 2
  assert record["params"] > 0 and record["peak_bytes"] >= record["temp_bytes"] > 0


def test_compile_case_records_scan_ratio(tmp_path):
  path = tmp_path / "bench.json"
  benchmark.main(["--quick", "--cases", "compile", "--compile-depths", "1,2",
                  "--json", str(path)])
  records = _records(path)
  deep = [r for r in records if r["layers"] == 2]
  assert {r["scan_layers"] for r in deep} == {True, False}
  assert all(r["ratio_vs_shallowest"] > 0 for r in deep)


def test_stock_vit_has_the_published_parameter_count():
  vit = baselines.StockViT(num_classes=1000, patch_size=16, width=192, depth=12, num_heads=3,
                           mlp_dim=768)
  shapes = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == 5_717_416  # ViT-Ti/16


def test_bad_case_name_is_an_error():
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--cases", "attention,nope"])
