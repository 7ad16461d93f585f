"""Every config in configs/ builds and trains one step at tiny size on a 2x2x2 mesh, so
none of them rots.

Each config is loaded as a user would load it, shrunk by the overrides in TINY (sizes
and offline data only: the recipe, objective and architecture family stay), and trained
for one step by the real trainer. Paper configs whose data cannot exist here (ImageNet,
COCO, VGGSound) train on the offline datasets with the same batch keys, or on random
arrays of the right shapes. A config added without an entry in TINY fails
`test_every_config_has_tiny_overrides`. Ablation configs expand every point (unknown
override keys fail), trace every point's model, and train their first point one step.
"""
import glob
import os
import types

import grain
import numpy as np
import pytest

from mmjax import sweep as sweep_lib
from mmjax.train.config import load_config_file
from mmjax.train.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny offline data, prepared once per session (see the `data_dir` fixture).
TINY_SHAPES = {"data.shapes": dict(num_train=64, num_validation=16, num_test=16,
                                   vocab_size=64)}
# On the 8 simulated devices as data=2 x fsdp=2 x tensor=2: every config must run on
# every mesh (odd vocabularies are padded, indivisible dimensions replicated).
TINY_RUN = {"total_steps": 1, "batch_size": 8, "eval_batch_size": 8, "log_every": 1,
            "eval_every": 0, "checkpoint_every": 0, "progress_bar": False,
            "schedule.warmup_steps": 0, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
TINY_MULTIMODAL = {"model.width": 16, "model.num_layers": 2, "model.num_heads": 2,
                   "model.mlp_dim": 32, "model.embed_dim": 16}
TINY_TWO_TOWER = {
    "model.patch_size": 8, "model.image_width": 16, "model.image_depth": 1,
    "model.image_heads": 2, "model.image_mlp_dim": 32, "model.text_width": 16,
    "model.text_depth": 1, "model.text_heads": 2, "model.text_mlp_dim": 32,
    "model.embed_dim": 16, "model.vocab_size": 300, "model.max_text_len": 24,
    "data.name": "shapes", "data.image_size": 32, "data.max_text_len": 24,
    "data.tokenizer": "sentencepiece", "data.preprocess": None,
    "data.eval_preprocess": None, **TINY_SHAPES}

TINY = {
    "demo.py": {**TINY_MULTIMODAL, "model.fusion_layer": 1, **TINY_SHAPES},
    "vit_b16_imagenet.py": {
        "model.variant": None, "model.width": 16, "model.depth": 1, "model.num_heads": 2,
        "model.mlp_dim": 32, "model.patch_size": 2, "model.num_classes": 10,
        "model.representation_size": 16, "data.name": "digits",
        "data.image_size": None, "data.preprocess": None, "data.eval_preprocess": None},
    "vit_digits.py": {"model.width": 16, "model.depth": 1, "model.num_heads": 2,
                      "model.mlp_dim": 32},
    "clip_b16.py": TINY_TWO_TOWER,
    "siglip_b16.py": TINY_TWO_TOWER,
    # VGGSound is not here: random clips (2 frames of 16x16, 0.5 s of audio) instead.
    "mbt_audiovisual.py": {
        **TINY_MULTIMODAL, "model.fusion_layer": 1, "model.video_patch_size": (1, 8, 8),
        "model.num_mel_bins": 16, "data_pipeline": "random_av_pipeline"},
}
# Ablations keep their base's depth (their points name fusion layers); only width shrinks.
ABLATION_TINY = {
    "fusion.py": {k: v for k, v in TINY["demo.py"].items()
                  if k not in ("model.num_layers", "model.fusion_layer")},
    "siglip_vs_clip.py": TINY_TWO_TOWER,
}
RANDOM_AV_SHAPES = {"video": ((2, 16, 16, 3), np.float32), "audio": ((8000,), np.float32),
                    "label": ((), np.int32)}


def _config_names(folder):
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, folder, "*.py")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("datasets"))


