"""COCO captions / VQAv2 / class-folder builders on small fixtures in exactly those formats."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from mmjax.data import pipeline


def _jpeg(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(path, "JPEG")


def _coco(root, split="val2017", ids=(1, 2, 3)):
  for i in ids:
    _jpeg(os.path.join(root, split, f"{i:012d}.jpg"), 40 * i)
  data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids],
          "annotations": [{"id": 10 * i + j, "image_id": i, "caption": f"Image {i} caption {j}."}
                          for i in ids for j in range(5)]}
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
    json.dump(data, f)


def _assert_declared_shapes(config, batch, train):
  """What mmjax.aot compiles for without the files (pipeline.batch_spec) is what they give."""
  n = len(batch["index"])
  want = {k: ((n,) + shape, dtype)
          for k, (shape, dtype) in pipeline.batch_spec(config, train=train).items()}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want


def _coco_config(root, data_dir, **extra):
  options = dict(root=str(root), annotations={"train": "annotations/captions_val2017.json",
                                              "val": "annotations/captions_val2017.json"},
                 images={"train": "val2017", "val": "val2017"})
  options.update(extra)
  return pipeline.default_config("coco_files", data_dir=str(data_dir), image_size=8,
                                 max_text_len=12, coco_files=options)


def test_coco_captions_prepare_decode_and_references(tmp_path):
  _coco(tmp_path / "coco")
  config = _coco_config(tmp_path / "coco", tmp_path / "data")
  batch = next(iter(pipeline.create_eval_iterator(config, global_batch_size=4)))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["text"].shape == (4, 12)
  assert list(batch["valid"]) == [True, True, True, False]
  refs = pipeline.get_dataset(config).references("val", "caption")
  for row in range(3):  # each decoded JPEG sits with its own captions
    image_id = int(refs[batch["index"][row]][0].split()[1])
    np.testing.assert_allclose(batch["image"][row], 40 * image_id / 255 * 2 - 1, atol=0.05)
    assert refs[batch["index"][row]] == [f"Image {image_id} caption {j}." for j in range(5)]
  train = next(pipeline.create_train_iterator(config, global_batch_size=2, seed=0))
  assert train["text"].shape == (2, 12)
  _assert_declared_shapes(config, batch, train=False)
  _assert_declared_shapes(config, train, train=True)


def test_coco_karpathy_split(tmp_path):
  _coco(tmp_path / "coco", split="val2014")
  karpathy = {"images": [
      {"filepath": "val2014", "filename": f"{i:012d}.jpg", "cocoid": i, "split": s,
       "sentences": [{"raw": f"k{i} a"}, {"raw": f"k{i} b"}]}
      for i, s in ((1, "train"), (2, "restval"), (3, "test"))]}
  with open(tmp_path / "coco" / "dataset_coco.json", "w") as f:
    json.dump(karpathy, f)
  config = _coco_config(tmp_path / "coco", tmp_path / "data", karpathy_split="dataset_coco.json")
  ds = pipeline.get_dataset(config)
  assert ds.splits() == {"train": 2, "test": 1}
  assert ds.references("test", "caption") == [["k3 a", "k3 b"]]


def test_coco_bad_files_are_named(tmp_path):
  _coco(tmp_path / "coco")
  os.remove(tmp_path / "coco" / "val2017" / "000000000002.jpg")
  with pytest.raises(FileNotFoundError, match="image id 2"):
    pipeline.get_dataset(_coco_config(tmp_path / "coco", tmp_path / "d1")).prepare()
  _jpeg(str(tmp_path / "coco" / "val2017" / "000000000002.jpg"), 1)
  with open(tmp_path / "coco" / "val2017" / "000000000003.jpg", "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
  with pytest.raises(ValueError, match="Unreadable image.*000000000003.jpg"):
    pipeline.get_dataset(_coco_config(tmp_path / "coco", tmp_path / "d2")).prepare()
  with open(tmp_path / "coco" / "annotations" / "captions_val2017.json", "w") as f:
    f.write('{"images": [')
  with pytest.raises(ValueError, match="captions_val2017.json.*not valid JSON"):
    pipeline.get_dataset(_coco_config(tmp_path / "coco", tmp_path / "d3")).prepare()


def test_vqav2_files_answers_and_vocabulary(tmp_path):
  root = tmp_path / "vqa"
  for i in (1, 2):
    _jpeg(str(root / "val2014" / f"COCO_val2014_{i:012d}.jpg"), 60 * i)
  questions = {"questions": [{"question_id": 10 + i, "image_id": 1 + i % 2,
                              "question": f"how many dogs {i}?"} for i in range(3)]}
  answers = [["2"] * 7 + ["two"] * 3, ["yes"] * 10, ["2"] * 5 + ["3"] * 5]
  annotations = {"annotations": [
      {"question_id": 10 + i, "image_id": 1 + i % 2, "answer_type": "number",
       "multiple_choice_answer": a[0],
       "answers": [{"answer": x, "answer_id": j + 1} for j, x in enumerate(a)]}
      for i, a in enumerate(answers)]}
  for name, data in (("q.json", questions), ("a.json", annotations)):
    with open(root / name, "w") as f:
      json.dump(data, f)
  options = dict(root=str(root), questions={"train": "q.json", "val": "q.json"},
                 annotations={"train": "a.json", "val": "a.json"},
                 images={"train": "val2014", "val": "val2014"}, num_answers=2)
  config = pipeline.default_config("vqav2_files", data_dir=str(tmp_path / "data"),
                                   image_size=8, vqav2_files=options)
  info = pipeline.dataset_info(config)
  assert info["answers"] == ["2", "<other>"] and info["num_answers"] == 2
  batch = next(iter(pipeline.create_eval_iterator(config, global_batch_size=3)))
  refs = pipeline.get_dataset(config).references("val", "vqa")
  assert sorted(map(tuple, refs)) == sorted(map(tuple, answers))
  for row in range(3):  # "2" is class 0; "yes" is outside the 1 kept answer: "<other>"
    assert batch["answer"][row] == (1 if refs[batch["index"][row]][0] == "yes" else 0)
  _assert_declared_shapes(config, batch, train=False)


def test_image_folder_classes_and_bad_file(tmp_path):
  root = tmp_path / "imagenet"
  for split in ("train", "val"):
    for c, name in enumerate(("golden_retriever", "tabby")):
      for k in range(2):
        _jpeg(str(root / split / name / f"{k}.jpg"), 100 * c + k)
  config = pipeline.default_config("image_folder", data_dir=str(tmp_path / "data"),
                                   image_size=8, image_folder=dict(root=str(root)))
  info = pipeline.dataset_info(config)
  assert info["classes"] == ["golden retriever", "tabby"] and info["splits"] == {"train": 4, "val": 4}
  batch = next(iter(pipeline.create_eval_iterator(config, global_batch_size=4)))
  assert sorted(batch["label"]) == [0, 0, 1, 1]
  _assert_declared_shapes(config, batch, train=False)
  (root / "val" / "tabby" / "1.jpg").write_bytes(b"GIF89a broken")
  bad = pipeline.default_config("image_folder", data_dir=str(tmp_path / "data2"),
                                image_folder=dict(root=str(root)))
  with pytest.raises(ValueError, match="tabby.*1.jpg"):
    pipeline.get_dataset(bad).prepare()
