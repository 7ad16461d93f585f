"""First contact: what a new user meets on the command line.

One-line errors for user mistakes (tracebacks only for bugs or with --debug), a console
without library INFO logs, smoke tests of long recipes with --config.total_steps=3,
overrides of model fields the config file does not set, and the demo's summary hook
found from any directory. The subprocess tests run the real command lines.
"""
import importlib
import logging
import os
import re
import subprocess
import sys
import warnings

import ml_collections
import numpy as np
import pytest

from test_train_fixtures import subprocess_env, tiny_config

from mmjax import cli
from mmjax.convert import common
from mmjax.errors import ConfigError, run_reporting_user_errors
from mmjax.train import config as config_lib
from mmjax.train import optim
from mmjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
INFO_LINE = re.compile(r"^I\d{4} ", re.M)  # absl's format of an INFO record


def _run(args, tmp_path, cwd=None):
  return subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=300,
                        cwd=cwd or ROOT, env=subprocess_env(1, tmp_path / "cache"))


def _tiny_config_file(tmp_path, **overrides):
  path = tmp_path / "tiny.py"
  path.write_text("from tests.test_train_fixtures import tiny_config\n"
                  f"def get_config(arg=None):\n  return tiny_config(**{overrides!r})\n")
  return str(path)


# ---------------------------------------------------------------------------- one-line errors

def test_cli_user_error_is_one_line_before_any_folder_is_made(tmp_path):
  workdir, data_dir = tmp_path / "work", tmp_path / "data"
  args = ["-m", "mmjax.main", f"--config={DEMO}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.model.fusion=nope"]
  quiet = _run(args, tmp_path)
  assert quiet.returncode == 1
  assert quiet.stderr.strip().splitlines()[-1].startswith(
      "error: Unknown fusion strategy 'nope'; expected one of ['bottleneck'")
  assert "Traceback" not in quiet.stderr + quiet.stdout
  assert not workdir.exists() and not data_dir.exists()  # checked before data or workdir


def test_debug_keeps_the_traceback_and_bugs_always_have_one(capsys):
  def user_error():
    raise ConfigError("config.x=1; expected 2.")
  with pytest.raises(SystemExit) as exit_info:
    run_reporting_user_errors(user_error)
  assert exit_info.value.code == 1 and capsys.readouterr().err == "error: config.x=1; expected 2.\n"
  with pytest.raises(ConfigError):  # --debug
    run_reporting_user_errors(user_error, debug=True)
  with pytest.raises(ZeroDivisionError):  # a bug is not a user error
    run_reporting_user_errors(lambda: 1 / 0)


