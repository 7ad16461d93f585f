"""The trainer's config schema: defaults, validation and command-line override checks.

A config file starts from `default_config()` and sets what it needs:

    def get_config(arg=None):
      config = mmjax.train.config.default_config()
      config.model = ml_collections.ConfigDict(dict(name="vit", width=64, ...))
      config.data = ml_collections.ConfigDict(dict(name="digits", ...))
      return config

so every field below exists, is overridable from the command line
(`--config.optimizer.lr=3e-4`) and is documented in one place. `validate` turns a config
that cannot work into an error *before* anything is compiled.
"""
import dataclasses
import importlib
import importlib.util
import json
import os
import pkgutil
import typing
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import ml_collections

from mmjax import config_keys
from mmjax.errors import ConfigError
from mmjax.models import fusion as fusion_lib
from mmjax.models.base import build_model
from mmjax.nn.transformer import REMAT_POLICIES
from mmjax.registry import ATTENTION_BACKENDS, DATASETS, FUSIONS, MODELS
from mmjax.train import sharding

# Logical axis name -> mesh axes. Batch over every data-parallel axis (data and fsdp);
# weights sharded over fsdp on their embedding axis and over tensor on heads / mlp / vocab.
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("classes", None),
    ("layers", None),
)

SCHEDULES = ("constant", "cosine", "linear", "rsqrt")
OPTIMIZERS = ("adamw", "sgd", "adafactor", "lamb")
ON_NONFINITE = ("error", "skip")


def default_config() -> ml_collections.ConfigDict:
  """Every trainer field with its default; see the comment on each line."""
  c = ml_collections.ConfigDict()
  c.seed = 0                       # params init, dropout and data order derive from it
  c.total_steps = 1000             # optimizer steps
  c.batch_size = 128               # global batch (all processes) per optimizer step
  c.eval_batch_size = 256          # global eval batch; last batch padded and masked
  c.grad_accum_steps = 1           # micro-batches per step (batch_size must divide)
  c.log_every = 50                 # steps between train-metric records
  c.eval_every = 500               # steps between evaluations (0: only at the end)
  c.checkpoint_every = 500         # steps between checkpoints (0: only at the end)
  c.keep_checkpoints = 3           # newest N checkpoints kept
  c.async_checkpointing = True     # save in a background thread while training goes on
  c.on_nonfinite = "error"         # non-finite loss/grads: "error" stops, "skip" drops the update
  c.max_skipped_steps = 20        # "skip": this many skipped steps in a row stop the run (0: never)
  c.imports = ()                   # modules imported first (a fork registering models)
  c.progress_bar = True            # console bar with steps/s and ETA (process 0)
  c.summary_hooks = ()             # "module.function"s adding text to the end-of-run summary

  c.model = ml_collections.ConfigDict({"name": ""})   # see mmjax.models.base.build_model
  c.data = ml_collections.ConfigDict({"name": ""})    # see mmjax.data.pipeline
  c.data_pipeline = "mmjax.data.pipeline"             # module with create_*_iterator

  # Device mesh. `data` = -1 takes every device the other axes leave.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.axis_rules = DEFAULT_AXIS_RULES

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",                # one of OPTIMIZERS
      lr=1e-3,                     # peak learning rate
      b1=0.9, b2=0.999, eps=1e-8,  # adamw / lamb
      momentum=0.9, nesterov=False,  # sgd
      weight_decay=1e-4,           # decoupled (adamw, lamb, adafactor); L2 for sgd
      weight_decay_exclude=(r".*bias$", r".*scale$", r".*pos_embedding$", r".*cls$"),
      clip_grad_norm=1.0,          # global-norm clipping; 0 disables
      lr_multipliers=(),           # ((regex, factor), ...) on parameter names
      frozen=(),                   # (regex, ...): parameters that never change
  ))
  c.schedule = ml_collections.ConfigDict(dict(
      name="cosine",               # one of SCHEDULES (after the linear warmup)
      warmup_steps=100,
      end_lr_fraction=0.0,         # cosine / linear: final lr = lr * this
      timescale=0,                 # rsqrt: lr / sqrt(1 + (step - warmup) / timescale); 0 -> warmup
  ))
  # Evaluation that generates text (models with generation_tasks(), e.g. captioning,
  # multimodal with vqa_mode="generate"); see mmjax/train/text_eval.py.
  c.generation = ml_collections.ConfigDict(dict(
      decode="",                   # "" (off), "greedy" or "beam"
      beam_size=4,                 # beam search width
      length_penalty=0.0,          # beam search: log-prob / length**penalty
      max_len=0,                   # tokens generated; 0: the model's decoder length
      java_metrics=False,          # also METEOR / SPICE when Java runs (~10 s more per eval)
      predictions=True,            # write DIR/predictions/STEP.jsonl
  ))
  # Zero-shot classification at evaluation (models with class_embeddings / zero_shot_logits).
  c.zeroshot = ml_collections.ConfigDict(dict(
      enabled=False,
      data=ml_collections.ConfigDict({"name": ""}),  # a classification config.data; "" = config.data
      prompts=("a photo of a {}.",),  # templates, averaged per class (prompt ensemble)
      classes=(),                  # class names; () = the dataset's info()['classes']
  ))
  c.init_from = ml_collections.ConfigDict(dict(
      checkpoint="",               # an mmjax run (or one of its steps), or a converted DST
                                   # whose model_config.json fills unset model fields
      include=(r".*",),            # regexes on (renamed) names of parameters to load
      exclude=(),                  # regexes on (renamed) names never loaded (e.g. the head)
      skip=(),                     # regexes on (renamed) names the model has no place for,
                                   # dropped on purpose (any other such name is refused)
      rename=(),                   # ((regex, replacement), ...) source name -> this model,
                                   # or preset names (checkpoint.RENAME_PRESETS)
  ))
  return c


