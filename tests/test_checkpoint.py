"""Checkpointer robustness and init_from parameter mapping."""
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train_fixtures import tiny_config

from fixtures import example_model_and_batch
from mmjax.errors import ConfigError
from mmjax.nn.embed import PositionGrid, resample_posemb
from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import trainer


def _state(value: float):
  return {"params": {"dense": {"kernel": jnp.full((4, 3), value)}},
          "step": jnp.int32(0 if np.isnan(value) else value)}


def _iterator():
  return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def _target():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=jax.sharding.SingleDeviceSharding(
                                                         jax.devices()[0])), _state(0.0))


def _save_steps(directory, steps):
  checkpointer = checkpoint_lib.Checkpointer(str(directory), keep=5)
  it = _iterator()
  for step in steps:
    next(it)
    checkpointer.save(step, _state(float(step)), it)
  checkpointer.close()


@pytest.mark.parametrize("damage", ["empty_step_dir", "missing_data_file", "truncated_array"])
def test_damaged_newest_step_is_moved_aside_and_previous_restored(tmp_path, damage):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2])
  if damage == "empty_step_dir":
    os.makedirs(directory / "3")
  elif damage == "missing_data_file":
    os.remove(directory / "2" / "data" / "process_0-of-1.json")
  else:
    for path in (directory / "2" / "state").rglob("*"):
      if path.is_file() and "metadata" not in path.name and path.stat().st_size > 16:
        path.write_bytes(path.read_bytes()[:8])

  checkpointer = checkpoint_lib.Checkpointer(str(directory), keep=5)
  it = _iterator()
  state, step = checkpointer.restore_latest(_target(), it)
  good = 2 if damage == "empty_step_dir" else 1
  assert step == good
  np.testing.assert_array_equal(state["params"]["dense"]["kernel"], float(good))
  assert next(it)[0] == 4 * good  # the iterator continues after the batches of that step
  moved = os.listdir(str(directory) + ".corrupt")
  assert len(moved) == 1 and moved[0].startswith("3-" if damage == "empty_step_dir" else "2-")
  checkpointer.save(3, _state(3.0), it)  # a moved-aside step no longer blocks saving it
  checkpointer.close()
  assert 3 in checkpoint_lib.Checkpointer(str(directory), keep=5).steps()