@pytest.mark.parametrize("key, value, message", [
    ("data.name", "nope", "Unknown dataset 'nope'"),
    ("mesh.data", 3, "= 3 devices, but 8 are available"),
    ("model.dropath_rate", "0.1", "Unknown config key config.model.dropath_rate"),
    ("model.droppath_rate", "abc", "--config.model.droppath_rate='abc': expected a float"),
    ("init_from.checkpoint", "/no/such/run", "'/no/such/run' does not exist"),
])
def test_user_errors_are_config_errors_raised_before_the_workdir(key, value, message, tmp_path):
  """The checks behind each one-line error, in process (the CLI prints their message)."""
  config = config_lib.load_config_file(DEMO)
  config.data.data_dir = str(tmp_path / "data")
  with pytest.raises(ConfigError, match=re.escape(message)):
    new = cli.check_overrides(["x", f"--config={DEMO}", f"--config.{key}={value}"])
    config_lib.apply_overrides(config, {key: value}, parse=key in new)
    trainer.train_and_evaluate(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists() and not (tmp_path / "data").exists()


def test_missing_config_file_and_bad_flag_type_are_one_line(tmp_path):
  missing = _run(["-m", "mmjax.main", "--config=configs/nope.py", f"--workdir={tmp_path}"],
                 tmp_path)
  assert missing.returncode == 1 and "Traceback" not in missing.stderr
  assert missing.stderr.strip().splitlines()[-1] == (
      "error: --config=configs/nope.py: no such file; expected configs/NAME.py[:ARG].")


def test_truncated_weights_file_is_named(tmp_path):
  src = tmp_path / "vit.npz"
  np.savez(src, **{f"w{i}": np.ones((64, 64), np.float32) for i in range(4)})
  src.write_bytes(src.read_bytes()[:5000])
  with pytest.raises(ConfigError, match=f"Cannot read weights file {re.escape(str(src))}"):
    common.read_checkpoint(str(src))
  cli = _run(["-m", "mmjax.convert", "--from", "big_vision", "--src", str(src), "--dst",
              str(tmp_path / "out")], tmp_path)
  assert cli.returncode == 1 and "Traceback" not in cli.stderr
  last = cli.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: Cannot read weights file {src} (5,000 bytes)")
  assert not (tmp_path / "out").exists()


# ------------------------------------------------- a quiet console; short runs of long recipes

def test_smoke_run_of_a_long_warmup_is_quiet_and_runs(tmp_path):
  config = _tiny_config_file(tmp_path, **{"schedule.warmup_steps": 100, "progress_bar": True})
  run = _run(["-m", "mmjax.main", f"--config={config}", f"--workdir={tmp_path / 'w'}",
              "--config.total_steps=3", "--config.checkpoint_every=1"], tmp_path)
  assert run.returncode == 0, run.stderr[-2000:]
  console = run.stdout + run.stderr
  assert not INFO_LINE.search(console), INFO_LINE.findall(console)[:3]  # orbax, absl, jax
  assert "warmup_steps=100 exceeds config.total_steps=3" in console
  assert "=== mmjax run summary ===" in run.stdout and "3/3" in run.stderr  # bar + summary
  assert "Using custom data configuration" not in console


def test_log_level_info_brings_library_logs_back():
  from mmjax import console  # pylint: disable=g-import-not-at-top
  libraries = [logging.getLogger(name) for name in ("absl", "jax", "orbax")]
  try:
    console.set_log_level("warning")
    assert not any(logger.isEnabledFor(logging.INFO) for logger in libraries)
    console.set_log_level("info")
    assert all(logger.isEnabledFor(logging.INFO) for logger in libraries)
  finally:
    console.set_log_level("info")  # the default of absl outside the command line
  with pytest.raises(ConfigError, match="--log_level='loud'"):
    console.set_log_level("loud")


def test_warmup_longer_than_the_run_is_clamped():
  config = tiny_config(total_steps=3, **{"schedule.warmup_steps": 100})
  schedule = optim.make_schedule(config)
  lrs = [float(schedule(step)) for step in range(4)]
  assert lrs[0] == 0.0 and lrs[3] == pytest.approx(config.optimizer.lr)  # peak at the end
  assert lrs[1] == pytest.approx(config.optimizer.lr / 3)


# ---------------------------------------------------- overrides of fields the config omits

def test_model_field_the_config_does_not_set_is_overridable_with_its_type():
  config = config_lib.load_config_file(DEMO)
  assert "droppath_rate" not in config.model and "tfds" not in config.data
  argv = ["x", f"--config={DEMO}", "--config.model.droppath_rate=0.1",
          "--config.model.optimizer_never=1"]
  with pytest.raises(ConfigError, match="valid keys of config.model: .*'droppath_rate'"):
    cli.check_overrides(argv)
  new = cli.check_overrides(argv[:-1] + ["--config.data.tfds.tfds_name=vggsound"])
  assert new == {"model.droppath_rate": "0.1", "data.tfds.tfds_name": "vggsound"}
  config_lib.apply_overrides(config, new, parse=True)
  assert config.model.droppath_rate == 0.1 and config.data.tfds.tfds_name == "vggsound"
  config_lib.check_keys(config)  # validation walks the same schema


def test_sweep_points_and_validation_use_the_same_walker():
  from mmjax import sweep  # pylint: disable=g-import-not-at-top
  config = sweep.apply_overrides(config_lib.load_config_file(DEMO),
                                 {"model.droppath_rate": 0.2, "data.shapes.noise": 0.1})
  assert config.model.droppath_rate == 0.2 and config.data.shapes.noise == 0.1
  config.data.shapes.nois = 0.1
  with pytest.raises(ConfigError, match=r"Unknown config.data.shapes options \['nois'\]"):
    config_lib.check_keys(config)


# ----------------------------------------------------------- the demo outside the checkout

def test_demo_summary_hook_resolves_from_any_directory(tmp_path):
  """With only the installed package importable (no repo root, no experiments/)."""
  site = tmp_path / "site"
  site.mkdir()
  os.symlink(os.path.join(ROOT, "mmjax"), site / "mmjax")
  code = ("import importlib.util, sys; from mmjax.train import config as c; "
          f"cfg = c.load_config_file({DEMO!r}); "
          "assert importlib.util.find_spec('experiments') is None; "
          "print([h.__module__ + '.' + h.__name__ for h in c.summary_hooks(cfg)])")
  env = dict(subprocess_env(1, tmp_path / "cache"), PYTHONPATH=str(site))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "['mmjax.demo_summary.demo_summary_hook']"


def test_old_experiments_demo_summary_import_still_works_with_a_warning():
  sys.modules.pop("experiments.demo_summary", None)
  try:
    with pytest.warns(DeprecationWarning, match="mmjax.demo_summary"):
      old = importlib.import_module("experiments.demo_summary")
    assert old.demo_summary_hook in trainer.SUMMARY_HOOKS
  finally:
    trainer.SUMMARY_HOOKS[:] = [h for h in trainer.SUMMARY_HOOKS
                                if h.__module__ != "mmjax.demo_summary"]
  config = ml_collections.ConfigDict({"summary_hooks": ("mmjax.demo_summary.nope",)})
  with pytest.raises(ConfigError, match="summary_hooks entry 'mmjax.demo_summary.nope'"):
    config_lib.summary_hooks(config)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    config_lib.summary_hooks(config_lib.load_config_file(DEMO))  # the new path: no warning


# ------------------------------------------------------------------------- honesty fixes

def test_default_evaluate_returns_each_examples_own_loss_and_metrics():
  """The base Model's evaluate honours the per-example contract (a [B] array per key)."""
  from experiments.baselines import ImageClassifier  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  class Linear(nn.Module):
    @nn.compact
    def __call__(self, image, train=False):
      return nn.Dense(3)(image.reshape(image.shape[0], -1))

  model = ImageClassifier(encoder=Linear())
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(5, 2, 2, 1)).astype(np.float32),
           "label": np.array([0, 1, 2, 0, 1], np.int32)}
  params = model.init(jax.random.key(0), batch, method="loss")
  out = model.apply(params, batch, method="evaluate")
  assert {k: v.shape for k, v in out.items()} == {"loss": (5,), "accuracy": (5,)}
  for i in range(5):  # row i is example i alone
    one = model.apply(params, {k: v[i:i + 1] for k, v in batch.items()}, method="loss")
    np.testing.assert_allclose(out["loss"][i], one[0], rtol=1e-6)
    assert out["accuracy"][i] == one[1]["accuracy"]


