"""The multimodal model's parameter tree is a checkpoint format: converters, `init_from`
rename presets and saved runs address parameters by path. Every config in configs/ that
builds `multimodal` or `captioning`, and models with every objective's heads, must keep
the parameter paths and shapes recorded in tests/golden/multimodal_params.json.

Re-record (`python tests/test_multimodal_params.py`) only for an intended rename, and
update the converters and rename presets with it.
"""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "multimodal_params.json")

CONFIGS = ("demo.py", "demo.py:ablation", "mbt_audiovisual.py", "caption_digits.py",
           "caption_digits.py:vqa")
TINY = dict(width=32, num_layers=2, num_heads=2, mlp_dim=64, fusion_layer=1,
            num_bottlenecks=2, vocab_size=40, max_text_len=8, embed_dim=16)
# Every objective's heads: classified VQA with all the others, and generated VQA.
OBJECTIVES = {
    "every objective": dict(
        loss_weights={"itc": 1.0, "vqa": 1.0, "classify": 1.0, "itm": 1.0, "mlm": 1.0,
                      "caption": 1.0}, num_classes=10,
        caption_from=("image", "audio"), **TINY),
    "generated vqa, itm alone": dict(
        loss_weights={"vqa": 1.0, "itm": 1.0}, vqa_mode="generate", max_answer_len=4,
        head_hidden_dim=8, combine="gate", **TINY),
}


def _shapes(model, batch):
  variables = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False,
                                                 method="loss"), batch)
  params = traverse_util.flatten_dict(nn.meta.unbox(variables["params"]), sep="/")
  return {path: list(leaf.shape) for path, leaf in sorted(params.items())}


def _config_case(spec):
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmjax.models.base import build_model  # pylint: disable=g-import-not-at-top
  from mmjax.train.config import load_config_file  # pylint: disable=g-import-not-at-top
  config = load_config_file(os.path.join(ROOT, "configs", spec))
  batch = {k: jax.ShapeDtypeStruct((2,) + tuple(shape), dtype)
           for k, (shape, dtype) in pipeline.batch_spec(config.data).items()}
  return build_model(config.model), batch


def parameter_shapes(example_model_and_batch):
  """{case: {parameter path: shape}} for every config and objective case."""
  cases = {spec: _shapes(*_config_case(spec)) for spec in CONFIGS}
  for name, fields in OBJECTIVES.items():
    model, batch = example_model_and_batch(fusion="bottleneck", batch_size=2, **fields)
    if model.vqa_mode == "generate":
      batch = dict(batch, answer_text=jnp.ones((2, model.max_answer_len), jnp.int32))
    cases[name] = _shapes(model, batch)
  return cases


@pytest.fixture(scope="module")
def recorded():
  with open(GOLDEN) as f:
    return json.load(f)


@pytest.mark.parametrize("case", CONFIGS + tuple(OBJECTIVES))
def test_parameter_paths_and_shapes_are_unchanged(case, recorded):
  from fixtures import example_model_and_batch  # pylint: disable=g-import-not-at-top
  if case in CONFIGS:
    got = _shapes(*_config_case(case))
  else:
    model, batch = example_model_and_batch(fusion="bottleneck", batch_size=2,
                                           **OBJECTIVES[case])
    if model.vqa_mode == "generate":
      batch = dict(batch, answer_text=jnp.ones((2, model.max_answer_len), jnp.int32))
    got = _shapes(model, batch)
  want = recorded[case]
  assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
  assert {p: s for p, s in got.items() if s != want[p]} == {}


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from fixtures import example_model_and_batch  # pylint: disable=g-import-not-at-top
  with open(GOLDEN, "w") as f:
    json.dump(parameter_shapes(example_model_and_batch), f, indent=1, sort_keys=True)
  print("wrote", GOLDEN)
