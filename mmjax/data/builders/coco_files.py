"""COCO captions from the files COCO distributes, read without TensorFlow (`name="coco_files"`).

Options (`config.data.coco_files`):

  root               folder the other paths are relative to (absolute paths also work)
  annotations        {split: captions JSON}; default COCO 2017's {"train":
                     "annotations/captions_train2017.json", "val": "annotations/captions_val2017.json"}
  images             {split: image folder}; default {"train": "train2017", "val": "val2017"}
  karpathy_split     optional `dataset_coco.json` of Karpathy & Fei-Fei: when set, splits
                     are its train (+ restval), val and test, with its captions, and
                     images are found at root/<filepath>/<filename>

Record: image (encoded JPEG bytes), captions (every reference caption of the image),
image_id. Training tokenises one caption drawn at random per visit (`pick`), evaluation
the first one; generated captions are scored against all of them (`references`).
"""
import os
from typing import Any, Dict, List, Tuple

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data.builders import files
from mmjax.registry import DATASETS


class CocoFilesBuilder(files.FilesBuilder):
  """Prepares COCO captions files into array_record (see the module docstring)."""

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": files.IMAGE_BYTES,
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "image_id": tfds.features.Tensor(shape=(), dtype=np.int64),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = (karpathy_examples(self.source) if self.source["karpathy_split"]
              else coco_examples(self.source))
    return {split: self._generate_examples(_records(examples))
            for split, examples in splits.items()}



def coco_examples(source) -> Dict[str, List[Tuple[int, str, List[str]]]]:
  """{split: [(image id, image path, captions)]} from captions_*.json + image folders."""
  annotations, images = dict(source["annotations"]), dict(source["images"])
  if not annotations or set(annotations) != set(images):
    raise ValueError("coco_files needs `annotations` and `images` for the same splits, e.g. "
                     "{'train': 'annotations/captions_train2017.json'} and {'train': "
                     f"'train2017'}}; got {sorted(annotations)} and {sorted(images)}.")
  out = {}
  for split, ann_file in annotations.items():
    path = files.source_path(source, ann_file)
    data = files.read_json(path, f"COCO captions ({split})")
    captions: Dict[int, List[str]] = {}
    for i, ann in enumerate(files.need(data, "annotations", path, "the file")):
      where = f"annotations[{i}]"
      captions.setdefault(int(files.need(ann, "image_id", path, where)), []).append(
          str(files.need(ann, "caption", path, where)).strip())
    folder = files.source_path(source, images[split])
    index = files.coco_image_index(folder)
    examples = []
    for image in files.need(data, "images", path, "the file"):
      image_id = int(files.need(image, "id", path, "an images[] entry"))
      if image_id not in captions:
        continue  # an image without captions cannot be trained or scored on
      name = image.get("file_name")
      file = os.path.join(folder, name) if name else index.get(image_id)
      if file is None:
        raise FileNotFoundError(f"Missing image for COCO image id {image_id} ({path!r}): no "
                                f"file for it in {folder!r}.")
      examples.append((image_id, file, captions[image_id]))
    out[split] = examples
  return out


def karpathy_examples(source) -> Dict[str, List[Tuple[int, str, List[str]]]]:
  """{train (+restval), val, test: [(cocoid, path, captions)]} from dataset_coco.json."""
  path = files.source_path(source, source["karpathy_split"])
  data = files.read_json(path, "Karpathy split")
  out = {"train": [], "val": [], "test": []}
  for i, image in enumerate(files.need(data, "images", path, "the file")):
    where = f"images[{i}]"
    split = files.need(image, "split", path, where)
    split = "train" if split == "restval" else split
    if split not in out:
      raise files.BadFileError(f"{path!r}: {where} has split {split!r}; expected train, "
                               "restval, val or test.")
    file = files.source_path(source, os.path.join(image.get("filepath", ""),
                                      files.need(image, "filename", path, where)))
    sentences = files.need(image, "sentences", path, where)
    captions = [str(files.need(s, "raw", path, f"{where}.sentences")).strip() for s in sentences]
    out[split].append((int(image.get("cocoid", i)), file, captions))
  return {k: v for k, v in out.items() if v}


def _records(examples):
  for image_id, file, captions in examples:
    yield image_id, {"image": files.read_image(file, f"COCO image id {image_id}"),
                     "captions": captions, "image_id": image_id}


@DATASETS.register("coco_files")
class CocoFiles(files.FilesDataset):
  """COCO captions from your own copy of the files (see the module docstring)."""

  builder_class = CocoFilesBuilder
  default_eval_split = "val"

  @classmethod
  def builder_defaults(cls) -> Dict[str, Any]:
    # COCO 2017's own layout under `root`; override a path with e.g.
    # --config.data.coco_files.annotations.val=annotations/captions_val2014.json
    return {"root": "",
            "annotations": {"train": "annotations/captions_train2017.json",
                            "val": "annotations/captions_val2017.json"},
            "images": {"train": "train2017", "val": "val2017"}, "karpathy_split": ""}

  def default_preprocess(self, train: bool) -> str:
    c = self.config
    del train  # the same at evaluation: `pick` takes the first caption there
    size = c.get("image_size") or 224
    return (f"decode|resize({size})|normalize|"
            f"pick('captions', 'caption')|tokenize('caption', 'text', {c.max_text_len})|"
            "keep('image', 'text')")