def test_itm_initialises_on_one_row():
  """A 1-device mesh initialises with one example: ITM's hard negatives need two."""
  import jax  # pylint: disable=g-import-not-at-top
  from fixtures import example_model_and_batch  # pylint: disable=g-import-not-at-top
  model, batch = example_model_and_batch(
      fusion="early", modalities=("image",), loss_weights={"itm": 1.0}, width=16,
      num_layers=1, num_heads=2, mlp_dim=32, embed_dim=16, batch_size=1)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, method="loss"))
  assert "itm_head" in shapes["params"]


def test_clip_temperature_starts_at_one_over_0_07_in_both_models():
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax.models import heads  # pylint: disable=g-import-not-at-top
  z = np.eye(2, 4, dtype=np.float32)
  for loss, expected in (("softmax", 1 / 0.07), ("sigmoid", 10.0)):
    params = heads.ContrastiveHead(loss).init(jax.random.key(0), z, z)["params"]
    assert np.exp(params["logit_scale"]) == pytest.approx(expected, rel=1e-6)
  from fixtures import example_model_and_batch  # pylint: disable=g-import-not-at-top
  from mmjax.models import two_tower  # pylint: disable=g-import-not-at-top
  model, batch = example_model_and_batch(
      fusion="early", modalities=("image",), loss_weights={"itc": 1.0}, width=16,
      num_layers=1, num_heads=2, mlp_dim=32, embed_dim=16, batch_size=2)
  params = jax.jit(lambda: model.init(jax.random.key(0), batch, method="loss"))()["params"]
  assert np.exp(params["contrastive"]["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-6)
  assert two_tower.TwoTower.scale_init is None  # the same head default (tested above)
  siglip = config_lib.load_config_file(os.path.join(ROOT, "configs", "siglip_b16.py"))
  assert siglip.model.max_logit_scale is None  # as its docstring says: no cap


# ------------------------------------------------------- converted weights train in one flag

def test_init_from_a_converted_checkpoint_fills_the_model_fields_the_config_leaves_unset(
    tmp_path):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from test_train_fixtures import TokenClassifier  # pylint: disable=g-import-not-at-top
  image = np.zeros((1, 4, 4, 1), np.float32)
  params = nn.meta.unbox(
      TokenClassifier(width=8).init(jax.random.key(0), {"image": image}, False)["params"])
  dst = str(tmp_path / "converted")
  common.save_checkpoint(jax.device_get(params), dst, model_config={
      "name": "test_token_classifier", "width": 8, "num_classes": 4, "dropout": 0.5})
  config = tiny_config(total_steps=1, **{"init_from.checkpoint": dst})
  del config.model["width"]  # left to the checkpoint; dropout stays the config's 0.1
  assert config_lib.model_fields_from_init_checkpoint(config) == {"width": 8}
  assert config.model.width == 8 and config.model.dropout == 0.1
  fresh = tiny_config(total_steps=1, **{"init_from.checkpoint": dst})
  del fresh.model["width"]  # the model default is 16: without the checkpoint's 8, shapes clash
  assert trainer.train_and_evaluate(fresh, str(tmp_path / "run"))["step"] == 1
  other = tiny_config(**{"init_from.checkpoint": dst, "model.name": "multimodal"})
  assert config_lib.model_fields_from_init_checkpoint(other) == {}  # another model: nothing


def test_rename_preset_carries_mlm_text_weights_into_the_question_stream():
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from fixtures import example_model_and_batch  # pylint: disable=g-import-not-at-top
  from mmjax.train import checkpoint  # pylint: disable=g-import-not-at-top

  def flat_params(modalities, loss_weights):
    model, batch = example_model_and_batch(
        fusion="bottleneck", modalities=modalities, loss_weights=loss_weights, width=16,
        num_layers=2, fusion_layer=1, num_heads=2, mlp_dim=32, embed_dim=16)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, method="loss"))
    flat = traverse_util.flatten_dict(shapes["params"], sep="/")
    return {k: np.zeros(getattr(v, "value", v).shape, np.float32) for k, v in flat.items()}

  pretrained = flat_params(("image", "text"), {"mlm": 1.0})
  finetuned = flat_params(("image", "question"), {"vqa": 1.0})
  rules = checkpoint.rename_rules(("mlm_text_to_question",))
  _, report = checkpoint.merge_params(finetuned, pretrained, rename=rules)
  assert not report["dropped"]  # every pre-trained parameter has its place
  assert report["new"] == sorted(k for k in finetuned if k.startswith("vqa_head/"))
  assert "fusion_encoder/question_block0/attention/query/kernel" in report["loaded"]
  with pytest.raises(ConfigError, match="preset 'mlm_to_vqa'"):
    checkpoint.rename_rules(("mlm_to_vqa",))


