"""What a dataset gives the input pipeline, and the base class for TFDS-backed ones.

A dataset is a class registered by name in `mmjax.registry.DATASETS` and built with
`config.data`. The pipeline only calls:

  prepare()                    build the files on first use (idempotent, deterministic)
  source(split)                random-access records: `len(src)`, `src[i]` -> dict of raw
                               numpy arrays / bytes (images uint8, text as bytes, ...)
  fields()                     {raw key: Field}: what a good record looks like, used to
                               reject bad records with a message naming record and field
  default_preprocess(train)    the preprocessing string used when the config gives none
  default_eval_split, default_tokenizer   used when the config gives none
  info()                       facts for the model config and the run summary
  declared_fields()            `fields()` known without the data (default: `fields()`);
                               `mmjax.aot` builds its abstract batch from them
  splits()                     {split name: number of examples}
  spm_path                     the prepare-time SentencePiece model file (or None)

A research fork registers its own dataset from its own file:

    @DATASETS.register("my_data")
    class MyData(TfdsDataset): ...

`config.data.<name>` (e.g. `config.data.shapes`) holds the dataset's own options (sizes,
seeds, ...); every dataset declares them with defaults in `builder_defaults()`, and
unknown keys are an error. Sections named after other datasets are ignored, so switching
datasets is one field: `--config.data.name=cifar10`.
"""
import abc
import dataclasses
import fcntl
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

ENV_DATA_DIR = "MMJAX_DATA_DIR"


def resolve_data_dir(data_dir: Optional[str]) -> str:
  """config.data.data_dir, else $MMJAX_DATA_DIR, else ~/.cache/mmjax/datasets."""
  path = data_dir or os.environ.get(ENV_DATA_DIR) or "~/.cache/mmjax/datasets"
  return os.path.abspath(os.path.expanduser(path))


@dataclasses.dataclass(frozen=True)
class Field:
  """What one raw field of a good record looks like.

  kind: "array" (numeric; `shape` with None for any size, floats must be finite),
        "text" (bytes or str, must be non-empty), or "index" (integer in [0, num_values)).
  dtype: numpy dtype name of an "array" when known (used to make example records).
  """
  kind: str
  shape: Optional[Tuple[Optional[int], ...]] = None
  num_values: Optional[int] = None
  dtype: Optional[str] = None

  def example(self, unknown_size: int = 256) -> Any:
    """A good record value of this field (None dims take `unknown_size`)."""
    if self.kind == "text":
      return b"a b c"
    if self.kind == "index":
      return np.int64(0)
    shape = tuple(unknown_size if d is None else d for d in (self.shape or ()))
    return np.zeros(shape, self.dtype or np.float32)


class BadRecordError(ValueError):
  """A record that breaks its dataset's `fields()`; the message names record and field."""


def check_record(record: Mapping[str, Any], fields: Mapping[str, Field], where: str) -> None:
  """Raises BadRecordError naming `where` (e.g. 'shapes/train[17]') and the bad field."""
  for key, field in fields.items():
    if key not in record:
      raise BadRecordError(f"Bad record {where}: field {key!r} is missing; "
                           f"expected fields {sorted(fields)}, got {sorted(record)}.")
    value = record[key]
    if field.kind == "text":
      text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
      if not text.strip():
        raise BadRecordError(f"Bad record {where}: field {key!r} is an empty text; "
                             "expected a non-empty string.")
    elif field.kind == "index":
      v = np.asarray(value)
      if v.shape != () or not np.issubdtype(v.dtype, np.integer) or not (
          0 <= int(v) < field.num_values):
        raise BadRecordError(
            f"Bad record {where}: field {key!r} is {value!r}; expected an integer in "
            f"[0, {field.num_values}).")
    elif field.kind == "array":
      v = np.asarray(value)
      if field.shape is not None and (
          v.ndim != len(field.shape) or
          any(e is not None and e != s for e, s in zip(field.shape, v.shape))):
        raise BadRecordError(f"Bad record {where}: field {key!r} has shape {v.shape}; "
                             f"expected {field.shape} (None = any size).")
      if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
        raise BadRecordError(f"Bad record {where}: field {key!r} has non-finite values "
                             f"(at flat index {int(np.argmin(np.isfinite(v)))}).")
    else:
      raise ValueError(f"Field kind {field.kind!r} of {key!r}: expected array/text/index.")


