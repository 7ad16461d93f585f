"""Orbax checkpoints of the train state together with the data iterator, and `init_from`.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`, written asynchronously by an
`ocp.CheckpointManager` that keeps the newest `keep` steps. `state` is the whole
`TrainState` (restorable onto any mesh: the restore target carries the new shardings);
`data` is the grain iterator state of every process, so a resumed run continues with
exactly the next batch.

Robustness (issue 8 builds on this):
  * `restore_latest` walks steps newest first. A step that fails to load (truncated or
    zeroed array file, empty directory, missing iterator file) is logged, moved aside to
    `WORKDIR/checkpoints.corrupt/<step>-<n>` (orbax would otherwise keep listing it, and a
    later save of that step would silently be skipped) and the previous step is tried.
  * A checkpoint whose shapes disagree with the model is *not* corrupt: it is a config
    error, raised with the list of mismatched parameters.
  * `save` refuses a state with non-finite values.

`load_params` reads only the params of another run for fine-tuning; `merge_params` maps
them onto a new model (rename, include / exclude, position-embedding resampling) and
reports what was loaded, what is new and what was dropped.
"""
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils

from mmjax.errors import ConfigError
from mmjax.nn import embed


class CheckpointShapeError(ConfigError):
  """The checkpoint is readable but does not fit the model the config builds."""


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


_all_finite_jit = jax.jit(_all_finite)


class Checkpointer:
  """Saves and restores (TrainState, data iterator) pairs under `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.corrupt_directory = self.directory + ".corrupt"
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def steps(self) -> List[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Starts an (async) save of `state` and the iterator position at `step`."""
    if not bool(_all_finite_jit(state)):
      raise FloatingPointError(f"Refusing to checkpoint step {step}: the train state has "
                               "non-finite values.")
    if step in self._manager.all_steps():
      self._move_aside(step, "a checkpoint of this step already exists (from a crashed run)")
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)
    if not saved:
      raise RuntimeError(f"Orbax declined to save step {step} in {self.directory}.")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def restore_latest(self, target: Any, data_iterator: Any) -> Tuple[Optional[Any], Optional[int]]:
    """(state, step) from the newest readable step, or (None, None) if there is none.

    `target` is the abstract state with the shardings to restore onto (any mesh);
    `data_iterator` is rewound in place to the saved position; if no step is readable it
    is left where it was (a failed restore may already have rewound it).
    """
    initial_position = data_iterator.get_state()
    for step in reversed(self.steps()):
      self._check_shapes(step, target)
      error = None
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # orbax raises bare Exceptions for damaged files
        error = f"{type(e).__name__}: {e}"
      if _on_every_process(error is None):
        return restored.state, step
      logging.warning("Checkpoint step %d in %s is unreadable (%s); moving it aside and trying "
                      "the previous one.", step, self.directory, error or "on another process")
      self._move_aside(step, error or "unreadable on another process")
    data_iterator.set_state(initial_position)
    return None, None

  def _check_shapes(self, step: int, target: Any) -> None:
    """Raises CheckpointShapeError listing every leaf whose shape differs from `target`."""
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
    except Exception:  # unreadable metadata: let restore fail and move the step aside
      return
    if saved is None:
      return
    saved_flat = _flat_shapes(saved)
    target_flat = _flat_shapes(target)
    # Shapes are compared wherever names agree; missing / extra entries only for params
    # (optimizer-state containers may be named differently in metadata and in memory).
    problems = [f"{name}: checkpoint {saved_flat[name]} vs model {shape}"
                for name, shape in target_flat.items()
                if name in saved_flat and saved_flat[name] != shape]
    problems += [f"{name}: missing in checkpoint, model has {shape}"
                 for name, shape in target_flat.items()
                 if name.startswith("params/") and name not in saved_flat]
    problems += [f"{name}: in checkpoint {shape}, not in model"
                 for name, shape in saved_flat.items()
                 if name.startswith("params/") and name not in target_flat]
    if problems:
      raise CheckpointShapeError(
          f"Checkpoint step {step} in {self.directory} does not match the model built from the "
          f"config ({len(problems)} mismatches):\n  " + "\n  ".join(problems[:50]))

  def _move_aside(self, step: int, reason: str) -> None:
    """Renames a bad step out of the manager's sight (process 0; all processes wait)."""
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_directory, exist_ok=True)
      source = os.path.join(self.directory, str(step))
      n = len(os.listdir(self.corrupt_directory))
      dest = os.path.join(self.corrupt_directory, f"{step}-{n}")
      if os.path.exists(source):
        os.rename(source, dest)
        with open(os.path.join(dest, "WHY_MOVED.txt"), "w") as f:
          f.write(f"{time.ctime()}: {reason}\n")
        logging.warning("Moved checkpoint step %d to %s: %s", step, dest, reason)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mmjax_move_aside_{step}")
    self._manager.reload()


def _on_every_process(ok: bool) -> bool:
  """True if `ok` holds on all processes (they must agree on which step they restored)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _flat_shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  """'path' -> shape for every array-like leaf (metadata, ShapeDtypeStruct or array)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out[_path_name(path)] = tuple(shape)
  return out


def _path_name(path) -> str:
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return "/".join(parts)


# ---------------------------------------------------------------------------------------
# init_from: params of another run, mapped onto this model.


