"""Orbax checkpoints of the train state together with the data iterator, and `init_from`.

Layout: `WORKDIR/checkpoints/<step>/{state,data,checksums}`, written asynchronously by an
`ocp.CheckpointManager` that keeps the newest `keep` steps. WORKDIR may be a gs:// URL
(files go through epath; moving a step aside is then a copy and a delete: `paths`). `state` is the whole
`TrainState` (restorable onto any mesh: the restore target carries the new shardings);
`data` is the grain iterator state of every process, so a resumed run continues with
exactly the next batch; `checksums` holds two 32-bit checksums of every array's bits.

What `restore_latest` does with each step, newest first:
  * its arrays' names, shapes and dtypes differ from the model's (a config change): a user
    error, `CheckpointShapeError` listing the differences; nothing is moved;
  * it is damaged (unreadable files, empty directory, missing iterator file, a checksum
    mismatch, non-finite values): the error is kept and the previous step is tried. Once a
    good step is found, the damaged newer ones are moved aside to
    `WORKDIR/checkpoints.corrupt/<step>-<n>` (orbax would otherwise keep listing them, and
    a later save of that step would silently be skipped);
  * no step is good: `NoReadableCheckpointError` naming each step's error, nothing moved
    (unless `start_over=True`, which moves them all aside and starts from scratch).

`save` refuses a state with non-finite values; a background save that fails is reported
by `check()` (called every step) as `CheckpointSaveError`, the previous steps kept.

`load_params` reads only the params of another run for fine-tuning; `merge_params` maps
them onto a new model (rename, include / exclude, resampling of the position tables the
model names in `position_grids`), refuses to drop a trained parameter the model has no
place for unless `skip` lists it, and reports what was loaded, what is new and what was
dropped.
"""
import functools
import os
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from mmjax.errors import ConfigError
from mmjax.nn import embed
from mmjax.train import paths


class CheckpointShapeError(ConfigError):
  """The checkpoint is readable but does not fit the model the config builds."""


class NoReadableCheckpointError(RuntimeError):
  """Every step in the checkpoint directory is damaged; the message names each one's error."""


class CheckpointSaveError(RuntimeError):
  """A (background) save failed; the steps saved before it are kept."""


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


_all_finite_jit = jax.jit(_all_finite)

CHECKSUM_ALGORITHM = "mmjax-u32-sum-and-odd-weighted-sum"