def test_converted_position_table_that_disagrees_with_its_config_json_is_refused(tmp_path):
  transformers = pytest.importorskip("transformers")  # the convert extra, not mmjax
  import json  # pylint: disable=g-import-not-at-top
  from mmjax.convert import hf  # pylint: disable=g-import-not-at-top
  model = transformers.ViTModel(transformers.ViTConfig(
      hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
      image_size=32, patch_size=8))
  model.save_pretrained(str(tmp_path))
  hf.load(str(tmp_path))  # 4x4 grid + class token: fits
  config_file = tmp_path / "config.json"
  config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), image_size=48)))
  with pytest.raises(common.ConversionError, match="has 17 rows, but config.json .*6x6 grid"):
    hf.load(str(tmp_path))


def test_init_from_refuses_dropping_trained_parameters_unless_skip_lists_them(caplog):
  from mmjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  target = {"embed/kernel": np.zeros((2, 2)), "head/kernel": np.zeros((2, 3))}
  source = {"embed/kernel": np.ones((2, 2)), "head/kernel": np.ones((2, 3)),
            "pre_logits/kernel": np.ones((2, 2))}
  with pytest.raises(ConfigError, match=r"no parameter for 1 trained parameters of the "
                                        r"checkpoint: pre_logits/kernel; .*init_from.skip"):
    checkpoint.merge_params(target, source, exclude=(r"head/.*",))
  _, report = checkpoint.merge_params(target, source, exclude=(r"head/.*",),
                                      skip=(r"pre_logits/.*",))
  assert report["dropped"] == ["head/kernel", "pre_logits/kernel"]
  assert report["excluded"] == ["head/kernel"] and report["skipped"] == ["pre_logits/kernel"]
  with caplog.at_level(logging.WARNING):
    trainer._log_init_from(report, "/ckpt")
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and "1 trained parameters" in warned[0]
  assert "pre_logits/kernel" in warned[0] and "head/kernel" not in warned[0]