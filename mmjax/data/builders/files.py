"""Shared parts of the builders that read a user's own files (COCO, VQAv2, class folders).

Each such dataset is prepared once into TFDS array_record with the *encoded* image bytes
(the JPEG / PNG file as it is on disk, no re-encoding), and decoded in the grain pipeline
by the `decode` op. Preparing checks every file and names the bad one: a missing image, a
JPEG that does not decode, a JSON file that does not parse or lacks a field.

The prepared copy lives under `<data_dir>/<dataset>/<digest>/`, where the digest hashes
the source options (paths, split file, answer count), so a second source never reads a
stale copy, and the same source is prepared only once.
"""
import hashlib
import io
import json
import os
import re
from typing import Any, Dict, Mapping

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mmjax.data import dataset as dataset_lib


class BadFileError(ValueError):
  """A source file that cannot be used; the message names the file and what is wrong."""


def read_json(path: str, what: str) -> Any:
  """Parsed JSON of `path`; a missing or malformed file raises naming it (`what` says its role)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} file {path!r} does not exist.")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise BadFileError(f"{what} file {path!r} is not valid JSON: {e}") from e


def need(obj: Mapping, key: str, path: str, where: str) -> Any:
  """obj[key], or an error naming the JSON file and the entry that lacks it."""
  if not isinstance(obj, Mapping) or key not in obj:
    raise BadFileError(f"{path!r}: {where} lacks the field {key!r}; got "
                       f"{sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__}.")
  return obj[key]


def read_image(path: str, where: str) -> bytes:
  """The encoded bytes of an image file, after checking that it decodes."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Missing image for {where}: {path!r} does not exist.")
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # decodes fully: a truncated JPEG fails here, not during training
  except Exception as e:  # PIL raises several types for broken files
    raise BadFileError(f"Unreadable image for {where}: {path!r} ({type(e).__name__}: {e}).") from e
  return data


_ID = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def coco_image_index(folder: str) -> Dict[int, str]:
  """{COCO image id: file path} of a folder, for either naming scheme
  ("COCO_val2014_000000391895.jpg" or "000000391895.jpg")."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Image folder {folder!r} does not exist.")
  index = {}
  for name in os.listdir(folder):
    m = _ID.search(name)
    if m:
      index[int(m.group(1))] = os.path.join(folder, name)
  return index


def source_path(source: Mapping[str, Any], path: str) -> str:
  """`path` under the dataset's `root` option (absolute paths and ~ also work)."""
  return os.path.join(os.path.expanduser(source["root"]), os.path.expanduser(path))


def digest(options: Mapping[str, Any]) -> str:
  """Short stable hash of the source options (names the prepared copy)."""
  text = json.dumps({k: options[k] for k in sorted(options)}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


IMAGE_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)  # encoded file bytes


class FilesBuilder(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder over a user's files: subclasses give `_info` and `_split_generators`.

  `source` holds the dataset's options; the builder config is named by their digest.
  """

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, source: Mapping[str, Any], **kwargs):
    self.source = dict(source)
    super().__init__(config=tfds.core.BuilderConfig(name=digest(self.source)), **kwargs)

  def _generate_examples(self, examples):
    yield from examples


class FilesDataset(dataset_lib.TfdsDataset):
  """A registered dataset backed by a FilesBuilder subclass (`builder_class`)."""

  builder_class = None
  default_tokenizer = "bytes"

  def make_builder(self):
    return self.builder_class(source=self.options, data_dir=self.data_dir,
                              file_format="array_record")

  def fields(self) -> Dict[str, dataset_lib.Field]:
    fields = super().fields()
    for key, feature in self.builder.info.features.items():
      if feature is IMAGE_BYTES:
        fields[key] = dataset_lib.Field("image_bytes")
    return fields

  def metadata(self) -> Dict[str, Any]:
    self.prepare()
    return dict(self.builder.info.metadata or {})
