"""Bad records: an error naming record and field, or dropped and counted when configured."""
import numpy as np
import pytest

from mmjax.data import dataset as dataset_lib
from mmjax.data import pipeline
from mmjax.registry import DATASETS

GOOD = {"image": np.zeros((4, 4, 3), np.uint8), "sensor": np.ones((5, 2), np.float32),
        "caption": b"a red square", "answer": 1}
BAD = {  # record index -> (field, bad value, words the error must contain)
    3: ("image", np.zeros((4, 5, 3), np.uint8), "shape (4, 5, 3); expected (4, 4, 3)"),
    7: ("sensor", np.array([[1, np.nan]] * 5, np.float32), "non-finite"),
    11: ("caption", b"  ", "empty text"),
    14: ("answer", 9, "expected an integer in [0, 3)"),
}


@DATASETS.register("toy_with_bad_records")
class ToyWithBadRecords(dataset_lib.Dataset):
  """16 in-memory records, four of them bad (BAD); a fork's dataset looks like this."""

  default_tokenizer = "bytes"

  @classmethod
  def builder_defaults(cls):
    return {"bad": True}

  def prepare(self):
    pass

  def source(self, split):
    records = [dict(GOOD, answer=i % 3) for i in range(16)]
    if self.options["bad"]:
      for index, (field, value, _) in BAD.items():
        records[index][field] = value
    return records

  def splits(self):
    return {"train": 16, "test": 16}

  def fields(self):
    return {"image": dataset_lib.Field("array", (4, 4, 3)),
            "sensor": dataset_lib.Field("array", (None, 2)),
            "caption": dataset_lib.Field("text"),
            "answer": dataset_lib.Field("index", num_values=3)}

  def default_preprocess(self, train):
    return "decode|tokenize('caption', 'text', 6)|keep('image', 'sensor', 'text', 'answer')"


@pytest.mark.parametrize("index", sorted(BAD))
def test_bad_record_error_names_record_and_field(index):
  field, _, words = BAD[index]
  maker = pipeline._ExampleMaker(pipeline.default_config("toy_with_bad_records"), "train",
                                 train=False)
  with pytest.raises(dataset_lib.BadRecordError) as error:
    maker(index)
  message = str(error.value)
  assert f"toy_with_bad_records/train[{index}]" in message
  assert repr(field) in message and words in message


def test_bad_record_stops_training_by_default():
  it = pipeline.create_train_iterator(pipeline.default_config("toy_with_bad_records"),
                                      global_batch_size=16, seed=0)
  with pytest.raises(dataset_lib.BadRecordError, match=r"toy_with_bad_records/train\[\d+\]"):
    next(it)


def test_dropped_bad_records_are_skipped_and_counted():
  # No read-ahead, so the count is exactly that of the records read so far.
  config = pipeline.default_config("toy_with_bad_records", drop_bad_records=True,
                                   read_threads=0, prefetch=0)
  pipeline.DROPPED.clear()
  it = pipeline.create_train_iterator(config, global_batch_size=4, seed=0)
  indices = np.concatenate([next(it)["index"] for _ in range(3)])  # one epoch: 12 good
  assert sorted(indices) == sorted(set(range(16)) - set(BAD))
  assert pipeline.DROPPED["toy_with_bad_records/train"] == 4
  eval_batches = list(pipeline.create_eval_iterator(config, global_batch_size=8))
  valid = np.concatenate([b["index"][b["valid"]] for b in eval_batches])
  assert sorted(valid) == sorted(set(range(16)) - set(BAD))
  assert sum(len(b["valid"]) for b in eval_batches) == 16


def test_text_left_untokenized_is_an_error():
  config = pipeline.default_config("toy_with_bad_records", toy_with_bad_records={"bad": False},
                                   preprocess="decode|keep('image', 'caption')")
  it = pipeline.create_train_iterator(config, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="batch key 'caption' holds .* tokenize"):
    next(it)


def test_damaged_array_record_shard_names_dataset_split_record_and_file(tmp_path):
  """Garbage in the middle of a real (TFDS array_record) shard: reading the records there
  fails in Riegeli; the error names the record and the file, and drop_bad_records skips it."""
  options = {"num_train": 64, "num_validation": 8, "num_test": 8, "image_size": 24}
  config = pipeline.default_config("shapes", data_dir=str(tmp_path), shapes=options,
                                   read_threads=0, prefetch=0)
  pipeline.get_dataset(config).prepare()
  (shard,) = tmp_path.rglob("*-train.array_record-*")
  data = bytearray(shard.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
  shard.write_bytes(bytes(data))

  maker = pipeline._ExampleMaker(config, "train", train=False)
  bad = []
  for index in range(len(maker.source)):
    try:
      maker(index)
    except dataset_lib.BadRecordError as e:
      bad.append((index, str(e)))
  assert bad, "the damage hit no record"
  index, message = bad[0]
  assert f"Unreadable record shapes/train[{index}] in {shard}" in message
  assert "Riegeli" in message

  config.drop_bad_records = True
  pipeline.DROPPED.clear()
  dropping = pipeline._ExampleMaker(config, "train", train=False)
  assert all(dropping(i) is None for i, _ in bad)
  assert pipeline.DROPPED["shapes/train"] == len(bad)


@pytest.mark.parametrize("kind, value, message", [
    ("texts", [], "non-empty list of non-empty strings"),
    ("texts", [b"a caption", b"  "], "non-empty list of non-empty strings"),
    ("texts", b"one caption, not a list", "non-empty list of non-empty strings"),
    ("image_bytes", b"", "non-empty bytes of an image file"),
    ("image_bytes", np.zeros((2, 2)), "non-empty bytes of an image file")])
def test_caption_lists_and_image_files_are_checked(kind, value, message):
  field = dataset_lib.Field(kind)
  dataset_lib.check_record({"x": field.example(8)}, {"x": field}, "files/train[0]")
  with pytest.raises(dataset_lib.BadRecordError, match=f"files/train\\[3\\].*'x'.*{message}"):
    dataset_lib.check_record({"x": value}, {"x": field}, "files/train[3]")