def _resolve_state_dir(path: str) -> str:
  """A run directory, its checkpoints/ directory or one step directory -> '<step>/state'."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(os.path.join(candidate, "state")):
      return os.path.join(candidate, "state")
    if not os.path.isdir(candidate):
      continue
    steps = [int(d) for d in os.listdir(candidate) if d.isdigit()]
    if steps:
      return os.path.join(candidate, str(max(steps)), "state")
  raise FileNotFoundError(f"config.init_from.checkpoint={path!r}: expected a run directory, its "
                          "checkpoints/ directory or a step directory containing 'state'.")


def load_params(path: str) -> Dict[str, np.ndarray]:
  """Flat {'a/b/kernel': numpy array} of the params saved at `path` (host memory)."""
  state_dir = _resolve_state_dir(path)
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(state_dir)
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  if "params" not in tree:
    raise ConfigError(f"{state_dir} has no 'params' entry; found {sorted(tree)}.")
  item = {"params": jax.tree.map(lambda _: 0, tree["params"])}
  restore_args = {"params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                         tree["params"])}
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  return traverse_util.flatten_dict(restored["params"], sep="/")


def resample_posemb(posemb: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
  """Resizes a [1, prefix + N, D] position embedding to `new_shape` (square patch grids;
  a leading class-token row, when the lengths say there is one, is kept as is)."""
  old_n, new_n = posemb.shape[-2], new_shape[-2]
  for prefix in (0, 1):
    if _is_square(old_n - prefix) and _is_square(new_n - prefix):
      break
  else:
    raise ConfigError(f"Cannot resample position embedding {posemb.shape} -> {tuple(new_shape)}: "
                      "lengths are not square grids (with at most one class token).")
  old_side, new_side = int(round(np.sqrt(old_n - prefix))), int(round(np.sqrt(new_n - prefix)))
  out = embed.resample_posemb(jnp.asarray(posemb), (old_side, old_side), (new_side, new_side),
                              num_prefix_tokens=prefix)
  return np.asarray(out, posemb.dtype)


def _is_square(n: int) -> bool:
  return n > 0 and int(round(np.sqrt(n))) ** 2 == n


# Named `init_from.rename` rules: a string entry of `rename` stands for its preset's pairs.
RENAME_PRESETS = {
    # MLM pre-training fuses (image, text); VQA fine-tuning fuses (image, question): the
    # pre-trained text stream (embeddings, per-modality fusion layers, norm) becomes the
    # question stream. The shared token embedding keeps its name.
    "mlm_text_to_question": ((r"^embed_text/(.*)$", r"embed_question/\1"),
                             (r"^fusion_encoder/text_(.*)$", r"fusion_encoder/question_\1")),
}


def rename_rules(rename: Sequence[Any]) -> Tuple[Tuple[str, str], ...]:
  """`init_from.rename` as (regex, replacement) pairs, preset names expanded."""
  rules = []
  for entry in rename:
    if isinstance(entry, str):
      if entry not in RENAME_PRESETS:
        raise ConfigError(f"config.init_from.rename preset {entry!r}; expected one of "
                          f"{sorted(RENAME_PRESETS)} or (regex, replacement) pairs.")
      rules += RENAME_PRESETS[entry]
    elif len(entry) == 2:
      rules.append((str(entry[0]), str(entry[1])))
    else:
      raise ConfigError(f"config.init_from.rename entry {entry!r}; expected a (regex, "
                        f"replacement) pair or a preset name ({sorted(RENAME_PRESETS)}).")
  return tuple(rules)


def merge_params(target: Dict[str, Any], source: Dict[str, np.ndarray], *,
                 include: Sequence[str] = (".*",), exclude: Sequence[str] = (),
                 rename: Sequence[Tuple[str, str]] = ()) -> Tuple[Dict[str, Any], Dict[str, list]]:
  """Overwrites leaves of the flat `target` ('a/b/kernel' -> array) with `source` ones.

  Source names are first renamed (`re.sub` in order), then loaded when they match
  `include`, no `exclude`, and exist in the target. Shapes must agree, except position
  embeddings (names ending in 'pos_embedding' / 'posemb'), which are resampled.
  Returns (merged flat params, report with 'loaded', 'resampled', 'new', 'dropped' and
  'excluded', the dropped source names that `exclude` asked for).
  """
  renamed = {}
  for name, value in source.items():
    new = name
    for pattern, replacement in rename:
      new = re.sub(pattern, replacement, new)
    renamed[new] = (name, value)
  merged = dict(target)
  report = {"loaded": [], "resampled": [], "new": [], "dropped": [], "excluded": []}
  problems = []
  for name, (original, value) in sorted(renamed.items()):
    wanted = (any(re.fullmatch(p, name) for p in include)
              and not any(re.fullmatch(p, name) for p in exclude))
    if not wanted or name not in target:
      report["dropped"].append(original)
      if any(re.fullmatch(p, name) for p in exclude):
        report["excluded"].append(original)
      continue
    shape = tuple(target[name].shape)
    if tuple(value.shape) != shape:
      if re.search(r"(pos_embedding|posemb)$", name) and value.ndim == len(shape):
        value = resample_posemb(value, shape)
        report["resampled"].append(name)
      else:
        problems.append(f"{original} -> {name}: checkpoint {tuple(value.shape)} vs model {shape}")
        continue
    merged[name] = np.asarray(value, dtype=target[name].dtype)
    report["loaded"].append(name)
  if problems:
    raise CheckpointShapeError("init_from: shapes do not match for\n  " + "\n  ".join(problems))
  report["new"] = sorted(set(target) - set(report["loaded"]))
  return merged, report
