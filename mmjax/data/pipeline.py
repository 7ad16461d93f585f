"""grain input pipelines: deterministic, sharded per process, checkpointable, exact eval.

The trainer uses four functions:

  default_config(name)                     -> config.data for a registered dataset
  dataset_info(data_config)                -> facts for the model config and the summary
  create_train_iterator(data_config, global_batch_size=, seed=)
      an infinite grain DatasetIterator of this process's batches; its state goes into
      the Orbax checkpoint with `grain.checkpoint.CheckpointSave(iterator)`.
  create_eval_iterator(data_config, global_batch_size=, split=None)
      an iterable over every example of the split exactly once (this process's shard),
      the last batch padded, with `valid` False on padding rows.

How the training order is made (all of it a pure function of `seed` and the step):

  source indices 0..N-1 -> this process's shard [process_index::process_count]
  -> shuffled with `seed`, reshuffled every epoch (grain's per-epoch reseed)
  -> repeated forever -> read + checked + preprocessed (augmentation rng seeded from
     (seed, example index, epoch)) -> batched -> optional worker processes.

So a restored iterator yields exactly the batch that would have come next, and each
augmented example is the same whichever process or worker made it. With worker processes
(num_workers > 0) each worker batches its own slice of that stream, so the batch order is
a (deterministic) function of num_workers too: resume with the same num_workers.

`config.data` fields (see `default_config`):

  name              dataset registered in mmjax.registry.DATASETS ("shapes", "digits",
                    "tfds", "cifar10", "mnist", "coco_captions", "imagenet2012", ...)
  data_dir          where datasets are prepared/read; None -> $MMJAX_DATA_DIR, else
                    ~/.cache/mmjax/datasets
  <name>            a section named after the dataset (e.g. `shapes`): its own options
                    (sizes, generation seed, vocab size, ...); unknown keys are an error
                    listing the valid ones. Sections of other datasets are ignored, so
                    `--config.data.name=cifar10` switches datasets by itself.
  train_split       split to train on
  eval_split        split to evaluate on; None -> the dataset's default
  tokenizer         "sentencepiece" (trained at prepare time on the dataset's text),
                    "bytes", or a path to any SentencePiece .model file; None -> the
                    dataset's default ("sentencepiece" for shapes / digits, else "bytes")
  image_size        images are resized to this by the default preprocessing; None = native
  max_text_len      caption tokens (`text`), padded / truncated
  max_question_len  question tokens (`question`), padded / truncated
  max_answer_len    0: answers are class indices only; N > 0: also their text, as N
                    tokens (`answer_text`), for generative VQA (model.vqa_mode="generate")
  preprocess        train preprocessing string (see mmjax.data.preprocess); None -> the
                    dataset's default
  eval_preprocess   the same at evaluation (random ops become deterministic); None -> the
                    dataset's default
  image_normalization  (mean, std), floats or per-channel triples on [0, 1] pixels, that
                    `normalize` ops without arguments apply (every default preprocessing
                    has one); None -> (0.5, 0.5). `init_from.checkpoint=DST` fills it
                    from a converted DST/model_config.json (e.g. CLIP's mean / std)
  num_workers       grain worker processes for training (0 = in the main process, with
                    threads); evaluation always reads with threads
  read_threads      threads reading and preprocessing examples in each process
  prefetch          examples buffered by the read threads / batches per worker
  drop_bad_records  what happens to a bad record: one that breaks the dataset's
                    `fields()` checks, or that cannot be read at all (a damaged shard:
                    I/O, Riegeli or decode errors). False: an error naming the record
                    (dataset/split[index]), the field or the file; True: the record is
                    skipped (train) or masked as padding (eval), logged, and counted in
                    `DROPPED`. A record that reads and checks fine but fails in
                    preprocessing always raises (that is a bug in the preprocessing).
"""
import collections
import math
import os
from typing import Any, Dict, Iterable, Optional

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from mmjax.config_keys import check_known
from mmjax.data import builders  # noqa: F401  (registers the bundled datasets)
from mmjax.data import dataset as dataset_lib
from mmjax.data import preprocess as pp_lib
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.errors import ConfigError
from mmjax.registry import DATASETS

# Bad records skipped by this process (per worker process when num_workers > 0),
# keyed by "dataset/split".
DROPPED: collections.Counter = collections.Counter()

