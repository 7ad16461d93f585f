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
import importlib.util
from typing import Iterable, Sequence

import ml_collections

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
  c.imports = ()                   # modules imported first (a fork registering models)
  c.progress_bar = True            # console bar with steps/s and ETA (process 0)

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
      checkpoint="",               # directory of an mmjax run, or one of its step dirs
      include=(r".*",),            # regexes on (renamed) names of parameters to load
      exclude=(),                  # regexes on (renamed) names never loaded (e.g. the head)
      rename=(),                   # ((regex, replacement), ...) source name -> this model
  ))
  return c


def _valid_keys_message(config: ml_collections.ConfigDict, where: str) -> str:
  return f"valid keys of {where}: {sorted(config.keys())}"


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Raises if `config` has top-level (or optimizer/schedule/mesh/init_from) keys the trainer
  does not know, listing the valid ones (a typo otherwise silently means a default)."""
  schema = default_config()
  for section in (None, "mesh", "optimizer", "schedule", "init_from"):
    given = config if section is None else config.get(section)
    valid = schema if section is None else schema[section]
    if given is None:
      raise ValueError(f"config.{section} is missing; "
                       f"{_valid_keys_message(valid, 'config.' + section)}.")
    unknown = sorted(set(given.keys()) - set(valid.keys()))
    if unknown:
      where = "config" if section is None else f"config.{section}"
      raise ValueError(f"Unknown {where} keys {unknown}; {_valid_keys_message(valid, where)}.")


def check_override_keys(config: ml_collections.ConfigDict, dotted_keys: Iterable[str]) -> None:
  """Raises a readable error for a `--config.a.b=...` override whose key does not exist."""
  for dotted in dotted_keys:
    node, walked = config, "config"
    for part in dotted.split("."):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
        valid = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
        raise ValueError(f"Unknown config key {walked}.{part} (from --config.{dotted}); "
                         f"valid keys of {walked}: {valid}.")
      node, walked = node[part], f"{walked}.{part}"


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` the way `config_flags` does."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_mmjax_config", path)
  if module_spec is None:
    raise ValueError(f"Cannot load config file {path!r}; expected a python file with get_config().")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  """Errors for a config that cannot work on `num_devices`, raised before compilation."""
  check_keys(config)
  _check_positive(config, ("total_steps", "batch_size", "eval_batch_size", "grad_accum_steps",
                           "log_every", "keep_checkpoints"))
  _check_nonnegative(config, ("eval_every", "checkpoint_every"))
  if not config.model.get("name"):
    raise ValueError("config.model.name is empty; set it to a registered model name.")
  if config.on_nonfinite not in ON_NONFINITE:
    raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r}; "
                     f"expected one of {ON_NONFINITE}.")
  if config.optimizer.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name={config.optimizer.name!r}; "
                     f"expected one of {OPTIMIZERS}.")
  if config.schedule.name not in SCHEDULES:
    raise ValueError(f"config.schedule.name={config.schedule.name!r}; expected one of {SCHEDULES}.")
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.grad_accum_steps={config.grad_accum_steps}.")
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % num_processes:
      raise ValueError(f"config.{name}={config[name]} is not divisible by the number of "
                       f"processes ({num_processes}); each process loads an equal share.")


def _check_positive(config, names: Sequence[str]) -> None:
  for name in names:
    if not isinstance(config[name], int) or config[name] < 1:
      raise ValueError(f"config.{name} must be a positive integer; got {config[name]!r}.")


def _check_nonnegative(config, names: Sequence[str]) -> None:
  for name in names:
    if not isinstance(config[name], int) or config[name] < 0:
      raise ValueError(f"config.{name} must be a non-negative integer; got {config[name]!r}.")
