"""Real handwritten digits (scikit-learn's bundled `load_digits`) paired with text.

1,797 real 8x8 grey digits (UCI optdigits), shipped inside scikit-learn, so tests and
demos see real images with no download. Each image gets:

  caption   a short description from a few templates ("a handwritten seven", ...)
  question  "what digit is this?" / "is this digit even?" / "is this digit bigger than
            four?" and `answer`, an index into ANSWERS (ten digit words + yes / no)
  label     the digit (0-9)
  question_type   index into QUESTION_TYPES ("digit", "even", "bigger_than_four")

Splits: a fixed permutation (seed 0) gives `test` = 297 images and `train` = the other 1,500.
Chance levels: label and digit questions 1/10, yes/no questions 1/2; retrieval of a
caption among the 297 test images is 1/10 per class (captions name only the digit).

Raw record (before preprocessing): image uint8 [8, 8, 1] in [0, 255], caption/question
bytes, answer, label and question_type int64.
"""
from typing import Any, Dict

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import dataset as dataset_lib
from mmjax.registry import DATASETS

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANSWERS = WORDS + ("yes", "no")
QUESTION_TYPES = ("digit", "even", "bigger_than_four")
TEMPLATES = ("a handwritten {}", "the digit {}", "a picture of the number {}",
             "a scanned {} written by hand")
NUM_TEST = 297


class DigitsBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS builder; the `tokenizer` SentencePiece vocabulary is trained after preparing."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Adds question_type."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answer": tfds.features.ClassLabel(names=ANSWERS),
            "label": tfds.features.ClassLabel(names=WORDS),
            "question_type": tfds.features.ClassLabel(names=QUESTION_TYPES),
        }),
        metadata=tfds.core.MetadataDict(answers=list(ANSWERS)))

  def _split_generators(self, dl_manager):
    del dl_manager
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    return {"train": self._generate_examples(digits, order[NUM_TEST:]),
            "test": self._generate_examples(digits, order[:NUM_TEST])}

  def _generate_examples(self, digits, indices):
    for i in indices:
      yield int(i), make_example(digits.images[i], int(digits.target[i]), int(i))


def make_example(image: np.ndarray, digit: int, index: int) -> Dict[str, Any]:
  """One record; its text is drawn from a generator seeded by the image's index."""
  rng = np.random.default_rng([0, index])
  kind = rng.integers(3)
  if kind == 0:
    question, answer = "what digit is this?", WORDS[digit]
  elif kind == 1:
    question, answer = "is this digit even?", "yes" if digit % 2 == 0 else "no"
  else:
    question, answer = "is this digit bigger than four?", "yes" if digit > 4 else "no"
  return {
      "image": (np.asarray(image)[..., None] * 16).clip(0, 255).astype(np.uint8),
      "caption": TEMPLATES[rng.integers(len(TEMPLATES))].format(WORDS[digit]),
      "question": question,
      "answer": ANSWERS.index(answer),
      "label": digit,
      "question_type": int(kind),
  }


@DATASETS.register("digits")
class Digits(dataset_lib.TfdsDataset):
  """The digits dataset for the pipeline (see the module docstring)."""

  text_keys = ("caption", "question")

  @classmethod
  def builder_defaults(cls):
    return {"vocab_size": 256}  # SentencePiece pieces (an upper bound: the text is tiny)

  def make_builder(self):
    return DigitsBuilder(data_dir=self.data_dir, file_format="array_record")

  def default_preprocess(self, train: bool) -> str:
    c = self.config
    size = c.get("image_size") or 8
    crop = f"random_crop({size}, pad=1)|" if train else ""
    return (f"decode|resize({size})|{crop}normalize|"
            f"tokenize('caption', 'text', {c.max_text_len})|"
            f"tokenize('question', 'question', {c.max_question_len})|"
            "keep('image', 'text', 'question', 'answer', 'label', 'question_type')")

  def info(self) -> Dict[str, Any]:
    return {
        "num_classes": 10, "classes": list(WORDS),
        "num_answers": len(ANSWERS), "answers": list(ANSWERS),
        "question_types": list(QUESTION_TYPES),
        "chance": {"label": 0.1, "retrieval_class": 0.1,
                   "answer_uniform": {"digit": 0.1, "even": 0.5, "bigger_than_four": 0.5}},
    }