def test_shape_mismatch_is_an_error_listing_parameters(tmp_path):
  _save_steps(tmp_path, [1])
  target = _target()
  target["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((5, 3), jnp.float32)
  with pytest.raises(checkpoint_lib.CheckpointShapeError, match=r"params/dense/kernel.*\(4, 3\)"):
    checkpoint_lib.Checkpointer(str(tmp_path), keep=5).restore_latest(target, _iterator())


def test_nonfinite_state_is_never_saved(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  with pytest.raises(FloatingPointError, match="step 7"):
    checkpointer.save(7, _state(float("nan")), _iterator())
  checkpointer.close()
  assert checkpointer.steps() == []


def test_merge_params_renames_excludes_and_resamples():
  target = {"tower/embed/kernel": np.zeros((1, 8)), "tower/pos_embedding": np.zeros((1, 16, 8)),
            "tower/head/kernel": np.zeros((8, 3)), "fusion/kernel": np.zeros((8, 8))}
  source = {"embed/kernel": np.ones((1, 8)), "pos_embedding": np.ones((1, 4, 8)),
            "head/kernel": np.ones((8, 10)), "decoder/kernel": np.ones((2, 2))}
  grids = {"tower/pos_embedding": PositionGrid(0, 4, 4)}
  merged, report = checkpoint_lib.merge_params(
      target, source, rename=((r"^", "tower/"),), exclude=(r".*/head/.*",),
      skip=(r"tower/decoder/.*",), grids=grids)
  assert report["loaded"] == ["tower/embed/kernel", "tower/pos_embedding"]
  assert report["resampled"] == ["tower/pos_embedding"]
  assert report["new"] == ["fusion/kernel", "tower/head/kernel"]
  assert report["dropped"] == ["decoder/kernel", "head/kernel"]
  assert report["skipped"] == ["decoder/kernel"] and report["excluded"] == ["head/kernel"]
  np.testing.assert_allclose(merged["tower/pos_embedding"], 1.0, atol=1e-6)
  assert merged["tower/pos_embedding"].shape == (1, 16, 8)
  np.testing.assert_array_equal(merged["tower/head/kernel"], 0.0)
  # A trained parameter the model has no place for is refused unless `skip` lists it.
  with pytest.raises(ConfigError, match=r"no parameter for 1 trained parameters of the "
                                        r"checkpoint: decoder/kernel \(as tower/decoder/kernel\);"):
    checkpoint_lib.merge_params(target, source, rename=((r"^", "tower/"),),
                                exclude=(r".*/head/.*",), grids=grids)
  # Only the tables the model names are resampled; any other mismatch is refused.
  with pytest.raises(checkpoint_lib.CheckpointShapeError, match=r"pos_embedding.*\(1, 4, 8\)"):
    checkpoint_lib.merge_params(target, source, rename=((r"^", "tower/"),),
                                exclude=(r".*/head/.*", r".*/decoder/.*"))


def test_init_from_resamples_the_tables_the_model_names_on_their_grids():
  """Class tokens and grids come from the model, not from the lengths: a 2x3 grid behind
  one class token, and a grid-shaped [1, h, w, D] table, both as resample_posemb moves them."""
  rng = np.random.default_rng(0)
  flat, grid_shaped = rng.normal(size=(1, 1 + 2 * 3, 4)), rng.normal(size=(1, 2, 3, 4))
  target = {"vit/pos_embedding": np.zeros((1, 1 + 4 * 6, 4)),
            "tok/pos_embedding": np.zeros((1, 3, 5, 4))}
  grids = {"vit/pos_embedding": PositionGrid(1, 4, 6), "tok/pos_embedding": PositionGrid(0, 3, 5)}
  merged, report = checkpoint_lib.merge_params(
      target, {"vit/pos_embedding": flat, "tok/pos_embedding": grid_shaped}, grids=grids)
  assert report["resampled"] == ["tok/pos_embedding", "vit/pos_embedding"]
  np.testing.assert_allclose(merged["vit/pos_embedding"],
                             resample_posemb(flat, (2, 3), (4, 6), num_prefix_tokens=1), atol=1e-6)
  np.testing.assert_allclose(merged["tok/pos_embedding"].reshape(1, 15, 4),
                             resample_posemb(grid_shaped.reshape(1, 6, 4), (2, 3), (3, 5)),
                             atol=1e-6)
  with pytest.raises(checkpoint_lib.CheckpointShapeError, match="1 class-token row.*4:6 patch grid"):
    checkpoint_lib.merge_params(target, {"vit/pos_embedding": flat[:, :6]}, grids=grids)


def test_init_from_loads_a_subset_into_a_bigger_model(tmp_path):
  source, target = str(tmp_path / "source"), str(tmp_path / "target")
  trainer.train_and_evaluate(tiny_config(total_steps=3), source)
  config = tiny_config(total_steps=1, **{"schedule.name": "constant", "schedule.warmup_steps": 0,
      "data.size": 8, "model.num_classes": 3, "data.num_classes": 3,
      "init_from.checkpoint": source, "init_from.exclude": (r"head/.*",),
      "optimizer.frozen": (r"hidden/.*", r"pos_embedding")})
  trainer.train_and_evaluate(config, target)
  before, after = checkpoint_lib.load_params(source), checkpoint_lib.load_params(target)
  np.testing.assert_array_equal(after["hidden/kernel"], before["hidden/kernel"])  # loaded, frozen
  assert after["pos_embedding"].shape == (1, 64, 16)                             # resampled
  assert after["head/kernel"].shape == (32, 3)                                   # new


def test_restored_state_is_checked_finite(tmp_path, monkeypatch):
  """A step holding NaN (saved here by switching the save-side guard off, as damage that
  the checksums match would look): restore names it, moves it aside, uses the step before."""
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  it = _iterator()
  checkpointer.save(1, _state(1.0), it)
  checkpointer.wait()
  with monkeypatch.context() as patch:
    patch.setattr(checkpoint_lib, "_all_finite_jit", lambda tree: True)
    checkpointer.save(2, _state(float("nan")), it)
    checkpointer.close()
  state, step = checkpoint_lib.Checkpointer(str(tmp_path), keep=5).restore_latest(
      _target(), _iterator())
  assert step == 1
  np.testing.assert_array_equal(state["params"]["dense"]["kernel"], 1.0)
  (moved,) = os.listdir(str(tmp_path) + ".corrupt")
  why = (tmp_path.parent / (tmp_path.name + ".corrupt") / moved / "WHY_MOVED.txt").read_text()
  assert moved.startswith("2-") and "non-finite" in why


def _model_with_position_tables(name):
  from mmjax.models.base import build_model  # pylint: disable=g-import-not-at-top
  from mmjax.train.config import import_models  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import_models()
  image = jnp.zeros((2, 16, 24, 3))  # a 2x3 grid of 8x8 patches: the aspect ratio counts
  tiny_vit = dict(variant=None, width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8)
  if name == "multimodal":
    model, batch = example_model_and_batch(
        fusion="early", modalities=("image", "audio"), loss_weights={"classify": 1.0},
        width=16, num_layers=1, num_heads=2, mlp_dim=32, num_classes=3)
    return model, dict(batch, image=jnp.zeros((len(batch["label"]),) + image.shape[1:]))
  fields, batch = {
      "vit": (tiny_vit, {"image": image, "label": jnp.zeros((2,), jnp.int32)}),
      "two_tower": (dict(patch_size=8, image_width=16, image_depth=1, image_heads=2,
                         text_width=16, text_depth=1, text_heads=2, embed_dim=16,
                         image_pool="map"),
                    {"image": image, "text": jnp.ones((2, 8), jnp.int32)}),
      "vlm": (dict(encoder=tiny_vit, vocab_size=50, width=16, depth=1, num_heads=2,
                   num_kv_heads=1, head_dim=8, mlp_dim=32),
              {"image": image, "prefix": jnp.ones((2, 3), jnp.int32),
               "suffix": jnp.ones((2, 3), jnp.int32)})}[name]
  return build_model(ml_collections.ConfigDict(dict(name=name, **fields))), batch


@pytest.mark.parametrize("name", ["vit", "two_tower", "vlm", "multimodal"])
def test_models_name_their_position_tables_with_their_layout(name):
  """What init_from resamples is what the model says: each named table exists with
  prefix_tokens + height x width rows (or [1, height, width, D]) for this batch."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  model, batch = _model_with_position_tables(name)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, train=False,
                                             method="loss"))
  flat = {k: getattr(v, "value", v).shape
          for k, v in traverse_util.flatten_dict(shapes["params"], sep="/").items()}
  grids = model.position_grids(batch)
  expected = {"vit": ["pos_embedding"], "two_tower": ["img/pos_embedding"],
              "vlm": ["image_encoder/pos_embedding"],
              "multimodal": ["embed_audio/embeddings/pos_embedding",
                             "embed_image/embeddings/pos_embedding"]}[name]
  assert sorted(grids) == expected
  for table, grid in grids.items():
    if name != "multimodal":
      assert (grid.height, grid.width) == (2, 3)
    width = flat[table][-1]
    assert flat[table] in ((1, grid.prefix_tokens + grid.height * grid.width, width),
                           (1, grid.height, grid.width, width)), (table, grid, flat[table])
  assert grids[expected[0]].prefix_tokens == {"vit": 1}.get(name, 0)
