"""Public TFDS datasets (cifar10, mnist, imagenet2012, coco_captions, ...) read TF-free.

mmjax never downloads at run time. Prepare a public dataset once, on a machine with
TensorFlow and internet, in the array_record format that reads back without TensorFlow:

    pip install 'mmjax[tf]'
    tfds build cifar10 --data_dir=$MMJAX_DATA_DIR --file_format=array_record

then train on it by changing one field: `--config.data.name=cifar10`. Any other TFDS
dataset works through `name="tfds"` with `builder.tfds_name` and `builder.fields`, a map
from batch-contract key to TFDS feature path ("captions/text" reads a nested feature; a
sequence of texts is tokenised by its first entry). Options live in `config.data.tfds`
(or `config.data.cifar10`, ... for the aliases).

Records keep their TFDS decoding (images as uint8 arrays); `fields` renames them to the
batch-contract keys, and the default preprocessing decodes / resizes / normalises images
and tokenises text.
"""
import functools
from typing import Any, Dict, Mapping

from mmjax.data import dataset as dataset_lib
from mmjax.errors import ConfigError
from mmjax.registry import DATASETS


class _FieldMappedSource:
  """A TFDS data source whose records are renamed to batch-contract keys."""

  def __init__(self, source, fields: Mapping[str, str]):
    self._source, self._fields = source, dict(fields)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    record = self._source[index]
    out = {}
    for key, path in self._fields.items():
      value = record
      for part in path.split("/"):
        value = value[part]
      out[key] = value
    return out

  def __repr__(self) -> str:  # stable: grain compares it when restoring a DataLoader
    return f"_FieldMappedSource({self._source!r}, {self._fields!r})"


@DATASETS.register("tfds")
class PublicTfds(dataset_lib.Dataset):
  """Any prepared TFDS dataset, by `builder.tfds_name` (see the module docstring)."""

  default_tokenizer = "bytes"  # or a SentencePiece .model path (e.g. a T5 vocabulary)
  defaults: Dict[str, Any] = {
      "tfds_name": "",                       # the TFDS name, e.g. "cifar10"
      "fields": {"image": "image", "label": "label"},  # batch key -> TFDS feature path
      "eval_split": "test",
      "image_size": None,                    # resize to this if config.data.image_size is None
      # Raw record shapes known without the data (for `mmjax.aot`): batch key ->
      # "text", or [shape, dtype] of the decoded feature. Empty: read the TFDS features.
      "declared": {},
  }

  @classmethod
  def builder_defaults(cls):
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in cls.defaults.items()}

  def __init__(self, data_config):
    super().__init__(data_config)
    if not self.options["tfds_name"]:
      raise ConfigError(f"config.data.{data_config.name}.tfds_name is empty; expected a TFDS "
                        "dataset name such as 'cifar10'.")
    self.default_eval_split = self.options["eval_split"]
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tfds = tfds

  @functools.cached_property
  def builder(self):
    return self._tfds.builder(self.options["tfds_name"], data_dir=self.data_dir)

  def prepare(self) -> None:
    """Nothing to build here: public datasets are prepared once with `tfds build`."""

  def _raw_source(self, split: str):
    name = self.options["tfds_name"]
    try:
      return self._tfds.data_source(name, split=split, data_dir=self.data_dir, download=False)
    except Exception as e:
      raise FileNotFoundError(
          f"TFDS dataset {name!r} split {split!r} is not prepared as array_record in "
          f"{self.data_dir}. mmjax does not download at run time; prepare it once with "
          f"TensorFlow installed: `tfds build {name} --data_dir={self.data_dir} "
          f"--file_format=array_record` ({type(e).__name__}: {e})") from e

  def source(self, split: str):
    return _FieldMappedSource(self._raw_source(split), self.options["fields"])

  def splits(self) -> Dict[str, int]:
    splits = {k: v.num_examples for k, v in self.builder.info.splits.items()}
    return splits or {s: len(self._raw_source(s)) for s in (
        self.config.train_split, self.default_eval_split)}

  def fields(self) -> Dict[str, dataset_lib.Field]:
    features = self.builder.info.features
    fields = {}
    for key, path in self.options["fields"].items():
      feature = features
      for part in path.split("/"):
        feature = feature[part]
      fields.update(dataset_lib.fields_from_tfds({key: feature}))
    return fields

  def declared_fields(self) -> Dict[str, dataset_lib.Field]:
    if not self.options["declared"]:
      return self.fields()
    fields = {}
    for key, value in self.options["declared"].items():
      if value == "text":
        fields[key] = dataset_lib.Field("text")
      else:
        shape, dtype = value
        fields[key] = dataset_lib.Field("array", shape=tuple(shape), dtype=dtype)
    return fields

  def default_preprocess(self, train: bool) -> str:
    c, keys = self.config, list(self.options["fields"])
    ops = []
    if "image" in keys:
      size = c.get("image_size") or self.options["image_size"]
      ops.append("decode")
      if size:
        ops.append(f"resize({size})")
      if train:
        ops.append("flip_lr")
      ops.append("normalize")
    if "text" in keys:
      ops.append(f"tokenize('text', 'text', {c.max_text_len})")
    if "question" in keys:
      ops.append(f"tokenize('question', 'question', {c.max_question_len})")
    ops.append("keep(" + ", ".join(repr(k) for k in keys) + ")")
    return "|".join(ops)

  def info(self) -> Dict[str, Any]:
    out = {"tfds_name": self.options["tfds_name"]}
    label = self.options["fields"].get("label")
    if label:
      num = self.builder.info.features[label].num_classes
      out.update(num_classes=num, chance={"label": 1 / num})
    return out


def _register_alias(name: str, fields: Dict[str, str], eval_split: str, image_size=None,
                    declared=None):
  """Registers `name` as PublicTfds with that dataset's fields, eval split, image size."""

  class Alias(PublicTfds):
    defaults = {"tfds_name": name, "fields": fields, "eval_split": eval_split,
                "image_size": image_size, "declared": dict(declared or {})}

  Alias.__name__ = Alias.__qualname__ = f"Tfds_{name}"
  DATASETS.register(name)(Alias)


_register_alias("cifar10", {"image": "image", "label": "label"}, "test")
_register_alias("mnist", {"image": "image", "label": "label"}, "test")
# Decoded images vary in size; a typical one is declared (resizing makes batches fixed).
_register_alias("imagenet2012", {"image": "image", "label": "label"}, "validation", 224,
                declared={"image": [(375, 500, 3), "uint8"], "label": [(), "int64"]})
_register_alias("coco_captions", {"image": "image", "text": "captions/text"}, "val", 224,
                declared={"image": [(480, 640, 3), "uint8"], "text": "text"})
