"""Command-line parsing shared by `python -m mmjax.main` and `python -m mmjax.aot`.

`--config.a.b=value` overrides any config field, including the selected model's and
dataset's fields that the config file does not set. `ml_collections.config_flags` can only
override keys the file sets, so `parse_flags` checks every key first (naming the valid keys
of an unknown one), hands config_flags the ones it can parse, and returns the others for
`apply_new_overrides`, typed from the config schema. Errors are one `error: ...` line.
"""
import os
import sys
from typing import Dict, List

from absl import flags

from mmjax.errors import ConfigError, run_reporting_user_errors


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


def _without(argv, keys) -> List[str]:
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


def check_overrides(argv) -> Dict[str, str]:
  """Checks every `--config.x.y=` key, naming the valid keys of an unknown one; returns the
  overrides of fields the config file does not set (a model field left at its default,
  a dataset option), which config_flags cannot parse."""
  from mmjax import config_keys  # pylint: disable=g-import-not-at-top
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
  for key, text in overrides.items():  # config_flags cannot set a field the file sets to None
    if key not in new and text in ("None", "none"):
      node, leaf, _ = config_keys.resolve(config, key)
      if not isinstance(node[leaf], str):  # e.g. --config.model.fusion_layer=None
        new.append(key)
  return {key: overrides[key] for key in new}


# Overrides of fields the config file does not set, kept by `parse_flags` for
# `apply_new_overrides`.
NEW_OVERRIDES: Dict[str, str] = {}


def parse_flags(argv):
  """absl flags parser (`app.run(main, flags_parser=parse_flags)`); see the module doc."""
  def parse():
    NEW_OVERRIDES.update(check_overrides(argv))
    parsed_argv = _without(argv, NEW_OVERRIDES)
    if argv == sys.argv:  # config_flags reads its overrides from sys.argv itself
      sys.argv[:] = parsed_argv
    try:
      return flags.FLAGS(parsed_argv)
    except flags.Error as e:  # a bad value or type on the command line
      raise ConfigError(str(e)) from e
  return run_reporting_user_errors(parse, debug="--debug" in argv)


def apply_new_overrides(config) -> None:
  """Applies the overrides config_flags could not parse, typed from the config schema."""
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config_lib.apply_overrides(config, NEW_OVERRIDES, parse=True)