# dtypes of the batch contract (mmjax.data); outputs of preprocessing are cast to these.
CONTRACT_DTYPES = {
    "image": np.float32, "video": np.float32, "audio": np.float32, "sensor": np.float32,
    "spectrogram": np.float32, "text": np.int32, "question": np.int32,
    "answer": np.int32, "label": np.int32, "question_type": np.int32, "index": np.int32,
    "valid": np.bool_, "text_mask": np.bool_, "question_mask": np.bool_,
    "answer_text": np.int32, "answer_text_mask": np.bool_,
    "prefix": np.int32, "suffix": np.int32, "task": np.int32, "prompt_caption": np.int32,
    "prompt_vqa": np.int32,
}


def default_config(name: str = "shapes", **overrides) -> ml_collections.ConfigDict:
  """config.data for dataset `name`, with every field documented in the module docstring."""
  cls = DATASETS.get(name)
  placeholder = ml_collections.config_dict.placeholder
  config = ml_collections.ConfigDict({
      "name": name,
      "data_dir": placeholder(str),
      name: dict(cls.builder_defaults()),
      "train_split": "train",
      "eval_split": placeholder(str),
      "tokenizer": placeholder(str),
      "image_size": placeholder(int),
      "max_text_len": 24,
      "max_question_len": 16,
      "max_answer_len": 0,
      "preprocess": placeholder(str),
      "eval_preprocess": placeholder(str),
      "image_normalization": placeholder(tuple),
      "num_workers": 0,
      "read_threads": 2,
      "prefetch": 16,
      "drop_bad_records": False,
  })
  check_known(overrides, config.keys(), "config.data")
  for key, value in overrides.items():
    if key == name:  # each given option replaces its default (a `fields` map too, whole)
      check_known(value, config[name].keys(), f"config.data.{name}", "options")
      for option, option_value in value.items():
        config[name][option] = option_value
    else:
      config[key] = value
  return config


def _complete(data_config) -> ml_collections.ConfigDict:
  """data_config with missing fields filled from default_config; unknown fields raise."""
  if "name" not in data_config:
    raise ConfigError(f"config.data needs a `name`; expected one of {DATASETS.names()}.")
  name = data_config.name
  full = default_config(name)
  check_known(data_config.keys(), set(full.keys()) | set(DATASETS.names()), "config.data")
  given = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
  full.update({k: v for k, v in given.items() if k not in DATASETS})
  # The dataset's own section as given (the dataset validates it against its defaults).
  full[name] = ml_collections.ConfigDict(dict(given.get(name) or {}))
  return full


def get_dataset(data_config) -> dataset_lib.Dataset:
  """The registered dataset `data_config.name`, built from the completed config."""
  data_config = _complete(data_config)
  return DATASETS.get(data_config.name)(data_config)


def _preprocess_spec(data_config, ds, train: bool) -> str:
  """The configured (or the dataset's default) preprocessing of one example."""
  spec = (data_config.preprocess if train else data_config.eval_preprocess)
  spec = spec or ds.default_preprocess(train)
  if data_config.max_answer_len:  # generative VQA: the answer's text as tokens too
    spec += f"|answer_text({data_config.max_answer_len})"
  return spec


class _ExampleMaker:
  """Reads, checks and preprocesses one record; picklable for grain worker processes."""

  def __init__(self, data_config, split: str, *, train: bool, seed: int = 0):
    data_config = _complete(data_config)
    self.dataset = ds = get_dataset(data_config)
    ds.prepare()
    self.name, self.split, self.train, self.seed = data_config.name, split, train, seed
    self.source = ds.source(split)
    self.fields = ds.fields()
    self.drop_bad = data_config.drop_bad_records
    tokenizer = _tokenizer(data_config, ds)
    self.pp_spec = _preprocess_spec(data_config, ds, train)
    answers = ds.info().get("answers") if data_config.max_answer_len else None
    self.pp = pp_lib.build(self.pp_spec, pp_lib.Context(
        tokenizer=tokenizer, answers=answers,
        image_normalization=data_config.image_normalization))

  def __call__(self, index: int, epoch: int = 0) -> Optional[Dict[str, np.ndarray]]:
    """The preprocessed example `index` of the split, or None if bad and dropped."""
    where = f"{self.name}/{self.split}[{index}]"
    try:
      try:
        record = self.source[int(index)]
      except Exception as e:  # a damaged shard: I/O, Riegeli, decode errors
        raise dataset_lib.BadRecordError(
            f"Unreadable record {where} in {_record_file(self.source, int(index))}: "
            f"{type(e).__name__}: {e}") from e
      dataset_lib.check_record(record, self.fields, where)
    except dataset_lib.BadRecordError as e:
      if not self.drop_bad:
        raise
      DROPPED[f"{self.name}/{self.split}"] += 1
      logging.warning("Dropping bad record (drop_bad_records=True): %s", e)
      return None
    rng = np.random.default_rng([self.seed, int(index), epoch]) if self.train else None
    try:
      example = self.pp(record, rng)
    except Exception as e:
      raise ConfigError(f"Preprocessing record {where} with {self.pp_spec!r} failed: "
                        f"{type(e).__name__}: {e}") from e
    example = {k: _to_contract(k, v, where) for k, v in example.items()}
    example["index"] = np.int32(index)
    return example


