"""VQAv2 from the files visualqa.org distributes, read without TensorFlow (`name="vqav2_files"`).

Options (`config.data.vqav2_files`):

  root          folder the other paths are relative to
  questions     {split: questions JSON}; default {"train":
                "v2_OpenEnded_mscoco_train2014_questions.json", "val": ...val2014...}
  annotations   {split: annotations JSON}; default v2_mscoco_{train,val}2014_annotations.json
  images        {split: COCO image folder}; default {"train": "train2014", "val": "val2014"}
  num_answers   size of the answer vocabulary for classification: the most frequent
                `multiple_choice_answer`s of the train split (3129 in most papers); an
                answer outside it gets the last class, "<other>"

Record: image (encoded JPEG bytes), question, answers (the 10 human answers, scored
with the official VQAv2 accuracy), answer (class index), answer_type, question_id.
A split without annotations (test-dev) is not supported: it has no answers to score.
"""
import collections
from typing import Any, Dict, List

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data.builders import files
from mmjax.registry import DATASETS

OTHER = "<other>"


class Vqav2FilesBuilder(files.FilesBuilder):
  """Prepares VQAv2 questions + annotations + COCO images into array_record."""

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": files.IMAGE_BYTES,
            "question": tfds.features.Text(),
            "answers": tfds.features.Sequence(tfds.features.Text()),
            "answer": tfds.features.Tensor(shape=(), dtype=np.int64),
            "answer_type": tfds.features.Text(),
            "question_id": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        metadata=tfds.core.MetadataDict(answers=self.answer_vocabulary()))

  def answer_vocabulary(self) -> List[str]:
    """The `num_answers - 1` most frequent train answers, then "<other>"."""
    if not hasattr(self, "_answers"):
      _, annotations = _load(self.source, "train")
      counts = collections.Counter(
          str(files.need(a, "multiple_choice_answer", "train annotations", "an annotation"))
          for a in annotations.values())
      top = sorted(counts, key=lambda a: (-counts[a], a))[:self.source["num_answers"] - 1]
      self._answers = top + [OTHER]
    return self._answers

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = sorted(self.source["questions"])
    return {split: self._generate_examples(self._records(split)) for split in splits}

  def _records(self, split):
    questions, annotations = _load(self.source, split)
    folder = files.source_path(self.source, self.source["images"][split])
    index = files.coco_image_index(folder)
    answer_index = {a: i for i, a in enumerate(self.answer_vocabulary())}
    for q in questions:
      qid = int(q["question_id"])
      if qid not in annotations:
        raise files.BadFileError(f"Question {qid} of split {split!r} has no annotation in "
                                 f"{self.source['annotations'][split]!r}.")
      ann = annotations[qid]
      answers = [str(a["answer"]) for a in ann["answers"]]
      if len(answers) < 2:
        raise files.BadFileError(f"Question {qid} of split {split!r} has {len(answers)} "
                                 "answers; VQAv2 accuracy needs the 10 human answers.")
      image_id = int(q["image_id"])
      if image_id not in index:
        raise FileNotFoundError(f"Missing image for question {qid}: COCO image id {image_id} "
                                f"is not in {folder!r}.")
      yield qid, {
          "image": files.read_image(index[image_id], f"question {qid}"),
          "question": str(q["question"]), "answers": answers,
          "answer": answer_index.get(str(ann.get("multiple_choice_answer")), len(answer_index) - 1),
          "answer_type": str(ann.get("answer_type", "")), "question_id": qid,
      }



def _load(source, split: str):
  """(questions list, {question_id: annotation}) of a split, fields checked."""
  for key in ("questions", "annotations", "images"):
    if split not in source[key]:
      raise ValueError(f"vqav2_files.{key} has no entry for split {split!r}; got "
                       f"{sorted(source[key])}.")
  qpath = files.source_path(source, source["questions"][split])
  apath = files.source_path(source, source["annotations"][split])
  questions = files.need(files.read_json(qpath, f"VQAv2 questions ({split})"), "questions",
                         qpath, "the file")
  for i, q in enumerate(questions):
    for key in ("question_id", "image_id", "question"):
      files.need(q, key, qpath, f"questions[{i}]")
  annotations = {}
  for i, a in enumerate(files.need(files.read_json(apath, f"VQAv2 annotations ({split})"),
                                   "annotations", apath, "the file")):
    for key in ("question_id", "answers"):
      files.need(a, key, apath, f"annotations[{i}]")
    for j, ans in enumerate(a["answers"]):
      files.need(ans, "answer", apath, f"annotations[{i}].answers[{j}]")
    annotations[int(a["question_id"])] = a
  return questions, annotations


@DATASETS.register("vqav2_files")
class Vqav2Files(files.FilesDataset):
  """VQAv2 from your own copy of the files (see the module docstring)."""

  builder_class = Vqav2FilesBuilder
  default_eval_split = "val"

  @classmethod
  def builder_defaults(cls) -> Dict[str, Any]:
    # The layout visualqa.org ships under `root`; override a path with e.g.
    # --config.data.vqav2_files.images.val=/data/coco/val2014
    return {"root": "",
            "questions": {s: f"v2_OpenEnded_mscoco_{s}2014_questions.json"
                          for s in ("train", "val")},
            "annotations": {s: f"v2_mscoco_{s}2014_annotations.json" for s in ("train", "val")},
            "images": {"train": "train2014", "val": "val2014"}, "num_answers": 3129}

  def default_preprocess(self, train: bool) -> str:
    del train
    c = self.config
    size = c.get("image_size") or 224
    return (f"decode|resize({size})|normalize|"
            f"tokenize('question', 'question', {c.max_question_len})|"
            "keep('image', 'question', 'answer')")

  def info(self) -> Dict[str, Any]:
    answers = list(self.metadata()["answers"])
    return {"num_answers": len(answers), "answers": answers}