def import_models(extra_modules: Iterable[str] = ()) -> None:
  """Imports every module of mmjax.models (registering the built-in models and fusions),
  then the config's own `imports` (a fork's models, fusions, datasets)."""
  import mmjax.models  # pylint: disable=g-import-not-at-top
  for module in pkgutil.iter_modules(mmjax.models.__path__, "mmjax.models."):
    importlib.import_module(module.name)
  for module in extra_modules:
    importlib.import_module(module)


def _types(node) -> Any:
  """A schema (see mmjax.config_keys) of a ConfigDict: its sections and leaf types."""
  if isinstance(node, ml_collections.ConfigDict):
    return {k: _types(node[k]) for k in node.keys()}
  return Any if node is None else type(node)


def model_schema(name: str) -> Dict[str, Any]:
  """{field: type} of the registered model `name`'s dataclass fields."""
  cls = MODELS.get(name)
  try:
    hints = typing.get_type_hints(cls)
  except Exception:  # pylint: disable=broad-except  (unresolvable forward references)
    hints = {}
  fields = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)
            if f.name not in ("parent", "name")}
  # A field holding another registered model's fields (the VLM's `encoder`: a ViT's).
  for field, sub_model in getattr(cls, "SUB_MODELS", {}).items():
    fields[field] = {k: v for k, v in model_schema(sub_model).items() if k != "name"}
  return {"name": str, **fields}


def data_schema(config: ml_collections.ConfigDict) -> Optional[Dict[str, Any]]:
  """The fields and every dataset's options `config.data` may set, or None for a
  `data_pipeline` without a `default_config(name)` (its own module checks its config)."""
  pipeline = importlib.import_module(config.data_pipeline)
  name = config.data.get("name")
  defines = getattr(getattr(pipeline, "default_config", None), "__module__", None)
  if defines != pipeline.__name__ or not name:  # (an imported default_config is not its own)
    return None
  DATASETS.get(name)
  defaults = pipeline.default_config(name)
  schema = {k: (defaults.get_ref(k).get_type() if defaults[k] is None else type(defaults[k]))
            for k in defaults.keys() if k not in DATASETS}
  for dataset in DATASETS.names():  # options: leaves (a dict option such as `fields` too)
    schema[dataset] = {k: (Any if v is None else type(v))
                       for k, v in DATASETS.get(dataset).builder_defaults().items()}
  return schema


