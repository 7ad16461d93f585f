"""User errors, and how the command lines report them.

A `ConfigError` is a mistake of the person running mmjax, not of mmjax: a bad config value
or type, an unknown model / fusion / dataset name, a mesh that does not fit the devices, a
weights file that is missing or truncated. Its message says what was expected and what
was given. `python -m mmjax.main` and `python -m mmjax.convert` print such errors (and a
missing or already existing file) as one `error: ...` line without a traceback; every
other exception is a bug and keeps its traceback. `--debug` keeps the traceback for user errors too.

It subclasses ValueError, so code that catches ValueError keeps working.
"""
import sys
from typing import Any, Callable


class ConfigError(ValueError):
  """A config, command line or input file that cannot work; the message names the fix."""


# What the command lines report in one line: user errors, and paths given on the command
# line or in the config that are missing or already taken.
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError)


def run_reporting_user_errors(fn: Callable[[], Any], debug: bool = False) -> Any:
  """fn(); a user error exits with `error: <message>` (status 1) unless `debug`."""
  try:
    return fn()
  except USER_ERRORS as e:
    if debug:
      raise
    message = " ".join(str(e).split()) if isinstance(e, ConfigError) else _file_message(e)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _file_message(e: OSError) -> str:
  if e.filename and e.strerror:
    return f"{e.strerror}: {e.filename}"
  return " ".join(str(e).split())
