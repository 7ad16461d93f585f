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
  references(split, task)      reference texts per example, for generated-text metrics:
                               task "caption" -> its captions, "vqa" -> its human answers

A research fork registers its own dataset from its own file:

    @DATASETS.register("my_data")
    class MyData(TfdsDataset): ...

`config.data.<name>` (e.g. `config.data.shapes`) holds the dataset's own options (sizes,
seeds, ...); every dataset declares them with defaults in `builder_defaults()`, and
unknown keys are an error. Sections named after other datasets are ignored, so switching
datasets is one field: `--config.data.name=cifar10`.
"""
import abc
import contextlib
import dataclasses
import fcntl
import io
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from mmjax.config_keys import check_known

ENV_DATA_DIR = "MMJAX_DATA_DIR"


def resolve_data_dir(data_dir: Optional[str]) -> str:
  """config.data.data_dir, else $MMJAX_DATA_DIR, else ~/.cache/mmjax/datasets."""
  path = data_dir or os.environ.get(ENV_DATA_DIR) or "~/.cache/mmjax/datasets"
  return os.path.abspath(os.path.expanduser(path))


@dataclasses.dataclass(frozen=True)
class Field:
  """What one raw field of a good record looks like.

  kind: "array" (numeric; `shape` with None for any size, floats must be finite),
        "text" (bytes or str, must be non-empty), "texts" (a non-empty list of those),
        "image_bytes" (an encoded image file, non-empty) or "index" (integer in
        [0, num_values)).
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
    if self.kind == "texts":
      return [b"a b c"]
    if self.kind == "image_bytes":
      import io  # pylint: disable=g-import-not-at-top
      from PIL import Image  # pylint: disable=g-import-not-at-top
      png = io.BytesIO()
      Image.new("RGB", (unknown_size, unknown_size)).save(png, format="PNG")
      return png.getvalue()
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
    elif field.kind == "texts":
      items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else []
      texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in items]
      if not texts or not all(t.strip() for t in texts):
        raise BadRecordError(f"Bad record {where}: field {key!r} is {value!r}; expected a "
                             "non-empty list of non-empty strings.")
    elif field.kind == "image_bytes":
      if not isinstance(value, (bytes, np.bytes_)) or not value:
        raise BadRecordError(f"Bad record {where}: field {key!r} is {type(value).__name__} "
                             f"of length {len(value) if hasattr(value, '__len__') else '?'}; "
                             "expected the non-empty bytes of an image file.")
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
      raise ValueError(f"Field kind {field.kind!r} of {key!r}: expected array, text, texts, "
                       "image_bytes or index.")


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
    check_known(given, options, f"config.data.{data_config.name}", "options")
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

  def references(self, split: str, task: str) -> List[List[str]]:
    """Reference texts of every example of `split`, in order (see the module docstring).

    This default reads raw fields: `captions` (several) or `caption` for "caption";
    `answers` (several) for "vqa", or the `answer` index through info()['answers'],
    repeated 10 times (one answer counts as all ten annotators agreeing).
    """
    source, names = self.source(split), self.info().get("answers")
    out = []
    for i in range(len(source)):
      record = source[i]
      if task == "caption" and ("captions" in record or "caption" in record):
        texts = record["captions"] if "captions" in record else [record["caption"]]
      elif task == "vqa" and "answers" in record:
        texts = record["answers"]
      elif task == "vqa" and "answer" in record and names:
        texts = [names[int(record["answer"])]] * 10
      else:
        raise ValueError(f"Dataset {self.config.name!r} has no {task!r} references; records "
                         f"have fields {sorted(record)}.")
      out.append([t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts])
    return out

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
    elif (isinstance(feature, tfds.features.Sequence)
          and isinstance(feature.feature, tfds.features.Text)):
      fields[key] = Field("texts")
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
          print(f"Preparing dataset {self.config.name} in {self.builder.data_dir} "
                "(first use only).", flush=True)
          # TFDS prints "Downloading and preparing..." even for generated data: log it.
          chatter = io.StringIO()
          with contextlib.redirect_stdout(chatter):
            self.builder.download_and_prepare()
          logging.info("%s", chatter.getvalue().strip())
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