def _checksum(x: jax.Array) -> jax.Array:
  """[2] uint32: the sum of the array's 32-bit words and their sum weighted by 2 * i + 1
  (i = the word's flat index), both mod 2**32. Any change of one word changes both, a
  garbage block changes them with probability 1 - 2**-64, and the weights see moved
  blocks. Computed where the array lives; wrapping integer sums do not depend on the
  reduction order, so any mesh gives the same value."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size < 4:
    words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  else:  # 8-byte types gain a trailing axis of 2 words
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  # Flat, not per-axis, indices, and two separate reductions (the barrier stops XLA from
  # fusing them): both several times faster on XLA:CPU. Arrays sharded along a non-leading
  # axis are regathered for the flat index; this runs once per save and restore.
  words = words.ravel()
  total = jnp.sum(words, dtype=jnp.uint32)
  words = jax.lax.optimization_barrier(words)
  weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.stack([total, jnp.sum(words * weights, dtype=jnp.uint32)])


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def checksums(tree: Any) -> Dict[str, List[int]]:
  """{'path/of/leaf': [sum, weighted sum]} for every array of `tree` (see `_checksum`)."""
  sums = jax.device_get(_checksums_jit(tree))
  return {_path_name(path): [int(v) for v in value]
          for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


# Orbax copies a replicated array to the host in one slice per replica, in parallel; each
# slice is an eager op compiled for its offsets, thousands of compiles for a small model's
# few hundred arrays. Only slices of at least this many bytes are worth it.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache  # a process-wide registration: once is enough
def _use_replica_slices_for_large_arrays_only() -> None:
  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.metadata import array_metadata_store
  from orbax.checkpoint._src.serialization import type_handler_registry
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
      jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=array_metadata_store.Store(),  # as Orbax's default handler
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
      override=True, ignore_warnings=True)  # replacing the default is the point


class Checkpointer:
  """Saves and restores (TrainState, data iterator) pairs under `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    _use_replica_slices_for_large_arrays_only()
    self.directory = paths.absolute(directory)  # a local path or a gs:// URL
    self.corrupt_directory = self.directory + ".corrupt"
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "checksums": ocp.JsonCheckpointHandler()})
    self._in_flight: Optional[int] = None  # step of the save not yet confirmed on disk

  def steps(self) -> List[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Starts an (async) save of `state`, its checksums and the iterator position at `step`."""
    self.check(wait=True)  # a failed previous save stops the run before another starts
    if not bool(_all_finite_jit(state)):
      raise FloatingPointError(f"Refusing to checkpoint step {step}: the train state has "
                               "non-finite values.")
    if step in self._manager.all_steps():
      self._move_aside(step, "a checkpoint of this step already exists (from a crashed run)")
    sums = {"algorithm": CHECKSUM_ALGORITHM, "arrays": checksums(state)}
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          checksums=ocp.args.JsonSave(sums)), force=True)
    except Exception as e:  # a synchronous part failed (e.g. no space for the directory)
      raise self._save_error(step, e) from e
    if not saved:
      raise RuntimeError(f"Orbax declined to save step {step} in {self.directory}.")
    self._in_flight = step

  def check(self, wait: bool = False) -> None:
    """Raises CheckpointSaveError if the last save failed. Without `wait` it only looks
    (cheap enough for every step): a save still running is checked next time."""
    if self._in_flight is None:
      return
    if wait:
      try:
        self._manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        step, self._in_flight = self._in_flight, None
        raise self._save_error(step, e) from e
    elif self._manager.is_saving_in_progress():
      return
    step, self._in_flight = self._in_flight, None
    error = None
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if error is not None or not (epath.Path(self.directory) / str(step)).is_dir():
      raise self._save_error(step, error)

  def _save_error(self, step: int, error: Optional[BaseException]) -> CheckpointSaveError:
    kept = [s for s in self._manager.all_steps(read=True) if s != step]
    cause = f"{type(error).__name__}: {error}" if error is not None else (
        "the step directory was not finalized (see the orbax error logged above)")
    return CheckpointSaveError(
        f"Saving checkpoint step {step} in {self.directory} failed: {cause}. Steps kept: "
        f"{sorted(kept) or 'none'}; fix the cause (disk space, permissions) and rerun to resume.")

  def wait(self) -> None:
    self.check(wait=True)

  def close(self, quiet: bool = False) -> None:
    """Waits for the last save and closes; raises CheckpointSaveError if it failed (only
    logs it if `quiet`: when another error is already on its way out)."""
    try:
      self.check(wait=True)
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if not quiet:
        raise
      logging.error("Closing the checkpointer of %s: %s", self.directory, e)

  def restore_latest(self, target: Any, data_iterator: Any, *,
                     start_over: bool = False) -> Tuple[Optional[Any], Optional[int]]:
    """(state, step) from the newest good step, or (None, None) if there are no steps.

    `target` is the abstract state with the shardings to restore onto (any mesh);
    `data_iterator` is rewound in place to the saved position; if no step is restored it
    is left where it was (a failed restore may already have rewound it). Raises
    CheckpointShapeError (a config change) or NoReadableCheckpointError (every step
    damaged, unless `start_over`); see the module docstring.
    """
    initial_position = data_iterator.get_state()
    damaged: List[Tuple[int, str]] = []
    for step in reversed(self.steps()):
      self._check_shapes(step, target)
      state, error = self._restore_verified(step, target, data_iterator)
      if _on_every_process(error is None):
        for bad, why in damaged:
          self._move_aside(bad, why)
        return state, step
      error = error or "unreadable on another process"
      logging.warning("Checkpoint step %d in %s is damaged (%s); trying the previous one.",
                      step, self.directory, error)
      damaged.append((step, error))
    data_iterator.set_state(initial_position)
    if damaged and not start_over:
      raise NoReadableCheckpointError(
          f"No checkpoint in {self.directory} is readable; nothing was moved:\n  "
          + "\n  ".join(f"step {s}: {why}" for s, why in damaged)
          + "\nTo train from step 0 anyway (moving these steps to "
          f"{self.corrupt_directory}), rerun with --start_over.")
    for bad, why in damaged:
      self._move_aside(bad, why)
    return None, None

  def _restore_verified(self, step: int, target: Any,
                        data_iterator: Any) -> Tuple[Optional[Any], Optional[str]]:
    """(restored state, None), or (None, why the step is damaged)."""
    has_sums = (epath.Path(self.directory) / str(step) / "checksums").is_dir()
    items = dict(state=ocp.args.StandardRestore(target),
                 data=grain.checkpoint.CheckpointRestore(data_iterator))
    if has_sums:
      items["checksums"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises bare Exceptions)
      return None, f"{type(e).__name__}: {str(e)[:500]}"
    if has_sums and restored.checksums.get("algorithm") == CHECKSUM_ALGORITHM:
      saved = restored.checksums["arrays"]
      now = checksums(restored.state)
      differ = sorted(n for n in set(saved) | set(now) if saved.get(n) != now.get(n))
      if differ:
        return None, (f"checksum mismatch in {len(differ)} array(s): {differ[:10]} (the "
                      "files changed after they were written)")
    else:
      logging.warning("Checkpoint step %d in %s has no checksums this mmjax knows (written "
                      "by an older one); its contents are not verified.", step, self.directory)
    if not bool(_all_finite_jit(restored.state)):
      return None, "the restored state has non-finite values (never saved that way: damaged)"
    return restored.state, None

  def _check_shapes(self, step: int, target: Any) -> None:
    """Raises CheckpointShapeError listing every array whose name or shape differs from
    `target` (a changed model, optimizer or clipping changes the state's structure)."""
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
    except Exception:  # unreadable metadata: damage, which the restore that follows reports
      return
    if saved is None:
      return
    saved_flat = _flat_shapes(saved)
    target_flat = _flat_shapes(target)
    problems = [f"{name}: checkpoint {saved_flat[name]} vs model {shape}"
                for name, shape in target_flat.items()
                if name in saved_flat and saved_flat[name] != shape]
    problems += [f"{name}: missing in checkpoint, model has {shape}"
                 for name, shape in target_flat.items() if name not in saved_flat]
    problems += [f"{name}: in checkpoint {shape}, not in model"
                 for name, shape in saved_flat.items() if name not in target_flat]
    if problems:
      raise CheckpointShapeError(
          f"Checkpoint step {step} in {self.directory} does not match the model and optimizer "
          f"built from the config ({len(problems)} mismatches):\n  " + "\n  ".join(problems[:50]))

  def _move_aside(self, step: int, reason: str) -> None:
    """Renames a bad step out of the manager's sight (process 0; all processes wait)."""
    if jax.process_index() == 0:
      source = epath.Path(self.directory) / str(step)
      corrupt = epath.Path(self.corrupt_directory)
      n = len(list(corrupt.iterdir())) if corrupt.exists() else 0
      dest = os.path.join(self.corrupt_directory, f"{step}-{n}")
      if source.exists():
        paths.move_tree(os.fspath(source), dest)
        paths.write_text(os.path.join(dest, "WHY_MOVED.txt"), f"{time.ctime()}: {reason}\n")
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
  path = paths.absolute(path)
  for candidate in (epath.Path(path), epath.Path(path) / "checkpoints"):
    if (candidate / "state").is_dir():
      return os.fspath(candidate / "state")
    if not candidate.is_dir():
      continue
    steps = [int(d.name) for d in candidate.iterdir() if d.name.isdigit()]
    if steps:
      return os.fspath(candidate / str(max(steps)) / "state")
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


def resample_position_table(value: np.ndarray, shape: Sequence[int], grid: embed.PositionGrid,
                            name: str) -> np.ndarray:
  """A checkpoint's position table moved onto the model's `grid` (the model's table has
  `shape`: [1, prefix + h*w, D], or [1, h, w, D] when the grid is in the shape).

  The checkpoint's grid is read from its shape when it is 4-D; a flat table keeps the
  model's class tokens and aspect ratio (square images: a square grid).
  """
  width = shape[-1]
  if value.ndim != len(shape) or value.shape[-1] != width or value.ndim not in (3, 4):
    raise CheckpointShapeError(f"init_from: {name}: checkpoint {tuple(value.shape)} cannot be "
                               f"resampled to the model's position table {tuple(shape)}.")
  prefix = 0 if value.ndim == 4 else grid.prefix_tokens
  if value.ndim == 4:
    old = value.shape[1:3]
  else:
    patches = value.shape[1] - prefix
    rows = int(round(np.sqrt(patches * grid.height / grid.width)))
    old = (rows, patches // max(rows, 1))
    if patches <= 0 or old[0] * old[1] != patches or old[0] * grid.width != old[1] * grid.height:
      raise CheckpointShapeError(
          f"init_from: {name}: checkpoint {tuple(value.shape)} is not {prefix} class-token "
          f"row(s) and a {grid.height}:{grid.width} patch grid like the model's "
          f"{tuple(shape)} ({grid.height}x{grid.width}).")
  flat = value.reshape(1, -1, width)
  out = embed.resample_posemb(jnp.asarray(flat), old, (grid.height, grid.width), prefix)
  return np.asarray(out, value.dtype).reshape(shape)


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
                 skip: Sequence[str] = (), rename: Sequence[Tuple[str, str]] = (),
                 grids: Optional[Mapping[str, embed.PositionGrid]] = None
                 ) -> Tuple[Dict[str, Any], Dict[str, list]]:
  """Overwrites leaves of the flat `target` ('a/b/kernel' -> array) with `source` ones.

  Source names are first renamed (`re.sub` in order), then loaded when they match
  `include` and no `exclude` (regexes on renamed names). Shapes must agree, except the
  position tables `grids` names (the model's `position_grids`), which are resampled.
  A trained parameter the model has no place for (renamed, it is not in `target`) is
  refused with a ConfigError naming it, unless `skip` (regexes on renamed names) lists it.
  Returns (merged flat params, report with 'loaded', 'resampled', 'new', 'dropped' and,
  of the dropped source names, 'excluded' (by include / exclude) and 'skipped').
  """
  grids = dict(grids or {})
  renamed = {}
  for name, value in source.items():
    new = name
    for pattern, replacement in rename:
      new = re.sub(pattern, replacement, new)
    renamed[new] = (name, value)
  merged = dict(target)
  report = {"loaded": [], "resampled": [], "new": [], "dropped": [], "excluded": [],
            "skipped": []}
  problems, unplaced = [], []
  for name, (original, value) in sorted(renamed.items()):
    if (not any(re.fullmatch(p, name) for p in include)
        or any(re.fullmatch(p, name) for p in exclude)):
      report["dropped"].append(original)
      report["excluded"].append(original)
      continue
    if name not in target:
      if any(re.fullmatch(p, name) for p in skip):
        report["dropped"].append(original)
        report["skipped"].append(original)
      else:
        unplaced.append(original if original == name else f"{original} (as {name})")
      continue
    shape = tuple(target[name].shape)
    if tuple(value.shape) != shape:
      if name in grids:
        value = resample_position_table(value, shape, grids[name], name)
        report["resampled"].append(name)
      else:
        problems.append(f"{original} -> {name}: checkpoint {tuple(value.shape)} vs model {shape}")
        continue
    merged[name] = np.asarray(value, dtype=target[name].dtype)
    report["loaded"].append(name)
  if unplaced:
    raise ConfigError(
        f"init_from: the model has no parameter for {len(unplaced)} trained parameters of "
        f"the checkpoint: {', '.join(unplaced)}; set the model fields that need them (a "
        "converted checkpoint records its own in model_config.json), map them with "
        "config.init_from.rename, or list them in config.init_from.skip to train without them.")
  if problems:
    raise CheckpointShapeError("init_from: shapes do not match for\n  " + "\n  ".join(problems))
  report["new"] = sorted(set(target) - set(report["loaded"]))
  return merged, report
