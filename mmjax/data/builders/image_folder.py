"""ImageNet-style class folders, read without TensorFlow (`name="image_folder"`).

    root/train/<class name>/*.jpg
    root/val/<class name>/*.jpg       (any split names: every subfolder of root is a split)

Options (`config.data.image_folder`): `root`, and `eval_split` (default "val"). Classes
are the sub-folder names of the train split, sorted; a class folder in another split
that the train split lacks is an error. The class names double as zero-shot prompts'
words ("a photo of a {}."), with "_" read as a space.

Record: image (encoded file bytes), label.
"""
import os
from typing import Any, Dict, List

import tensorflow_datasets as tfds

from mmjax.data.builders import files
from mmjax.registry import DATASETS

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def class_names(root: str, split: str = "train") -> List[str]:
  folder = os.path.join(os.path.expanduser(root), split)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image_folder expects class folders under {folder!r}; it does "
                            "not exist.")
  names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  if not names:
    raise ValueError(f"{folder!r} has no class sub-folders.")
  return names


class ImageFolderBuilder(files.FilesBuilder):
  """Prepares root/<split>/<class>/<image> into array_record."""

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": files.IMAGE_BYTES,
            "label": tfds.features.ClassLabel(names=class_names(self.source["root"])),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    root = os.path.expanduser(self.source["root"])
    splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return {s: self._generate_examples(self._records(s)) for s in splits}

  def _records(self, split):
    classes = class_names(self.source["root"])
    for name in class_names(self.source["root"], split):
      if name not in classes:
        raise ValueError(f"Class folder {split}/{name} is not a class of the train split "
                         f"({len(classes)} classes).")
      folder = os.path.join(os.path.expanduser(self.source["root"]), split, name)
      for file in sorted(os.listdir(folder)):
        if file.lower().endswith(EXTENSIONS):
          path = os.path.join(folder, file)
          yield f"{name}/{file}", {"image": files.read_image(path, f"class {name!r}"),
                                   "label": classes.index(name)}


@DATASETS.register("image_folder")
class ImageFolder(files.FilesDataset):
  """Class folders of images (see the module docstring)."""

  builder_class = ImageFolderBuilder

  @classmethod
  def builder_defaults(cls) -> Dict[str, Any]:
    return {"root": "", "eval_split": "val"}

  def __init__(self, data_config):
    super().__init__(data_config)
    self.default_eval_split = self.options["eval_split"]

  def default_preprocess(self, train: bool) -> str:
    size = self.config.get("image_size") or 224
    flip = "flip_lr|" if train else ""
    return f"decode|resize({size})|{flip}normalize|keep('image', 'label')"

  def info(self) -> Dict[str, Any]:
    self.prepare()
    names = list(self.builder.info.features["label"].names)
    return {"num_classes": len(names), "classes": [n.replace("_", " ") for n in names],
            "chance": {"label": 1 / len(names)}}
