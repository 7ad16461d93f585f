"""Configs that cannot work fail before compilation, with errors naming the fix."""
import pytest

from test_train_fixtures import tiny_config

from mmjax import cli
from mmjax.train import config as config_lib
from mmjax.train import sharding
from mmjax.train import trainer


def test_unknown_top_level_key_lists_valid_keys(tmp_path):
  config = tiny_config()
  config.totl_steps = 3
  with pytest.raises(ValueError, match=r"Unknown config keys \['totl_steps'\].*total_steps"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_unknown_optimizer_key_lists_valid_keys():
  config = tiny_config()
  config.optimizer.learning_rate = 0.1
  with pytest.raises(ValueError, match=r"config.optimizer keys \['learning_rate'\].*'lr'"):
    config_lib.check_keys(config)


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
  config = tiny_config(batch_size=12, **{"mesh.data": 8})
  with pytest.raises(ValueError, match="batch_size.*12.*data-parallel size.*8"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_mesh_larger_than_devices(tmp_path):
  config = tiny_config(**{"mesh.data": 4, "mesh.fsdp": 4})
  with pytest.raises(ValueError, match="= 16 devices, but 8 are available"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # failed before anything was created


def test_bad_values_are_errors():
  with pytest.raises(ValueError, match="on_nonfinite='explode'"):
    config_lib.validate(tiny_config(on_nonfinite="explode"), 8, 1)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    config_lib.validate(tiny_config(grad_accum_steps=3), 8, 1)
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.axis_rules((("embed", "model"),))
  with pytest.raises(ValueError, match="mesh.tensor=-1"):
    sharding.mesh_shape({"data": 2, "fsdp": 1, "tensor": -1}, 8)


def test_data_axis_fills_the_remaining_devices():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)


def test_command_line_override_of_unknown_key_names_valid_keys(tmp_path):
  config_file = tmp_path / "c.py"
  config_file.write_text("from tests.test_train_fixtures import tiny_config\n"
                         "def get_config(arg=None):\n  return tiny_config()\n")
  with pytest.raises(ValueError, match=r"config.optimizer.lrr.*valid keys of config.optimizer"):
    cli.check_overrides([f"--config={config_file}", "--config.optimizer.lrr=0.1"])
  cli.check_overrides([f"--config={config_file}", "--config.optimizer.lr=0.1"])



def test_vlm_encoder_takes_vit_fields_and_remat_policies_are_checked_first():
  config_file = "configs/vlm_shapes.py"
  new = cli.check_overrides([f"--config={config_file}",
                             "--config.model.encoder.remat_policy=full"])
  assert new == {"model.encoder.remat_policy": "full"}  # a ViT field the file leaves unset
  with pytest.raises(ValueError, match=r"config.model.encoder.bogus.*valid keys.*remat_policy"):
    cli.check_overrides([f"--config={config_file}", "--config.model.encoder.bogus=1"])
  config = config_lib.load_config_file(config_file)
  for section in (config.model, config.model.encoder):
    with config_lib.config_keys.unlocked(section):
      section["remat_policy"] = "bogus"
    with pytest.raises(config_lib.ConfigError, match=r"remat_policy='bogus'; expected one of"):
      config_lib.validate(config, 1, 1)
    section["remat_policy"] = "none"
