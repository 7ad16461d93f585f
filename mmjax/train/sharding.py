"""The device mesh and how arrays are laid out on it.

The mesh has three axes, `data`, `fsdp` and `tensor`, sized by `config.mesh` (any of
them 1). Models annotate weights and activations with *logical* axis names
(`embed`, `mlp`, `heads`, ...); `config.axis_rules` maps those onto mesh axes, so the
same model runs data-parallel, fully sharded or tensor-parallel without code changes.
The batch is split over every data-parallel axis (`data` and `fsdp`).

Axis types are Auto (not jax's Explicit default), because flax's logical constraints
need the compiler to propagate shardings.
"""
from typing import Any, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
from absl import logging
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> Tuple[int, int, int]:
  """Axis sizes from the config, `data=-1` filling the rest; raises if they cannot fit."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1 or (size == -1 and axis != "data"):
      raise ConfigError(f"config.mesh.{axis}={size}; expected a positive size"
                        + (" or -1 (all remaining devices)." if axis == "data" else "."))
  if sizes["data"] == -1:
    rest = sizes["fsdp"] * sizes["tensor"]
    if num_devices % rest:
      raise ConfigError(f"config.mesh fsdp x tensor = {rest} does not divide the "
                        f"{num_devices} available devices.")
    sizes["data"] = num_devices // rest
  total = int(np.prod(list(sizes.values())))
  if total != num_devices:
    raise ConfigError(
        f"config.mesh data x fsdp x tensor = {sizes['data']}x{sizes['fsdp']}x{sizes['tensor']} "
        f"= {total} devices, but {num_devices} are available ({jax.devices()[0].platform}); "
        "set the sizes so their product equals the device count, or data=-1.")
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

  Over several TPU slices (multi-slice, joined by the data-center network) `data` spans
  the slices: only the data-parallel gradient reduction crosses between them.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * 3
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  if shape[0] % num_slices:
    raise ConfigError(f"config.mesh data = {shape[0]} must be a multiple of the {num_slices} "
                      "slices: the data axis spans the slices.")
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  per_slice = (shape[0] // num_slices,) + tuple(shape[1:])
  grid = mesh_utils.create_hybrid_device_mesh(per_slice, (num_slices, 1, 1), devices)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "config.batch_size") -> None:
  dp = data_parallel_size(mesh)
  if batch_size % dp:
    raise ConfigError(f"{what}={batch_size} is not divisible by the data-parallel size "
                      f"data x fsdp = {mesh.shape['data']}x{mesh.shape['fsdp']} = {dp}.")


def axis_rules(rules) -> Tuple[Tuple[str, Any], ...]:
  """Config rules (tuples or lists, as config overrides give them) as flax wants them."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ConfigError(f"config.axis_rules entry {rule!r}; expected (logical_name, mesh_axes).")
    logical, mesh_axes = rule
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    for axis in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f"config.axis_rules maps {logical!r} to unknown mesh axis {axis!r}; "
                          f"expected one of {MESH_AXES} or None.")
    out.append((logical, mesh_axes))
  return tuple(out)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (possibly) `nn.Partitioned` abstract values.

  A dimension that its mesh axes do not divide (e.g. 10 classes over tensor=4) is
  replicated instead, with a warning: every config runs on every mesh.
  """
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  leaves = jax.tree_util.tree_flatten_with_path(boxed_tree)[0]
  sharding_leaves, treedef = jax.tree.flatten(shardings)
  fixed = [divisible_sharding(jax.tree_util.keystr(path), leaf.shape, sharding)
           for (path, leaf), sharding in zip(leaves, sharding_leaves)]
  return jax.tree.unflatten(treedef, fixed)


def divisible_sharding(name: str, shape: Tuple[int, ...], sharding: NamedSharding) -> NamedSharding:
  """`sharding` with every mesh axis dropped from a dimension it does not divide."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  changed = False
  for dim, axes in enumerate(spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = int(np.prod([sharding.mesh.shape[a] for a in names]))
    if shards > 1 and shape[dim] % shards:
      logging.warning("%s: dimension %d (size %d) does not divide over mesh axes %s (%d "
                      "shards); replicated on them instead.", name, dim, shape[dim], names,
                      shards)
      spec[dim], changed = None, True
  return NamedSharding(sharding.mesh, P(*spec)) if changed else sharding


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's numpy batch -> global jax.Arrays sharded over the data axes.

  Every process passes its own rows; together they form the global batch, in process order.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