class Dataset(abc.ABC):
  """Base class of registered datasets (see the module docstring for the contract)."""

  default_eval_split: str = "test"
  default_tokenizer: str = "sentencepiece"

  def __init__(self, data_config):
    self.config = data_config
    self.data_dir = resolve_data_dir(data_config.get("data_dir"))
    options = dict(self.builder_defaults())
    given = data_config.get(data_config.name) or {}
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
    unknown = sorted(set(given) - set(options))
    if unknown:
      raise ValueError(f"Unknown config.data.{data_config.name} options {unknown}; valid "
                       f"options: {sorted(options)}.")
    options.update(given)
    self.options = options

  @classmethod
  def builder_defaults(cls) -> Dict[str, Any]:
    return {}

  spm_path: Optional[str] = None

  @abc.abstractmethod
  def prepare(self) -> None:
    ...

  @abc.abstractmethod
  def source(self, split: str) -> Sequence[Mapping[str, Any]]:
    ...

  @abc.abstractmethod
  def splits(self) -> Dict[str, int]:
    ...

  @abc.abstractmethod
  def fields(self) -> Dict[str, Field]:
    ...

  @abc.abstractmethod
  def default_preprocess(self, train: bool) -> str:
    ...

  def info(self) -> Dict[str, Any]:
    return {}

  def declared_fields(self) -> Dict[str, Field]:
    """What a raw record looks like, answered without reading or preparing any data."""
    return self.fields()


def fields_from_tfds(features) -> Dict[str, Field]:
  """Field checks derived from a TFDS FeaturesDict (Tensor/Image shapes, Text, ClassLabel)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  fields = {}
  for key, feature in features.items():
    if isinstance(feature, tfds.features.ClassLabel):
      fields[key] = Field("index", num_values=feature.num_classes)
    elif isinstance(feature, tfds.features.Text):
      fields[key] = Field("text")
    elif isinstance(feature, (tfds.features.Tensor, tfds.features.Image)):
      fields[key] = Field("array", shape=tuple(feature.shape),
                          dtype=np.dtype(feature.np_dtype).name)
  return fields


class TfdsDataset(Dataset):
  """A dataset stored as a TFDS array_record builder; subclasses define `make_builder`.

  When `text_keys` is set, preparing also trains a SentencePiece model on those fields of
  the train split (`builder_defaults()['vocab_size']` pieces at most), stored next to the
  data as `spm_<vocab_size>.model`.
  """

  text_keys: Tuple[str, ...] = ()

  def __init__(self, data_config):
    super().__init__(data_config)
    self.builder = self.make_builder()

  @abc.abstractmethod
  def make_builder(self):
    ...

  def prepare(self) -> None:
    if not self.builder.data_path.exists():
      # Several processes of one job may share a data_dir: one builds, the others wait.
      os.makedirs(self.data_dir, exist_ok=True)
      with open(os.path.join(self.data_dir, f".{self.builder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if self.builder.data_path.exists():  # built meanwhile by another process:
          self.builder = self.make_builder()  # reload its info (splits, files)
        else:
          import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
          tfds.disable_progress_bar()
          self.builder.download_and_prepare()
    if self.spm_path and not os.path.exists(self.spm_path):
      from mmjax.data import tokenizer  # pylint: disable=g-import-not-at-top
      source = self.builder.as_data_source(split="train")
      text = [record[k].decode("utf-8") for record in source for k in self.text_keys]
      tokenizer.train_sentencepiece(text, self.spm_path, vocab_size=self.options["vocab_size"])

  @property
  def spm_path(self) -> Optional[str]:
    if not self.text_keys:
      return None
    return os.path.join(os.fspath(self.builder.data_path),
                        f"spm_{self.options['vocab_size']}.model")

  def source(self, split: str):
    self.prepare()
    if split not in self.builder.info.splits:
      raise ValueError(f"Split {split!r} not in dataset {self.config.name!r}; expected "
                       f"one of {sorted(self.builder.info.splits)}.")
    return self.builder.as_data_source(split=split)

  def splits(self) -> Dict[str, int]:
    self.prepare()
    return {k: v.num_examples for k, v in self.builder.info.splits.items()}

  def fields(self) -> Dict[str, Field]:
    return fields_from_tfds(self.builder.info.features)
