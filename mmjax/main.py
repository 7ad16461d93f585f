"""Command-line entry point: `python -m mmjax.main --config configs/NAME.py --workdir DIR`.

Any config field is overridable, e.g. `--config.optimizer.lr=3e-4 --config.mesh.fsdp=2`,
and so is every field of the selected model and option of the selected dataset, set in
the config file or not (`--config.model.droppath_rate=0.1`); a key that does not exist
is an error naming the valid keys (see mmjax/cli.py). Running the same command again
resumes from the newest good checkpoint in DIR; what is refused instead (a config the
checkpoint does not fit, a workdir in use, all checkpoints damaged) exits 1 with the
cause, nothing in DIR moved or overwritten.

User errors (a bad value, an unknown name, a missing file, a mesh that does not fit) are
one `error: ...` line; `--debug` shows their traceback. Library logs are off unless
`--log_level=info` (or `--verbosity=1`).

Multi-process runs (TPU pod slices, multi-node GPU) launch this same command once per
process; see mmjax/train/LAUNCH.md. The coordinator comes from the flags below or is
detected from the cluster environment.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from mmjax import console
from mmjax import cli
from mmjax.errors import run_reporting_user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/NAME.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs "
    "(default: detected from the cluster environment).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the run.")
_START_OVER = flags.DEFINE_bool(
    "start_over", False, "Train from step 0 when every checkpoint in the workdir is damaged "
    "(they are moved to checkpoints.corrupt/); without it such a run is refused.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Force jax.distributed.initialize() with the cluster's own "
    "auto-detection (TPU pod slices, SLURM, Open MPI) even where mmjax does not detect it.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of user errors too (a bad "
                           "config value, an unknown name, a missing file).")
_LOG_LEVEL = flags.DEFINE_enum("log_level", "warning", console.LOG_LEVELS,
                               "Level of library logs (orbax, absl, jax, TFDS) on the console; "
                               "info brings them all back.")
flags.mark_flags_as_required(["config", "workdir"])

def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # absl's own --verbosity wins
    console.set_log_level(_LOG_LEVEL.value)

  def run():
    from mmjax.train import checkpoint, lock, trainer, workdir  # pylint: disable=g-import-not-at-top
    config = _CONFIG.value
    cli.apply_new_overrides(config)
    trainer.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                         _PROCESS_ID.value, force=_MULTIPROCESS.value)
    refusals = (checkpoint.CheckpointShapeError, checkpoint.NoReadableCheckpointError,
                checkpoint.CheckpointSaveError, lock.WorkdirLockedError,
                workdir.UnsupportedWorkdirError)
    try:
      trainer.train_and_evaluate(config, _WORKDIR.value, start_over=_START_OVER.value)
    except refusals as e:  # a named cause, not a traceback; exit status 1
      sys.exit(f"error: {e}")
  run_reporting_user_errors(run, debug=_DEBUG.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
