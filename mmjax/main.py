"""Command-line entry point: `python -m mmjax.main --config configs/NAME.py --workdir DIR`.

Any config field is overridable, e.g. `--config.optimizer.lr=3e-4 --config.mesh.fsdp=2`,
and so is every field of the selected model and option of the selected dataset, set in
the config file or not (`--config.model.droppath_rate=0.1`); a key that does not exist
is an error naming the valid keys. Running the same command again resumes from the
newest good checkpoint in DIR.

User errors (a bad value, an unknown name, a missing file, a mesh that does not fit) are
one `error: ...` line; `--debug` shows their traceback. Library logs are off unless
`--log_level=info` (or `--verbosity=1`).

Multi-process runs (TPU pod slices, multi-node GPU) launch this same command once per
process; see mmjax/train/LAUNCH.md. The coordinator comes from the flags below or is
detected from the cluster environment.
"""
import os
import sys
from typing import Dict

from absl import app, flags
from ml_collections import config_flags

from mmjax import console
from mmjax.errors import ConfigError, run_reporting_user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/NAME.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs "
    "(default: detected from the cluster environment).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the run.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Force jax.distributed.initialize() with the cluster's own "
    "auto-detection (TPU pod slices, SLURM, Open MPI) even where mmjax does not detect it.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of user errors too (a bad "
                           "config value, an unknown name, a missing file).")
_LOG_LEVEL = flags.DEFINE_enum("log_level", "warning", console.LOG_LEVELS,
                               "Level of library logs (orbax, absl, jax, TFDS) on the console; "
                               "info brings them all back.")
flags.mark_flags_as_required(["config", "workdir"])

# Overrides of fields the config file does not set, applied in `main` (see _check_overrides).
_NEW_OVERRIDES: Dict[str, str] = {}


def _override_args(argv) -> Dict[str, str]:
  """{dotted key: text} of the `--config.a.b=text` / `--config.a.b text` arguments."""
  out = {}
  for i, arg in enumerate(argv):
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq and i + 1 < len(argv):
        value = argv[i + 1]
      out[key] = value
  return out


def _without(argv, keys) -> list:
  """`argv` without the `--config.KEY=...` (or `--config.KEY VALUE`) arguments of `keys`."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    if not arg.startswith("--config."):
      out.append(arg)
      continue
    key, eq, _ = arg[len("--config."):].partition("=")
    if key in keys:
      skip = not eq
      continue
    out.append(arg)
  return out


def _check_overrides(argv) -> Dict[str, str]:
  """Checks every `--config.x.y=` key, naming the valid keys of an unknown one; returns the
  overrides of fields the config file does not set (a model field left at its default,
  a dataset option), which config_flags cannot parse and `main` applies by their type."""
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
    spec = argv[argv.index("--config") + 1]
  if not spec:
    return {}
  if not os.path.isfile(spec.partition(":")[0]):
    raise ConfigError(f"--config={spec}: no such file; expected configs/NAME.py[:ARG].")
  config = config_lib.load_config_file(spec)  # its own errors, before config_flags hides them
  overrides = _override_args(argv)
  new = config_lib.check_override_keys(config, overrides) if overrides else []
  return {key: overrides[key] for key in new}


def _parse(argv):
  def parse():
    _NEW_OVERRIDES.update(_check_overrides(argv))
    parsed_argv = _without(argv, _NEW_OVERRIDES)
    if argv == sys.argv:  # config_flags reads its overrides from sys.argv itself
      sys.argv[:] = parsed_argv
    try:
      return flags.FLAGS(parsed_argv)
    except flags.Error as e:  # a bad value or type on the command line
      raise ConfigError(str(e)) from e
  return run_reporting_user_errors(parse, debug="--debug" in argv)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # absl's own --verbosity wins
    console.set_log_level(_LOG_LEVEL.value)

  def run():
    from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
    from mmjax.train import trainer  # pylint: disable=g-import-not-at-top
    config = _CONFIG.value
    config_lib.apply_overrides(config, _NEW_OVERRIDES, parse=True)
    trainer.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                         _PROCESS_ID.value, force=_MULTIPROCESS.value)
    trainer.train_and_evaluate(config, _WORKDIR.value)
  run_reporting_user_errors(run, debug=_DEBUG.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
