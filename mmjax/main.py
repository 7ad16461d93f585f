"""Command-line entry point: `python -m mmjax.main --config configs/NAME.py --workdir DIR`.

Any config field is overridable, e.g. `--config.optimizer.lr=3e-4 --config.mesh.fsdp=2`;
a key that does not exist is an error naming the valid keys. Running the same command
again resumes from the newest good checkpoint in DIR; what is refused instead (a config
the checkpoint does not fit, a workdir in use, all checkpoints damaged) exits 1 with the
cause, nothing in DIR moved or overwritten.

Multi-process runs (TPU pod slices, multi-node GPU) launch this same command once per
process; see mmjax/train/LAUNCH.md. The coordinator comes from the flags below or is
detected from the cluster environment.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

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
flags.mark_flags_as_required(["config", "workdir"])


def _check_overrides(argv):
  """Reports an unknown `--config.x.y=` key with the valid keys, instead of a traceback."""
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
    spec = argv[argv.index("--config") + 1]
  keys = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if spec and keys:
    config_lib.check_override_keys(config_lib.load_config_file(spec), keys)


def _parse(argv):
  try:
    _check_overrides(argv)
  except ValueError as e:
    sys.exit(f"error: {e}")
  return flags.FLAGS(argv)


def main(argv):
  del argv
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top
  trainer.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                       _PROCESS_ID.value, force=_MULTIPROCESS.value)
  from mmjax.train import checkpoint, lock, workdir  # pylint: disable=g-import-not-at-top
  refusals = (checkpoint.CheckpointShapeError, checkpoint.NoReadableCheckpointError,
              checkpoint.CheckpointSaveError, lock.WorkdirLockedError,
              workdir.UnsupportedWorkdirError)
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, start_over=_START_OVER.value)
  except refusals as e:  # a named cause, not a traceback; exit status 1
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