@pytest.fixture
def random_av_pipeline(monkeypatch):
  """A `config.data_pipeline` module of random audio-visual clips (checkpointable)."""
  def example(index):
    rng = np.random.default_rng(index)
    out = {k: (rng.integers(0, 10) if k == "label" else rng.normal(size=shape)).astype(dtype)
           for k, (shape, dtype) in RANDOM_AV_SHAPES.items()}
    return {**out, "valid": np.True_}

  def create_train_iterator(data_config, *, global_batch_size, seed):
    del data_config
    ds = grain.MapDataset.range(64).shuffle(seed).repeat().map(example)
    return iter(ds.map(lambda e: {k: v for k, v in e.items() if k != "valid"})
                .batch(global_batch_size).to_iter_dataset())

  def create_eval_iterator(data_config, *, global_batch_size):
    del data_config
    return grain.MapDataset.range(16).map(example).batch(global_batch_size)

  module = types.SimpleNamespace(create_train_iterator=create_train_iterator,
                                 create_eval_iterator=create_eval_iterator)
  monkeypatch.setitem(__import__("sys").modules, "random_av_pipeline", module)


def _tiny(config, overrides, data_dir):
  """`config` with TINY_RUN and `overrides`. Model fields the config leaves to their
  defaults (e.g. `width` under a named ViT variant) and the data section of a swapped-in
  dataset are added; build_model and the data pipeline check their names."""
  overrides = {**TINY_RUN, **overrides}
  config = sweep_lib.apply_overrides(config, {k: v for k, v in overrides.items()
                                              if not _new_field(config, k)})
  for key in filter(lambda k: _new_field(config, k), overrides):
    section, field = key.split(".", 1)
    config[section][field] = overrides[key]
  config.data.data_dir = data_dir
  return config


def _new_field(config, key):
  section, _, field = key.partition(".")
  return section in ("model", "data") and "." not in field and field not in config[section]


def _check_one_step(result):
  assert result["step"] == 1
  assert np.isfinite(result["train/loss"])
  assert any(k.startswith("eval/") for k in result)


def test_every_config_has_tiny_overrides():
  assert _config_names("configs") == sorted(TINY), (
      "Add tiny overrides for every config in configs/ to TINY in tests/test_configs.py.")
  assert _config_names("configs/ablations") == sorted(ABLATION_TINY), (
      "Add tiny overrides for every ablation to ABLATION_TINY in tests/test_configs.py.")


@pytest.mark.parametrize("name", sorted(TINY))
def test_config_trains_one_step_on_2x2x2_mesh(name, data_dir, tmp_path, random_av_pipeline, capsys):
  config = load_config_file(os.path.join(ROOT, "configs", name))
  _check_one_step(train_and_evaluate(_tiny(config, TINY[name], data_dir), str(tmp_path)))
  if name == "demo.py":  # its summary hook states what was learned next to chance
    summary = capsys.readouterr().out.split("=== mmjax run summary ===")[-1]
    for line in ("image -> caption recall@1", "caption -> image recall@1", "VQA accuracy"):
      assert line in summary and "chance" in summary.split(line)[1].splitlines()[0]
    assert str(tmp_path / "checkpoints") in summary


@pytest.mark.parametrize("name", sorted(ABLATION_TINY))
def test_ablation_points_build_and_first_point_trains(name, data_dir, tmp_path):
  sweep = load_config_file(os.path.join(ROOT, "configs", "ablations", name))
  sweep.base = _tiny(sweep.base, ABLATION_TINY[name], data_dir)
  runs = sweep_lib.expand(sweep)  # every point's overrides exist and type-check
  assert len(runs) == len(sweep.points) * sweep.num_seeds
  first_seed = [r for r in runs if r.seed == sweep.base.seed]
  for run in first_seed:  # every point's model builds (traced, never compiled)
    cost = sweep_lib.model_cost(run.config)
    assert cost["params"] > 0 and cost["gflops"] > 0
  config = sweep_lib.apply_overrides(first_seed[0].config, TINY_RUN)  # points may set steps
  _check_one_step(train_and_evaluate(config, str(tmp_path)))
