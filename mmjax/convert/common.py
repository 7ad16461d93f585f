"""What every importer shares: reading checkpoint files, moving tensors by name, the report.

An importer reads a checkpoint into a flat `{name: numpy array}` dict in the source's own
naming (`read_checkpoint`), then moves each tensor to its mmjax name with a `Mapper`:

    m = Mapper(source, target_shapes)              # target: mmjax param shapes, flat
    m.move("vit.layernorm.weight", "encoder/encoder_norm/scale")
    m.move("classifier.weight", "head/kernel", dense)  # a transform: torch [out, in] -> [in, out]
    params, report = m.finish()

`finish` refuses any shape mismatch, listing every offending name with both shapes, and
reports source tensors nobody used and mmjax parameters nobody filled. Both of those are
errors too unless the caller allows them: a silently half-loaded model is the commonest
failure of weight conversion.
"""
import dataclasses
import json
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mmjax.errors import ConfigError

Shape = Tuple[int, ...]
Flat = Dict[str, np.ndarray]
Transform = Callable[[np.ndarray, Shape], np.ndarray]


class ConversionError(ConfigError):
  """A checkpoint that does not fit the model: the message lists every offending name."""


# ----------------------------------------------------------------------------- trees


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}; the names used in every report."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """{"a/b": x} -> {"a": {"b": x}}."""
  tree: Dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


# ----------------------------------------------------------------------------- files


def _torch_load(path: str) -> Flat:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"Reading the PyTorch file {path} needs torch: pip install torch.") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
      state = state[key]
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items() if hasattr(v, "detach")}


def _safetensors_load(path: str) -> Flat:
  try:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"Reading {path} needs safetensors: pip install safetensors.") from e
  out = {}
  try:  # numpy cannot hold bfloat16; go through torch when it is installed.
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    with safe_open(path, framework="pt") as f:
      for k in f.keys():
        t = f.get_tensor(k)
        out[k] = t.float().numpy() if t.is_floating_point() else t.numpy()
  except ImportError:
    with safe_open(path, framework="np") as f:
      for k in f.keys():
        out[k] = f.get_tensor(k)
  return out


def _hf_directory_files(path: str) -> List[str]:
  """The weight files of a Hugging Face model directory, sharded or not."""
  for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    if os.path.exists(os.path.join(path, index)):
      with open(os.path.join(path, index)) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(path, s) for s in shards]
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.exists(os.path.join(path, name)):
      return [os.path.join(path, name)]
  raise FileNotFoundError(
      f"No weights in directory {path}: expected model.safetensors, pytorch_model.bin or a "
      f"sharded *.index.json; found {sorted(os.listdir(path))}.")


def read_checkpoint(path: str) -> Flat:
  """Reads .npz, .safetensors, PyTorch (.bin/.pt/.pth) or a Hugging Face model directory.

  Returns the tensors as float32 (bfloat16 / float16 upcast) numpy arrays under their
  names in the file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  if os.path.isdir(path):
    flat: Flat = {}
    for f in _hf_directory_files(path):
      flat.update(read_checkpoint(f))
    return flat
  if path.endswith(".npz"):
    read = lambda: _npz_load(path)
  elif path.endswith(".safetensors"):
    read = lambda: {k: _as_float32(v) for k, v in _safetensors_load(path).items()}
  elif path.endswith((".bin", ".pt", ".pth", ".ckpt")):
    read = lambda: _torch_load(path)
  else:
    raise ConfigError(
        f"Unknown checkpoint format {path!r}: expected .npz, .safetensors, .bin/.pt/.pth/.ckpt "
        "or a Hugging Face model directory.")
  try:
    return read()
  except ImportError:
    raise
  except Exception as e:  # each reader fails its own way on a cut-off file
    raise ConfigError(f"Cannot read weights file {path} ({os.path.getsize(path):,} bytes): "
                      f"truncated or corrupt? {type(e).__name__}: {e}") from e


def _npz_load(path: str) -> Flat:
  with np.load(path, allow_pickle=False) as z:
    return {k: _as_float32(z[k]) for k in z.files}