def schema(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """What `config` may set: the trainer's fields, every dataclass field of the selected
  model and the selected data pipeline's fields and dataset options."""
  import_models(config.get("imports") or ())
  out = _types(default_config())
  model, data = config.get("model"), config.get("data")
  # An unknown model is reported by `validate`, naming the registered ones.
  out["model"] = model_schema(model.name) if model and model.get("name") in MODELS else Any
  out["data"] = (data_schema(config) if data is not None and config.get("data_pipeline")
                 else None) or Any
  return out


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Raises if a section of `config` holds a key the trainer, the model or the dataset
  does not know, listing the valid ones (a typo otherwise silently means a default)."""
  valid = schema(config)
  config_keys.check_known(config.keys(), valid, "config")
  for section in ("mesh", "optimizer", "schedule", "init_from", "model", "data"):
    if config.get(section) is None:
      raise ConfigError(f"config.{section} is missing; valid keys of config.{section}: "
                        f"{sorted(valid[section])}.")
    if isinstance(valid[section], Mapping):
      config_keys.check_known(config[section].keys(), valid[section], f"config.{section}")
  data = config.data
  if isinstance(valid["data"], Mapping) and data.get("name") in DATASETS:
    options = data.get(data.name) or {}
    config_keys.check_known(options.keys(), valid["data"][data.name], f"config.data.{data.name}",
                            "options")


def check_override_keys(config: ml_collections.ConfigDict,
                        overrides: Union[Iterable[str], Mapping[str, Any]]) -> List[str]:
  """Raises a readable error for a `--config.a.b=...` override whose key the config does
  not hold and may not set; returns the keys it may set but does not hold yet (e.g. a
  model field left at its default), which `apply_overrides` adds."""
  overrides = dict(overrides) if isinstance(overrides, Mapping) else dict.fromkeys(overrides)
  probe = ml_collections.ConfigDict(config.to_dict())
  for dotted in ("model.name", "data.name"):  # the schema follows a switched model / dataset
    if overrides.get(dotted) is not None and dotted.split(".")[0] in probe:
      probe[dotted.split(".")[0]]["name"] = overrides[dotted]
  valid = schema(probe)
  new = []
  for dotted in overrides:
    if config_keys.resolve(probe, dotted, valid)[2] is not None:
      new.append(dotted)
  return new


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], *,
                    parse: bool = False) -> None:
  """Sets dotted `overrides` in `config`, adding model fields / data options the config
  leaves at their defaults; `parse`: the values are command-line strings."""
  names_first = sorted(overrides, key=lambda k: k not in ("model.name", "data.name"))
  for dotted in names_first:
    config_keys.set_value(config, dotted, overrides[dotted], schema(config), parse=parse)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` the way `config_flags` does."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_mmjax_config", path)
  if module_spec is None:
    raise ConfigError(f"Cannot load config file {path!r}; expected a python file with get_config().")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  """Errors for a config that cannot work on `num_devices`, raised before anything is
  prepared, written or compiled (the registries must be filled: `import_models`)."""
  if config.get("model") is None or not config.model.get("name"):
    raise ConfigError(f"config.model.name is empty; expected one of {MODELS.names()}.")
  check_keys(config)
  _check_positive(config, ("total_steps", "batch_size", "eval_batch_size", "grad_accum_steps",
                           "log_every", "keep_checkpoints"))
  _check_nonnegative(config, ("eval_every", "checkpoint_every", "max_skipped_steps"))
  _check_model(config.model)
  summary_hooks(config)
  source = config.init_from.checkpoint
  if source and "://" not in source and not os.path.exists(source):
    raise ConfigError(f"config.init_from.checkpoint={source!r} does not exist; expected a "
                      "run directory, its checkpoints/ directory or a step directory.")
  if config.init_from.rename:
    from mmjax.train import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.rename_rules(config.init_from.rename)
  if config.on_nonfinite not in ON_NONFINITE:
    raise ConfigError(f"config.on_nonfinite={config.on_nonfinite!r}; "
                      f"expected one of {ON_NONFINITE}.")
  if config.optimizer.name not in OPTIMIZERS:
    raise ConfigError(f"config.optimizer.name={config.optimizer.name!r}; "
                      f"expected one of {OPTIMIZERS}.")
  if config.schedule.name not in SCHEDULES:
    raise ConfigError(f"config.schedule.name={config.schedule.name!r}; expected one of {SCHEDULES}.")
  if config.batch_size % config.grad_accum_steps:
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                      f"config.grad_accum_steps={config.grad_accum_steps}.")
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % num_processes:
      raise ConfigError(f"config.{name}={config[name]} is not divisible by the number of "
                        f"processes ({num_processes}); each process loads an equal share.")
  mesh = sharding.mesh_shape(config.mesh, num_devices)
  data_parallel = mesh[0] * mesh[1]
  for name, size in (("config.batch_size / config.grad_accum_steps",
                      config.batch_size // config.grad_accum_steps),
                     ("config.eval_batch_size", config.eval_batch_size)):
    if size % data_parallel:
      raise ConfigError(f"{name} = {size} is not divisible by the data-parallel size "
                        f"data x fsdp = {mesh[0]}x{mesh[1]} = {data_parallel}.")


def model_fields_from_init_checkpoint(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Sets the model fields `config.model` leaves unset from the `model_config.json` next
  to `config.init_from.checkpoint` (what `python -m mmjax.convert` writes), so converted
  weights train with one flag; returns the fields set. A config that sets a field keeps
  its value; a checkpoint of another model adds nothing."""
  saved = _init_checkpoint_model_config(config)
  name = config.model.get("name")
  if saved.get("name") != name or name not in MODELS:
    return {}
  fields = set(model_schema(name))
  added = {k: v for k, v in saved.items() if k in fields and k not in config.model}
  with config_keys.unlocked(config.model):
    for key, value in added.items():
      config.model[key] = tuple(value) if isinstance(value, list) else value
  return added


def data_fields_from_init_checkpoint(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Sets `config.data.image_normalization`, when the config leaves it unset, to the pixel
  normalisation the converter recorded in `config.init_from.checkpoint`'s model_config.json
  (e.g. CLIP's mean / std), so the data are normalised as the weights were trained;
  returns the fields set."""
  from mmjax.convert.common import IMAGE_NORMALIZATION  # pylint: disable=g-import-not-at-top
  recorded = _init_checkpoint_model_config(config).get(IMAGE_NORMALIZATION)
  if not recorded or config.data.get("image_normalization") is not None:
    return {}
  value = (tuple(recorded["mean"]), tuple(recorded["std"]))
  with config_keys.unlocked(config.data):
    config.data["image_normalization"] = value
  return {"image_normalization": value}


def _init_checkpoint_model_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The model_config.json next to `config.init_from.checkpoint`; {} if there is none."""
  source = config.init_from.checkpoint
  path = os.path.join(source, "model_config.json") if source and "://" not in source else ""
  if not path or not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def summary_hooks(config: ml_collections.ConfigDict) -> List[Callable[..., str]]:
  """The functions `config.summary_hooks` names: hook(results, config, workdir) -> text."""
  hooks = []
  for name in config.get("summary_hooks") or ():
    module, _, function = name.rpartition(".")
    try:
      hooks.append(getattr(importlib.import_module(module), function))
    except (ImportError, AttributeError, ValueError) as e:
      raise ConfigError(f"config.summary_hooks entry {name!r} is not an importable "
                        f"'module.function' ({type(e).__name__}: {e}).") from e
  return hooks


# Model fields whose value names an entry of a registry.
REGISTRY_FIELDS = {"fusion": FUSIONS, "implementation": ATTENTION_BACKENDS}


def _check_model(model_config: ml_collections.ConfigDict) -> None:
  """Names the model's registry-valued fields select exist; its objectives are known."""
  for field, registry in REGISTRY_FIELDS.items():
    if model_config.get(field) is not None:
      registry.get(model_config[field])
  for where, fields in (("config.model", model_config),
                        ("config.model.encoder", model_config.get("encoder") or {})):
    policy = fields.get("remat_policy") if hasattr(fields, "get") else None
    if policy is not None and policy not in REMAT_POLICIES:
      raise ConfigError(f"{where}.remat_policy={policy!r}; expected one of "
                        f"{sorted(REMAT_POLICIES)}.")
  fusion = model_config.get("fusion")
  if isinstance(fusion, str) and fusion in FUSIONS:  # before any data: fields it ignores
    try:
      fusion_lib.check_fields(fusion, FUSIONS.get(fusion).uses, model_config)
    except ValueError as e:
      raise ConfigError(f"config.model: {e}") from e
  model = build_model(model_config)
  if hasattr(model, "objective_weights"):
    try:
      model.objective_weights()
    except ValueError as e:
      raise ConfigError(f"config.model.loss_weights: {e}") from e


def _check_positive(config, names: Sequence[str]) -> None:
  for name in names:
    if not isinstance(config[name], int) or config[name] < 1:
      raise ConfigError(f"config.{name} must be a positive integer; got {config[name]!r}.")


def _check_nonnegative(config, names: Sequence[str]) -> None:
  for name in names:
    if not isinstance(config[name], int) or config[name] < 0:
      raise ConfigError(f"config.{name} must be a non-negative integer; got {config[name]!r}.")
