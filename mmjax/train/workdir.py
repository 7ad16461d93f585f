"""What a run directory holds besides checkpoints and metrics: its config and config history.

  WORKDIR/config.json            the config of the newest launch, written only once the
                                 config has been checked against the checkpoint it resumes
  WORKDIR/config_history/N.json  the configs of earlier launches that differed from it
                                 (N = 0, 1, ...: oldest first), so no setting is forgotten

The workdir may be a local directory or a gs:// URL (`mmjax.train.paths` reads and writes
both). `resolve` turns --workdir into the absolute path or URL the trainer uses, refusing
other URLs (which os.path would turn into a local `s3:` folder);
`resume_mismatch` turns a checkpoint that does not fit the config into an error that
shows what changed since the checkpoint was written and what to do about it.
"""
import json
import os
from typing import Any, Dict, List, Optional

import ml_collections
from etils import epath

from mmjax.errors import ConfigError
from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import paths

CONFIG_FILE = "config.json"
HISTORY_DIR = "config_history"


class UnsupportedWorkdirError(ConfigError):
  """--workdir names a place the trainer cannot write to (e.g. an s3:// URL)."""


class ResumeMismatchError(checkpoint_lib.CheckpointShapeError):
  """The checkpoint in the workdir cannot hold the state the (changed) config builds."""


def resolve(workdir: str) -> str:
  """The absolute local path of `workdir`, or its gs:// URL; other URLs are refused."""
  if not workdir:
    raise UnsupportedWorkdirError("--workdir is empty; expected a directory path.")
  scheme = paths.scheme(workdir)
  if scheme is not None and scheme not in paths.SUPPORTED_SCHEMES:
    raise UnsupportedWorkdirError(
        f"--workdir={workdir}: {scheme}:// workdirs are not supported; use a local path or "
        "a gs://BUCKET/PATH URL.")
  if scheme is not None and not workdir.split("://", 1)[1].strip("/"):
    raise UnsupportedWorkdirError(f"--workdir={workdir}: expected gs://BUCKET/PATH.")
  if scheme == "gs":
    _check_gcs_credentials(workdir)
  return paths.absolute(workdir)


def _check_gcs_credentials(workdir: str) -> None:
  """Refuses a gs:// workdir up front when this host has no Google credentials (the
  emulator named by STORAGE_EMULATOR_HOST needs none)."""
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return
  import google.auth  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions  # pylint: disable=g-import-not-at-top
  try:
    google.auth.default()
  except exceptions.DefaultCredentialsError as e:
    raise UnsupportedWorkdirError(
        f"--workdir={workdir}: no Google Cloud credentials on this host ({str(e).split('.')[0]}); "
        "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS."
    ) from e


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _as_dict(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def read_config(workdir: str) -> Optional[Dict[str, Any]]:
  """The config.json of `workdir` as a dict, or None if there is none (or it is unreadable)."""
  try:
    text = paths.read_text(os.path.join(workdir, CONFIG_FILE))
    return None if text is None else json.loads(text)
  except (OSError, ValueError):
    return None


def config_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
  """'field: old -> new' for every dotted field whose value differs (JSON values)."""
  old_flat, new_flat = _flat(old), _flat(new)
  missing = object()
  lines = []
  for key in sorted(set(old_flat) | set(new_flat)):
    a, b = old_flat.get(key, missing), new_flat.get(key, missing)
    if a != b:
      show = lambda v: "(absent)" if v is missing else json.dumps(v)
      lines.append(f"{key}: {show(a)} -> {show(b)}")
  return lines


def resume_mismatch(error: checkpoint_lib.CheckpointShapeError, workdir: str,
                    config: ml_collections.ConfigDict) -> ResumeMismatchError:
  """The error to raise when the workdir's checkpoint does not fit `config`."""
  old = read_config(workdir)
  if old is None:
    changes = f"(no readable {CONFIG_FILE} in {workdir} to compare with)"
  else:
    diff = config_diff(old, _as_dict(config))
    changes = ("\n  ".join(["config changes since the checkpoint was written "
                            f"({CONFIG_FILE} -> this run):"] + diff)
               if diff else "(config.json equals this config: the model code changed)")
  lines = str(error).splitlines()
  mismatches = "\n".join(lines[:13] + (["  ..."] if len(lines) > 13 else []))
  return ResumeMismatchError(
      f"Refusing to resume from {workdir}: its checkpoint cannot hold the state this config "
      f"builds.\n{changes}\n{mismatches}\n"
      "Nothing was moved or overwritten. To train the changed config, use a new --workdir "
      f"(with --config.init_from.checkpoint={workdir} to start from these weights); to "
      "resume this run, revert the change.")


def describe_changes(workdir: str, config: ml_collections.ConfigDict) -> List[str]:
  """The config_diff of `workdir`'s config.json and `config` ([] if there is none)."""
  old = read_config(workdir)
  return [] if old is None else config_diff(old, _as_dict(config))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json; a different earlier one is first copied to config_history/N.json
  (so an interruption in between loses nothing)."""
  text = config.to_json_best_effort(indent=2)
  path = os.path.join(workdir, CONFIG_FILE)
  old = paths.read_text(path)
  if old == text:
    return
  if old is not None:
    history = epath.Path(workdir) / HISTORY_DIR
    n = (len([p for p in history.iterdir() if p.name.endswith(".json")])
         if history.exists() else 0)
    paths.write_text(os.fspath(history / f"{n}.json"), old)
  paths.write_text(path, text)
