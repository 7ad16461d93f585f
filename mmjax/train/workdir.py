"""What a run directory holds besides checkpoints and metrics: its config and config history.

  WORKDIR/config.json            the config of the newest launch, written only once the
                                 config has been checked against the checkpoint it resumes
  WORKDIR/config_history/N.json  the configs of earlier launches that differed from it
                                 (N = 0, 1, ...: oldest first), so no setting is forgotten

`resolve` turns --workdir into the absolute path the trainer uses, refusing what it
cannot handle (URLs such as gs://, which os.path would turn into a local `gs:` folder);
`resume_mismatch` turns a checkpoint that does not fit the config into an error that
shows what changed since the checkpoint was written and what to do about it.
"""
import json
import os
import re
from typing import Any, Dict, List, Optional

import ml_collections

from mmjax.train import checkpoint as checkpoint_lib

CONFIG_FILE = "config.json"
HISTORY_DIR = "config_history"


class UnsupportedWorkdirError(ValueError):
  """--workdir names a place the trainer cannot write to (e.g. a gs:// URL)."""


class ResumeMismatchError(checkpoint_lib.CheckpointShapeError):
  """The checkpoint in the workdir cannot hold the state the (changed) config builds."""


def resolve(workdir: str) -> str:
  """The absolute local path of `workdir`; a URL (gs://, s3://, ...) is refused."""
  match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", workdir or "")
  if match:
    raise UnsupportedWorkdirError(
        f"--workdir={workdir}: {match.group(1)}:// workdirs are not supported (the lock, "
        "config.json and metrics.jsonl are written with local file operations); use a local "
        "path or a mounted bucket (e.g. gcsfuse), then copy the run if needed.")
  if not workdir:
    raise UnsupportedWorkdirError("--workdir is empty; expected a directory path.")
  return os.path.abspath(os.path.expanduser(workdir))


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
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      return json.load(f)
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
  """Writes config.json; a different earlier one moves to config_history/N.json first."""
  text = config.to_json_best_effort(indent=2)
  path = os.path.join(workdir, CONFIG_FILE)
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    history = os.path.join(workdir, HISTORY_DIR)
    os.makedirs(history, exist_ok=True)
    n = len([name for name in os.listdir(history) if name.endswith(".json")])
    os.replace(path, os.path.join(history, f"{n}.json"))
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    f.write(text)
  os.replace(temporary, path)
