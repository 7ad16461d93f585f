"""What a run prints: mmjax's own lines, the progress bar and the summary.

Orbax, absl, jax and TFDS log every checkpoint, dataset and backend step at INFO (a demo
run printed about 126 such lines, breaking the progress bar). The command line keeps
warnings and errors only (`set_log_level("warning")`); `--log_level=info` (or absl's
own `--verbosity=1`) brings the library logs back.
"""
import logging

from absl import logging as absl_logging

from mmjax.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")

# Warnings that are expected in every mmjax run and carry a whole config in their text:
# mmjax's builders always pass their options as a custom TFDS BuilderConfig.
_EXPECTED_WARNINGS = ("Using custom data configuration",)


class _DropExpected(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and record.msg.startswith(_EXPECTED_WARNINGS))


def set_log_level(level: str = "warning") -> None:
  """Library (and absl) logs at `level` and above; below "info", expected noise is dropped."""
  level = level.lower()
  if level not in LOG_LEVELS:
    raise ConfigError(f"--log_level={level!r}; expected one of {LOG_LEVELS}.")
  absl_logging.set_verbosity(level)  # the root logger's level once absl's handler is used
  logging.getLogger().setLevel(level.upper())
  absl_logger = logging.getLogger("absl")
  for f in [f for f in absl_logger.filters if isinstance(f, _DropExpected)]:
    absl_logger.removeFilter(f)
  if level in ("warning", "error"):
    absl_logger.addFilter(_DropExpected())