def _record_file(source: Any, index: int) -> str:
  """The file holding record `index` of a TFDS source (its split's file instructions)."""
  try:
    info = source.dataset_info
    for instruction in info.splits[source.split].file_instructions:
      if index < instruction.take:
        return os.path.join(info.data_dir, os.path.basename(instruction.filename))
      index -= instruction.take
  except Exception:  # pylint: disable=broad-except  (not a TFDS source: no file to name)
    pass
  return "an unknown file"


def _tokenizer(data_config, ds: dataset_lib.Dataset) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.build_tokenizer(data_config.tokenizer or ds.default_tokenizer,
                                       ds.spm_path)


def data_tokenizer(data_config) -> tokenizer_lib.Tokenizer:
  """The tokenizer the pipeline uses for `data_config` (to decode generated text, or to
  tokenize zero-shot prompts the way the model's training text was)."""
  data_config = _complete(data_config)
  ds = get_dataset(data_config)
  ds.prepare()
  return _tokenizer(data_config, ds)


def _to_contract(key: str, value: Any, where: str) -> np.ndarray:
  """Casts a preprocessed value to its batch-contract dtype; text left raw is an error."""
  value = np.asarray(value)
  if value.dtype.kind not in "biuf":
    raise ConfigError(
        f"After preprocessing {where}, batch key {key!r} holds {value.dtype} data; expected "
        "numbers (tokenize text with tokenize(...) or drop the key with keep(...)).")
  return value.astype(CONTRACT_DTYPES[key]) if key in CONTRACT_DTYPES else value


