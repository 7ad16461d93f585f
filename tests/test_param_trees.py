"""Parameter names are the checkpoint format: refactoring must not change them.

tests/golden/param_trees.json records, for every config in configs/ at the tiny sizes
of tests/test_configs.py and for more variants (every fusion strategy, shared weights,
every multimodal objective, MAP pooling with scanned layers), the model config, one
example's batch shapes and {param path: [shape, dtype]}, as written from the code before
the block redesign by tests/golden/make_param_trees.py. Each model is initialised on
shapes only (`jax.eval_shape`), so this costs tracing, no compute.
"""
import json
import os

import jax
import pytest

from tests.golden.make_param_trees import param_tree
from mmjax.train.config import import_models

FIXTURE = os.path.join(os.path.dirname(__file__), "golden", "param_trees.json")
with open(FIXTURE) as f:
  RECORDED = json.load(f)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_parameter_tree_is_unchanged(name):
  import_models()
  entry = RECORDED[name]
  got = param_tree(entry["model"], entry["batch"])
  missing = sorted(set(entry["params"]) - set(got))
  added = sorted(set(got) - set(entry["params"]))
  assert not missing and not added, f"{name}: params missing {missing[:5]}, added {added[:5]}"
  changed = {k: (entry["params"][k], got[k]) for k in got if got[k] != entry["params"][k]}
  assert not changed, f"{name}: shapes / dtypes changed {changed}"