def _as_float32(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


def strip_prefix(flat: Flat, prefixes: Sequence[str]) -> Flat:
  """Drops the first of `prefixes` that every name starts with (e.g. "params/", "module.")."""
  for prefix in prefixes:
    if flat and all(k.startswith(prefix) for k in flat):
      return {k[len(prefix):]: v for k, v in flat.items()}
  return dict(flat)


# ----------------------------------------------------------------------------- transforms
# Each takes the source tensor and the target shape. Torch Linear weights are [out, in];
# flax kernels are [in, out] (reshaped to e.g. [D, heads, head_dim] by the target shape).


def copy(x: np.ndarray, shape: Shape) -> np.ndarray:
  """Same values, reshaped to the target (e.g. a [D] bias to [heads, head_dim])."""
  return _reshape(x, shape)


def token_table(x: np.ndarray, shape: Shape) -> np.ndarray:
  """A [vocab, D] token table with zero rows appended up to mmjax's padded row count."""
  from mmjax.nn.embed import padded_vocab_size  # pylint: disable=g-import-not-at-top
  x = np.asarray(x)
  if x.ndim != 2 or tuple(shape) != (padded_vocab_size(x.shape[0]), x.shape[1]):
    raise _ShapeMismatch()
  return np.concatenate([x, np.zeros((shape[0] - x.shape[0], x.shape[1]), x.dtype)])


def dense(x: np.ndarray, shape: Shape) -> np.ndarray:
  """torch Linear weight [out, in] -> flax kernel [in, out] (reshaped to the target)."""
  return _reshape(np.asarray(x).T, shape)


def conv(x: np.ndarray, shape: Shape) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> flax kernel [kh, kw, in, out]."""
  return _reshape(np.transpose(x, (2, 3, 1, 0)), shape)


def _reshape(x: np.ndarray, shape: Shape) -> np.ndarray:
  x = np.asarray(x)
  if x.size != int(np.prod(shape, dtype=np.int64)):
    raise _ShapeMismatch()
  return x.reshape(shape)


class _ShapeMismatch(Exception):
  """A tensor whose size cannot take the target shape (reported by `Mapper.put`)."""


# ----------------------------------------------------------------------------- mapping


@dataclasses.dataclass
class Report:
  """What a conversion did, name by name."""
  loaded: List[str] = dataclasses.field(default_factory=list)
  unused: List[str] = dataclasses.field(default_factory=list)       # source, never read
  missing: List[str] = dataclasses.field(default_factory=list)      # mmjax, never filled
  mismatched: List[str] = dataclasses.field(default_factory=list)   # "dst <- src: want vs got"
  notes: List[str] = dataclasses.field(default_factory=list)        # resampling, folding, ...
  # The source's pixel normalisation {"mean": [..], "std": [..]} on [0, 1] pixels, written
  # to DST/model_config.json for the data pipeline; None: the source does not say.
  image_normalization: Optional[Dict[str, List[float]]] = None

  def __str__(self) -> str:
    lines = [f"loaded {len(self.loaded)} parameters"]
    for title, names in (("unused source tensors", self.unused),
                         ("mmjax parameters not in the source", self.missing),
                         ("shape mismatches", self.mismatched), ("notes", self.notes)):
      if names:
        lines.append(f"{title} ({len(names)}):")
        lines.extend(f"  {n}" for n in names)
    if self.image_normalization:
      lines.append(f"pixel normalisation (x - mean) / std on [0, 1] pixels: "
                   f"{self.image_normalization}")
    return "\n".join(lines)


# Pixel normalisations of the sources, on [0, 1] pixels: big_vision's value_range(-1, 1)
# (ViT, SigLIP, PaliGemma; also Hugging Face's ViT / SigLIP defaults) and OpenAI CLIP's.
HALF_NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
CLIP_NORMALIZATION = {"mean": [0.48145466, 0.4578275, 0.40821073],
                      "std": [0.26862954, 0.26130258, 0.27577711]}


def hf_image_normalization(path: str, default: Dict[str, List[float]]
                           ) -> Dict[str, List[float]]:
  """The pixel mean / std of a Hugging Face model directory's preprocessor_config.json,
  else `default` (the architecture's image processor default)."""
  config_file = os.path.join(path, "preprocessor_config.json") if os.path.isdir(path) else ""
  if not config_file or not os.path.isfile(config_file):
    return default
  with open(config_file) as f:
    config = json.load(f)
  if not config.get("do_normalize", True):
    return {"mean": [0.0] * 3, "std": [1.0] * 3}
  mean, std = config.get("image_mean", default["mean"]), config.get("image_std", default["std"])
  as_list = lambda v: [float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3)]
  return {"mean": as_list(mean), "std": as_list(std)}


class Mapper:
  """Fills a flat mmjax parameter dict from a flat source dict, keeping the books.

  Args:
    source: source tensors by source name.
    target: the mmjax parameter shapes by "/"-joined name (arrays or ShapeDtypeStructs).
    skip: regexes of mmjax parameters to leave out; the source tensors meant for them are
      reported unused but do not make `finish` fail.
  """

  def __init__(self, source: Mapping[str, np.ndarray], target: Mapping[str, Any],
               skip: Sequence[str] = ()):
    self.skip = tuple(skip)
    self.source = dict(source)
    self.target = {k: tuple(v.shape) for k, v in target.items() if not _matches(k, self.skip)}
    self.out: Flat = {}
    self._used = set()
    self._skipped = set()
    self.report = Report()

  def has(self, src: str) -> bool:
    return src in self.source

  def take(self, src: str) -> np.ndarray:
    """Reads a source tensor (marking it used); KeyError names what exists nearby."""
    if src not in self.source:
      stem = src.rsplit(".", 1)[0].rsplit("/", 1)[0]
      near = sorted(k for k in self.source if k.startswith(stem))[:8]
      raise ConversionError(f"Source tensor {src!r} not found; names that start like it: {near}.")
    self._used.add(src)
    return self.source[src]

  def put(self, dst: str, value: np.ndarray, transform: Transform = copy, src: str = "") -> None:
    """Stores `transform(value, target_shape)` under the mmjax name `dst`."""
    where = f"{dst} <- {src or 'computed'}"
    if _matches(dst, self.skip):
      return
    if dst not in self.target:
      self.report.mismatched.append(
          f"{where}: the model has no parameter {dst!r} (given shape {tuple(np.shape(value))})")
      return
    want, given = self.target[dst], tuple(np.shape(value))
    try:
      value = transform(value, want)
    except _ShapeMismatch:
      value = None
    if value is None or tuple(value.shape) != want:
      self.report.mismatched.append(f"{where}: model wants {want}, checkpoint has {given}")
      return
    if dst in self.out:
      raise ConversionError(f"mmjax parameter {dst!r} written twice (second time from {src!r}).")
    self.out[dst] = np.asarray(value, np.float32)
    self.report.loaded.append(dst)

  def skip_source(self, src: str) -> None:
    """Leaves a source tensor unused on purpose (it only feeds skipped parameters)."""
    self._skipped.add(src)

  def move(self, src: str, dst: str, transform: Transform = copy) -> None:
    """put(dst, take(src)); a source tensor that is absent leaves `dst` missing."""
    if src not in self.source:
      return  # reported as missing by `finish`, under the mmjax name
    if _matches(dst, self.skip):
      self._skipped.add(src)
      return
    self.put(dst, self.take(src), transform, src)

  def finish(self, *, allow_missing: Sequence[str] = (), allow_unused: Sequence[str] = (),
             strict: bool = True) -> Tuple[Flat, Report]:
    """Returns (flat params, report). Raises ConversionError on any shape mismatch, and
    (with `strict`) on missing or unused names that the regexes `allow_*` do not cover."""
    rep = self.report
    rep.unused = sorted(k for k in self.source if k not in self._used)
    rep.missing = sorted(k for k in self.target if k not in self.out)
    if rep.mismatched:
      raise ConversionError(
          "Checkpoint shapes do not fit the model (mmjax name <- source name):\n  "
          + "\n  ".join(rep.mismatched))
    if strict:
      bad_missing = [k for k in rep.missing if not _matches(k, allow_missing)]
      bad_unused = [k for k in rep.unused
                    if k not in self._skipped and not _matches(k, allow_unused)]
      if bad_missing or bad_unused:
        raise ConversionError(
            "Checkpoint and model do not correspond one to one.\n"
            f"  mmjax parameters with no source tensor ({len(bad_missing)}): {bad_missing}\n"
            f"  source tensors with no mmjax parameter ({len(bad_unused)}): {bad_unused}\n"
            "Check the model config (sizes, pooling, head) against the checkpoint, or allow "
            "them explicitly (--skip REGEX / allow_missing, allow_unused).")
    return dict(self.out), rep


def _matches(name: str, patterns: Sequence[str]) -> bool:
  return any(re.fullmatch(p, name) for p in patterns)


# ----------------------------------------------------------------------------- rules
# A rule converts one tensor both ways: `load` (source -> mmjax, given the mmjax shape) and
# `save` (mmjax -> a PyTorch-layout source, for the exporter).


@dataclasses.dataclass(frozen=True)
class Rule:
  load: Transform
  save: Callable[[np.ndarray], np.ndarray]


VECTOR = Rule(copy, lambda p: np.asarray(p).reshape(-1))               # LayerNorm, biases
LINEAR_IN = Rule(dense, lambda k: np.asarray(k).reshape(k.shape[0], -1).T)   # kernel [in, *out]
LINEAR_OUT = Rule(dense, lambda k: np.asarray(k).reshape(-1, k.shape[-1]).T)  # kernel [*in, out]


def move_block(m: Mapper, src_prefix: str, dst_prefix: str,
               table: Mapping[str, Tuple[str, Rule]]) -> None:
  """Moves one Transformer block: `table` maps mmjax names under the block to source
  names under `src_prefix` with their rule."""
  for dst, (src, rule) in table.items():
    m.move(src_prefix + src, f"{dst_prefix}/{dst}", rule.load)


def save_block(params: Mapping[str, np.ndarray], src_prefix: str, dst_prefix: str,
               table: Mapping[str, Tuple[str, Rule]]) -> Flat:
  """The inverse of `move_block`: {source name: tensor} from flat mmjax params."""
  return {src_prefix + src: rule.save(params[f"{dst_prefix}/{dst}"])
          for dst, (src, rule) in table.items()}


# ----------------------------------------------------------------------------- scanned layers
# With `scan_layers=True` the Transformer stacks keep one `encoderblock` whose parameters
# have a leading layer axis, instead of `encoderblock_0`, `encoderblock_1`, ... Importers
# work on the per-layer layout; these convert between the two.

_SCANNED = re.compile(r"(^|.*/)(encoderblock|decoderblock)/(.*)$")


def unscan_shapes(target: Mapping[str, Any]) -> Dict[str, Any]:
  """Per-layer names and shapes for a (possibly) scanned target."""
  out = {}
  for name, leaf in target.items():
    match = _SCANNED.match(name)
    shape = tuple(leaf.shape)
    if not match:
      out[name] = leaf
      continue
    head, block, rest = match.groups()
    for i in range(shape[0]):
      out[f"{head}{block}_{i}/{rest}"] = np.empty(shape[1:], np.float32)
  return out


def scan_params(flat: Mapping[str, np.ndarray], target: Mapping[str, Any]) -> Flat:
  """Stacks per-layer params into the scanned names of `target` (when it has any)."""
  out = {k: v for k, v in flat.items() if not re.search(r"(encoderblock|decoderblock)_\d+/", k)}
  per_layer = {k: v for k, v in flat.items() if k not in out}
  for name, leaf in target.items():
    match = _SCANNED.match(name)
    if not match:
      continue
    head, block, rest = match.groups()
    layers = [f"{head}{block}_{i}/{rest}" for i in range(leaf.shape[0])]
    if all(n in per_layer for n in layers):
      out[name] = np.stack([per_layer.pop(n) for n in layers])
  out.update(per_layer)  # targets that were not scanned keep their per-layer names
  return out


def unscan_params(flat: Mapping[str, np.ndarray]) -> Flat:
  """Splits scanned params into per-layer names (a no-op for an unscanned model)."""
  out = {}
  for name, value in flat.items():
    match = _SCANNED.match(name)
    if not match:
      out[name] = value
      continue
    head, block, rest = match.groups()
    for i in range(value.shape[0]):
      out[f"{head}{block}_{i}/{rest}"] = value[i]
  return out


# ----------------------------------------------------------------------------- ViT posemb


def move_posemb(m: Mapper, src: str, prefix: str, source_prefix_tokens: int) -> None:
  """Moves a ViT position table to `{prefix}pos_embedding`.

  The source table has `source_prefix_tokens` class-token rows before the patch grid
  (HF / timm / the original ViT: 1, big_vision: 0); the mmjax table has one row per class
  token of the model (`{prefix}cls` exists) and then the grid. A class token without a
  row gets a zero row (exact: it had no position). Converters build the model on square
  images and these formats store square grids, so when the model runs at another image
  size the grid is resampled square to square (`mmjax.nn.embed.resample_posemb`).
  """
  if not m.has(src):
    return
  from mmjax.convert import layout  # pylint: disable=g-import-not-at-top
  from mmjax.nn.embed import resample_posemb  # pylint: disable=g-import-not-at-top
  dst = prefix + layout.POSEMB
  table = m.take(src)
  table = table.reshape(1, -1, table.shape[-1])
  head, grid = table[:, :source_prefix_tokens], table[:, source_prefix_tokens:]
  prefix_tokens = int(prefix + layout.CLS in m.target)
  if prefix_tokens and not source_prefix_tokens:
    head = np.zeros_like(grid[:, :1])
  elif source_prefix_tokens and not prefix_tokens:
    raise ConversionError(
        f"{src} has a class-token row but the model has no class token ('{prefix}cls'): "
        "use pool_type='cls' or class_token=True.")
  want = m.target.get(dst)
  if want is not None and want[1] - prefix_tokens != grid.shape[1] and want[-1] == grid.shape[-1]:
    old, new = (int(round(np.sqrt(n))) for n in (grid.shape[1], want[1] - prefix_tokens))
    if old ** 2 != grid.shape[1] or new ** 2 != want[1] - prefix_tokens:
      raise ConversionError(f"{src}: a position grid of {grid.shape[1]} patches cannot be "
                            f"resampled to {want[1] - prefix_tokens}: both must be square.")
    grid = np.asarray(resample_posemb(grid, (old, old), (new, new)))
    m.report.notes.append(f"{dst}: position grid resampled from {old}x{old} to {new}x{new} "
                          "patches")
  m.put(dst, np.concatenate([head, grid], axis=1), src=src)


def convert(source: Mapping[str, np.ndarray], target: Mapping[str, Any],
            fill: Callable[[Mapper], None], *, skip: Sequence[str] = (),
            allow_unused: Sequence[str] = (), strict: bool = True) -> Tuple[Dict[str, Any], Report]:
  """Runs an importer's `fill(mapper)` against the model's parameter shapes `target`.

  `target` is flat and may be scanned; `fill` always writes per-layer names. `skip`:
  regexes of mmjax parameters to leave out (e.g. a new head, initialised by the trainer's
  `init_from`); `allow_unused`: regexes of source tensors that may be left unread.
  Returns (nested params, report).
  """
  m = Mapper(source, unscan_shapes(target), skip)
  fill(m)
  flat, report = m.finish(allow_unused=allow_unused, strict=strict)
  if skip:
    report.notes.append(f"skipped mmjax parameters matching {list(skip)}")
  return unflatten(scan_params(flat, target)), report


def numerics_differences(model_config, activation: Optional[str], epsilon: float, what: str,
                         source_activation: str = "") -> List[str]:
  """Where `model_config` computes another MLP activation / LayerNorm epsilon than the
  checkpoint's: `activation` is its mmjax name, None when mmjax has no equivalent of
  `source_activation` (the checkpoint's own name for it).

  Each entry says what the checkpoint uses and what the model computes instead; loading
  with a difference changes the outputs, so importers refuse unless told to accept it.
  """
  from mmjax.nn.transformer import ACTIVATIONS  # pylint: disable=g-import-not-at-top
  found = []
  have_act = model_config.get("activation", "gelu_tanh")
  have_eps = float(model_config.get("layer_norm_epsilon", 1e-6))
  if activation != have_act:
    source = source_activation or activation
    missing = "" if activation else f", which mmjax lacks (it has {sorted(ACTIVATIONS)})"
    found.append(f"{what} uses activation {source!r}{missing}; the mmjax model computes "
                 f"{have_act!r}")
  if not np.isclose(epsilon, have_eps, rtol=1e-6, atol=0):
    found.append(f"{what} uses LayerNorm epsilon {epsilon:g}; the mmjax model uses {have_eps:g}")
  return found


def model_param_shapes(model_config, image_size: Optional[int] = None,
                       text_length: Optional[int] = None) -> Dict[str, Any]:
  """Flat {name: ShapeDtypeStruct} of the registered model `model_config` builds (no FLOPs).

  A "vit" is initialised on an image of `image_size`; other models through their loss on
  a batch with 'image', 'text' (`text_length`, default the model's `max_text_len`), 'label'.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from mmjax.models.base import build_model  # pylint: disable=g-import-not-at-top

  model = build_model(_registered(model_config))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32) if image_size else None
  if model_config.get("name") == "vit":  # its loss needs a head; __call__ does not
    variables = jax.eval_shape(lambda: model.init(rngs, image))
  else:
    batch = {"label": jnp.zeros((1,), jnp.int32)}
    if image is not None:
      batch["image"] = image
    length = text_length or model_config.get("max_text_len")
    if length:
      batch["text"] = jnp.ones((1, length), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(rngs, batch, train=False, method="loss"))
  return flatten(nn.meta.unbox(variables)["params"])


def _registered(model_config):
  """Imports mmjax.models.<name> so that the model registers itself (vit, two_tower)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from mmjax.registry import MODELS  # pylint: disable=g-import-not-at-top
  name = model_config.get("name")
  if name and name not in MODELS:
    try:
      importlib.import_module(f"mmjax.models.{name}")
    except ImportError:
      pass  # build_model then names the registered models
  return model_config


# The key of DST/model_config.json that holds the source's pixel normalisation, next to the
# model's fields: {"mean": [...], "std": [...]} on [0, 1] pixels (the data's, not the model's).
IMAGE_NORMALIZATION = "image_normalization"


def save_checkpoint(params: Mapping[str, Any], dst: str, *, model_config=None,
                    report: Optional[Report] = None) -> str:
  """Writes `{"params": params}` as an Orbax checkpoint at DST/state, the layout the
  trainer's `config.init_from.checkpoint=DST` reads, plus DST/model_config.json (the
  mmjax model config the params fit, and the report's `image_normalization`) and DST/conversion_report.txt. Returns DST/state."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  dst = os.path.abspath(dst)
  state_dir = os.path.join(dst, "state")
  if os.path.exists(state_dir):
    raise FileExistsError(f"{state_dir} already exists; choose a new --dst or remove it.")
  os.makedirs(dst, exist_ok=True)
  params = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(state_dir, {"params": unflatten(params)})
  checkpointer.wait_until_finished()
  if model_config is not None:
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if report is not None and report.image_normalization:
      config[IMAGE_NORMALIZATION] = report.image_normalization
    with open(os.path.join(dst, "model_config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
  if report is not None:
    with open(os.path.join(dst, "conversion_report.txt"), "w") as f:
      f.write(str(report) + "\n")
  return state_dir
