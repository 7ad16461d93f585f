"""Every config in configs/ builds and trains one step at tiny size on a 2x2x2 mesh, so
none of them rots.

Each config is loaded as a user would load it, shrunk by the overrides in TINY (sizes
and offline data only: the recipe, objective and architecture family stay), and trained
for one step by the real trainer. Paper configs whose data cannot exist here (ImageNet,
COCO) train on the offline datasets with the same batch keys; VGGSound on a generated
TFDS dataset in its real feature layout (uint8 video frames, int16 audio, a label), read
through the config's own `fields` and preprocessing. A config added without an entry in TINY fails
`test_every_config_has_tiny_overrides`. Ablation configs expand every point (unknown
override keys fail), trace every point's model, and train their first point one step.
"""
import glob
import importlib.util
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax import sweep as sweep_lib
from mmjax.train.config import load_config_file
from mmjax.train.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "paligemma_224", os.path.join(ROOT, "configs", "paligemma_224.py"))
paligemma_224 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paligemma_224)

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
        "data.name": "digits",
        "data.image_size": None, "data.preprocess": None, "data.eval_preprocess": None},
    "vit_digits.py": {"model.width": 16, "model.depth": 1, "model.num_heads": 2,
                      "model.mlp_dim": 32},
    "caption_digits.py": {"model.width": 16, "model.num_layers": 1, "model.num_heads": 2,
                          "model.mlp_dim": 32, "model.decoder_layers": 1,
                          "generation.decode": ""},  # generation: tests/test_text_eval.py
    "clip_b16.py": TINY_TWO_TOWER,
    "siglip_b16.py": TINY_TWO_TOWER,
    # VGGSound is not here: TinyVggsound below has its layout. Frames are resized to 224
    # by the config's preprocessing; large tubelets keep the token count tiny.
    "mbt_audiovisual.py": {
        **TINY_MULTIMODAL, "model.fusion_layer": 1, "model.video_patch_size": (8, 56, 56),
        "model.num_mel_bins": 16, "data.tfds.tfds_name": "tiny_vggsound"},
}
# Ablations keep their base's depth (their points name fusion layers); only width shrinks.
ABLATION_TINY = {
    "fusion.py": {k: v for k, v in TINY["demo.py"].items()
                  if k not in ("model.num_layers", "model.fusion_layer")},
    "siglip_vs_clip.py": TINY_TWO_TOWER,
}


class TinyVggsound(tfds.core.GeneratorBasedBuilder):
  """VGGSound's feature layout (what configs/mbt_audiovisual.py reads) at toy size:
  8 uint8 frames of 16x16, 1 s of int16 audio at 16 kHz, one of 309 labels."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "video": tfds.features.Tensor(shape=(8, 16, 16, 3), dtype=np.uint8),
        "audio": tfds.features.Tensor(shape=(16000,), dtype=np.int16),
        "label": tfds.features.ClassLabel(num_classes=309)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(16, 0), "test": self._generate_examples(8, 1)}

  def _generate_examples(self, num, seed):
    rng = np.random.default_rng(seed)
    for i in range(num):
      yield i, {"video": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
                "audio": rng.integers(-2**15, 2**15, 16000, dtype=np.int16),
                "label": int(rng.integers(309))}


# The VLM configs keep their prompt layout; paligemma_224 trains on shapes captions (COCO
# is not here) with its own preprocessing at 32 px.
TINY_VLM = {
    "model.encoder": dict(variant=None, width=16, depth=1, mlp_dim=32, num_heads=2,
                          patch_size=8),
    "model.width": 16, "model.depth": 1, "model.num_heads": 2, "model.num_kv_heads": 1,
    "model.head_dim": 8, "model.mlp_dim": 32, "model.max_decode_len": 4,
    "generation.max_len": 4, **TINY_SHAPES}
TINY["vlm_shapes.py"] = TINY_VLM
TINY["paligemma_224.py"] = {
    **TINY_VLM, "model.vocab_size": 300, "model.dtype": "float32", "data.name": "shapes",
    "data.tokenizer": "sentencepiece",
    "data.preprocess": paligemma_224.preprocess(True, 32, "caption"),
    "data.eval_preprocess": paligemma_224.preprocess(False, 32, "caption")}
ABLATION_TINY["vlm_prefix.py"] = TINY_VLM


def _config_names(folder):
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, folder, "*.py")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("datasets"))
  TinyVggsound(data_dir=path, file_format="array_record").download_and_prepare()
  return path


def _tiny(config, overrides, data_dir):
  """`config` with TINY_RUN and `overrides` (model fields the config leaves to their
  defaults, e.g. `width` under a named ViT variant, included)."""
  config = sweep_lib.apply_overrides(config, {**TINY_RUN, **overrides})
  config.data.data_dir = data_dir
  return config


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
def test_config_trains_one_step_on_2x2x2_mesh(name, data_dir, tmp_path, capsys):
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