def _process_shard(process_index, process_count, global_batch_size):
  """(index, count, per-process batch), checking the batch splits evenly over processes."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % count:
    raise ConfigError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                      f"the number of processes ({count}).")
  return index, count, global_batch_size // count


def create_train_iterator(data_config, *, global_batch_size: int, seed: int,
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> grain.DatasetIterator:
  """Infinite iterator of this process's training batches (dicts of numpy arrays).

  Each batch holds `global_batch_size // process_count` examples of this process's
  shard. Deterministic from `seed`; `process_index` / `process_count` default to jax's
  (they are arguments so tests can simulate several hosts in one process).
  """
  data_config = _complete(data_config)
  pi, pc, local_batch = _process_shard(process_index, process_count, global_batch_size)
  maker = _ExampleMaker(data_config, data_config.train_split, train=True, seed=seed)
  shard = grain.MapDataset.range(len(maker.source))[pi::pc]
  shard_len = len(shard)
  if shard_len < local_batch:
    raise ConfigError(f"Process {pi} has {shard_len} examples of {maker.name}/{maker.split}, "
                      f"fewer than one batch of {local_batch}.")
  # Each process shuffles its shard with its own stream, so processes do not walk
  # neighbouring records in lockstep.
  shuffle_seed = int(np.random.SeedSequence([seed % 2**32, pi]).generate_state(1)[0])
  ds = (shard.shuffle(seed=shuffle_seed).repeat()
        .map_with_index(lambda step, index: maker(index, epoch=step // shard_len)))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                            prefetch_buffer_size=data_config.prefetch))
  ds = ds.batch(local_batch, drop_remainder=True)  # dropped (None) examples are skipped
  if data_config.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # workers re-read absl flags; outside app.run there are none
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers,
        per_worker_buffer_size=max(1, data_config.prefetch // local_batch)))
  return iter(ds)


def create_eval_iterator(data_config, *, global_batch_size: int, split: Optional[str] = None,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> Iterable[Dict[str, Any]]:
  """Every example of `split` exactly once: this process's shard, in fixed order.

  All processes yield the same number of batches (needed to build global arrays); rows
  past the end of the shard, and bad records when drop_bad_records is set, are padding:
  zeros with `valid` False. Iterating again starts a fresh pass.
  """
  data_config = _complete(data_config)
  pi, pc, local_batch = _process_shard(process_index, process_count, global_batch_size)
  if split is None:
    split = data_config.eval_split or get_dataset(data_config).default_eval_split
  maker = _ExampleMaker(data_config, split, train=False)
  num = len(maker.source)
  shard = range(pi, num, pc)
  num_batches = math.ceil(math.ceil(num / pc) / local_batch)
  padding = _padding_example(maker)

  def example(row: int):
    out = maker(shard[row]) if row < len(shard) else None
    if out is None:
      return padding
    return {**out, "valid": np.True_}

  ds = grain.MapDataset.range(num_batches * local_batch).map(example)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                            prefetch_buffer_size=data_config.prefetch))
  return ds.batch(local_batch)  # every batch is full: the shard is padded to a multiple


def _padding_example(maker: _ExampleMaker) -> Dict[str, np.ndarray]:
  """Zeros shaped like a processed example of the split, with valid=False and index=-1."""
  for index in range(len(maker.source)):
    example = maker(index)
    if example is not None:
      padding = {k: np.zeros_like(v) for k, v in example.items()}
      padding.update(valid=np.False_, index=np.int32(-1))
      return padding
  raise ConfigError(f"Split {maker.name}/{maker.split} has no good record to evaluate.")


def batch_spec(data_config, *, train: bool = True) -> Dict[str, Any]:
  """{batch key: (shape without the batch axis, dtype)} of one preprocessed example.

  Answered from the dataset's `declared_fields()` without reading or preparing data: a
  made-up good record goes through the configured preprocessing. Token ids come from the
  byte tokenizer (shapes do not depend on the tokenizer: text is padded to its length).
  Evaluation examples also carry `valid`.
  """
  data_config = _complete(data_config)
  ds = get_dataset(data_config)
  record = {k: field.example() for k, field in ds.declared_fields().items()}
  # Shapes do not depend on which answer the text is: any vocabulary of one will do.
  pp = pp_lib.build(_preprocess_spec(data_config, ds, train), pp_lib.Context(
      tokenizer=tokenizer_lib.ByteTokenizer(), answers=["answer"]))
  example = pp(record, np.random.default_rng(0) if train else None)
  example = {k: _to_contract(k, v, f"declared {data_config.name} record")
             for k, v in example.items()}
  example["index"] = np.int32(0)
  if not train:
    example["valid"] = np.True_
  return {k: (tuple(v.shape), v.dtype) for k, v in example.items()}


def dataset_info(data_config) -> Dict[str, Any]:
  """Facts about the configured data: sizes, vocabularies, answers, chance levels, shapes.

  Prepares the dataset if needed. Always present: name, splits ({split: size}),
  train_split, eval_split, vocab_size, tokenizer, max_text_len, max_question_len and
  shapes ({batch key: (shape without the batch axis, dtype)} of one preprocessed training
  example). From the dataset, where they apply: num_classes / classes, num_answers /
  answers, chance ({task: accuracy or recall@1 of chance}), question_types, ...
  """
  data_config = _complete(data_config)
  maker = _ExampleMaker(data_config, data_config.train_split, train=True)
  ds = maker.dataset
  example = maker(0)
  tokenizer = _tokenizer(data_config, ds)
  info = {
      "name": data_config.name,
      "splits": ds.splits(),
      "train_split": data_config.train_split,
      "eval_split": data_config.eval_split or ds.default_eval_split,
      "vocab_size": tokenizer.vocab_size,
      "tokenizer": repr(tokenizer),
      "max_text_len": data_config.max_text_len,
      "max_question_len": data_config.max_question_len,
      "shapes": ({k: (tuple(v.shape), str(v.dtype)) for k, v in example.items()}
                 if example is not None else {}),
  }
  info.update(ds.info())
  return info
