"""Weight-conversion machinery without PyTorch: the name-by-name report, refusals with
names and shapes, scanned layouts, file reading and the big_vision importer."""
import json
import os

import numpy as np
import pytest

from mmjax.convert import common
from mmjax.train import checkpoint


def _shapes(**named):
  return {k.replace("__", "/"): np.zeros(v, np.float32) for k, v in named.items()}


def test_mapper_reports_unused_and_missing_by_name():
  source = {"a.weight": np.ones((3, 2)), "extra.weight": np.ones(4)}
  target = _shapes(a__kernel=(2, 3), b__bias=(5,))
  m = common.Mapper(source, target)
  m.move("a.weight", "a/kernel", common.dense)
  m.move("b.bias", "b/bias")  # absent in the source
  flat, report = m.finish(strict=False)
  np.testing.assert_array_equal(flat["a/kernel"], np.ones((2, 3)))
  assert report.unused == ["extra.weight"]
  assert report.missing == ["b/bias"]
  with pytest.raises(common.ConversionError, match=r"(?s)b/bias.*extra\.weight"):
    common.Mapper(source, target).finish()


def test_mapper_refuses_shape_mismatch_with_names_and_shapes():
  m = common.Mapper({"w": np.ones((4, 3))}, _shapes(k=(3, 5)))
  m.move("w", "k", common.dense)
  with pytest.raises(common.ConversionError, match=r"k <- w: model wants \(3, 5\), checkpoint has \(4, 3\)"):
    m.finish(strict=False)


def test_mapper_allow_patterns_accept_named_leftovers_only():
  m = common.Mapper({"x": np.ones(2), "buf": np.ones(1)}, _shapes(x=(2,), head__kernel=(2, 2)))
  m.move("x", "x")
  _, report = m.finish(allow_missing=[r"head/.*"], allow_unused=["buf"])
  assert report.loaded == ["x"] and report.missing == ["head/kernel"]


def test_linear_rules_round_trip_torch_layout():
  rng = np.random.default_rng(0)
  w_in = rng.normal(size=(8, 4)).astype(np.float32)   # torch [out=heads*head_dim, in]
  k = common.LINEAR_IN.load(w_in, (4, 2, 4))           # mmjax [in, heads, head_dim]
  np.testing.assert_array_equal(k.reshape(4, 8), w_in.T)
  np.testing.assert_array_equal(common.LINEAR_IN.save(k), w_in)
  w_out = rng.normal(size=(4, 8)).astype(np.float32)  # torch [out, in=heads*head_dim]
  k = common.LINEAR_OUT.load(w_out, (2, 4, 4))         # mmjax [heads, head_dim, out]
  np.testing.assert_array_equal(common.LINEAR_OUT.save(k), w_out)


def test_conv_rule_matches_flax_kernel_layout():
  w = np.arange(5 * 3 * 2 * 2, dtype=np.float32).reshape(5, 3, 2, 2)  # [out, in, kh, kw]
  k = common.conv(w, (2, 2, 3, 5))
  assert k[1, 0, 2, 4] == w[4, 2, 1, 0]


def test_scan_and_unscan_are_inverse():
  flat = {"enc/encoderblock/mlp/fc1/kernel": np.arange(24.).reshape(3, 2, 4),
          "enc/encoder_norm/scale": np.ones(4)}
  per_layer = common.unscan_params(flat)
  assert sorted(per_layer) == ["enc/encoder_norm/scale"] + [
      f"enc/encoderblock_{i}/mlp/fc1/kernel" for i in range(3)]
  shapes = common.unscan_shapes(flat)
  assert shapes["enc/encoderblock_2/mlp/fc1/kernel"].shape == (2, 4)
  again = common.scan_params(per_layer, flat)
  assert sorted(again) == sorted(flat)
  np.testing.assert_array_equal(again["enc/encoderblock/mlp/fc1/kernel"],
                                flat["enc/encoderblock/mlp/fc1/kernel"])


def test_read_checkpoint_npz_and_prefix(tmp_path):
  path = str(tmp_path / "ckpt.npz")
  np.savez(path, **{"params/embedding/kernel": np.ones((2, 2, 3, 4), np.float16)})
  flat = common.read_checkpoint(path)
  assert flat["params/embedding/kernel"].dtype == np.float32
  assert list(common.strip_prefix(flat, ("params/",))) == ["embedding/kernel"]
  with pytest.raises(ValueError, match="Unknown checkpoint format"):
    open(tmp_path / "x.txt", "w").close()
    common.read_checkpoint(str(tmp_path / "x.txt"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    common.read_checkpoint(str(tmp_path / "nope.npz"))


def test_read_checkpoint_hf_directory_lists_what_it_found(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({}))
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*config\.json"):
    common.read_checkpoint(str(tmp_path))


def test_saved_checkpoint_is_what_the_trainer_init_from_reads(tmp_path):
  params = {"encoder": {"encoderblock_0": {"mlp": {"fc1": {"kernel": np.arange(6.).reshape(2, 3)}}}},
            "cls": np.ones((1, 1, 3))}
  dst = str(tmp_path / "converted")
  state = common.save_checkpoint(params, dst, model_config={"name": "vit", "width": 3})
  assert state == os.path.join(dst, "state")
  loaded = checkpoint.load_params(dst)
  assert sorted(loaded) == ["cls", "encoder/encoderblock_0/mlp/fc1/kernel"]
  np.testing.assert_array_equal(loaded["encoder/encoderblock_0/mlp/fc1/kernel"],
                                np.arange(6.).reshape(2, 3))
  with open(os.path.join(dst, "model_config.json")) as f:
    assert json.load(f) == {"name": "vit", "width": 3}
  with pytest.raises(FileExistsError, match="already exists"):
    common.save_checkpoint(params, dst)
