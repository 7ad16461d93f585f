"""Offline datasets: deterministic builds, consistent multimodal content, public TFDS passthrough."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import pipeline
from mmjax.data.builders import shapes

TINY_SHAPES = {"num_train": 300, "num_validation": 60, "num_test": 20, "image_size": 24}


def all_records(source):
  return [source[i] for i in range(len(source))]


def assert_records_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
  config = pipeline.default_config("shapes", data_dir=str(tmp_path_factory.mktemp("a")),
                                   shapes=TINY_SHAPES)
  pipeline.get_dataset(config).prepare()
  return config


@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_building_twice_gives_identical_records_and_vocabulary(name, tiny_shapes, tmp_path):
  options = {name: TINY_SHAPES if name == "shapes" else {}}
  datasets = [tiny_shapes] if name == "shapes" else []
  while len(datasets) < 2:
    datasets.append(pipeline.default_config(name, **options,
                                            data_dir=str(tmp_path / str(len(datasets)))))
  a, b = (pipeline.get_dataset(c) for c in datasets)
  a.prepare(), b.prepare()
  assert a.data_dir != b.data_dir
  for split in a.splits():
    assert_records_equal(all_records(a.source(split)), all_records(b.source(split)))
  with open(a.spm_path, "rb") as fa, open(b.spm_path, "rb") as fb:
    assert fa.read() == fb.read()


def test_shapes_info_states_chance_levels_and_shapes(tiny_shapes):
  info = pipeline.dataset_info(tiny_shapes)
  assert info["splits"] == {"train": 300, "validation": 60, "test": 20}
  assert info["num_answers"] == len(info["answers"]) == len(shapes.ANSWERS)
  chance = info["chance"]
  assert set(chance["answer_uniform"]) == set(shapes.QUESTION_TYPES)
  assert chance["answer_uniform"]["position"] == pytest.approx(1 / 9)
  assert chance["retrieval_recall_at_1_validation"] == pytest.approx(1 / 60)
  assert 0 < chance["answer_question_only_overall"] < 0.6
  assert info["shapes"]["image"] == ((24, 24, 3), "float32")
  assert info["shapes"]["audio"] == ((2000,), "float32")
  assert info["shapes"]["sensor"] == ((32, 3), "float32")
  assert info["vocab_size"] > 20


def heard_shape(audio: np.ndarray, sample_rate: int = 8000) -> str:
  spectrum = np.abs(np.fft.rfft(audio.astype(np.float32)))
  peak = np.argmax(spectrum) * sample_rate / len(audio)
  distances = [abs(peak - p) / p for p in shapes.PITCHES_HZ]
  assert min(distances) < 0.03, f"audio peak at {peak} Hz is no shape's pitch"
  return shapes.SHAPES[int(np.argmin(distances))]


def sensed_position(sensor: np.ndarray) -> str:
  cycles = [int(np.argmax(np.abs(np.fft.rfft(sensor[:, c]))[1:4])) for c in (0, 1)]
  return shapes.POSITIONS[3 * cycles[0] + cycles[1]]


def test_shapes_audio_sensor_caption_and_answers_agree(tiny_shapes):
  """The tone names a shape in the caption, the sensor a position, answers follow."""
  source = pipeline.get_dataset(tiny_shapes).source("train")
  checked = set()
  for i in range(len(source)):
    r = source[i]
    caption = r["caption"].decode()
    objects = {}  # shape -> (color, position, size) as the caption says
    for part in caption.split(" and "):
      words = part.split(" at ")
      size, color, shape = words[0].split()[-3:]
      objects[shape] = (color, words[1], size)
    shape = heard_shape(r["audio"])
    assert shape in objects, (caption, shape)
    where = sensed_position(r["sensor"])
    at_sensed = [s for s, (_, p, _) in objects.items() if p == where]
    assert len(at_sensed) == 1, (caption, where)
    qtype = shapes.QUESTION_TYPES[r["question_type"]]
    answer = shapes.ANSWERS[r["answer"]]
    expected = {
        "heard_color": objects[shape][0], "heard_position": objects[shape][1],
        "sensed_shape": at_sensed[0], "sensed_color": objects[at_sensed[0]][0],
        "heard_at_sensed": "yes" if at_sensed[0] == shape else "no",
        "count": shapes.COUNTS[sum(1 for o in objects.values()
                                   if o[2] in r["question"].decode() or
                                   "many objects" in r["question"].decode())],
    }.get(qtype, answer)
    if qtype == "relation":  # "is the red circle left of the blue cross?"
      words = r["question"].decode()[len("is the "):-1].split()
      a, rel, b = words[1], " ".join(words[2:-3]), words[-1]
      (ra, ca), (rb, cb) = (divmod(shapes.POSITIONS.index(objects[s][1]), 3) for s in (a, b))
      holds = {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}
      expected = "yes" if holds[rel] else "no"
    assert answer == expected, (caption, r["question"], answer, expected)
    checked.add(qtype)
  assert checked == set(shapes.QUESTION_TYPES)


def test_shapes_options_are_validated(tmp_path):
  with pytest.raises(ValueError, match="Unknown config.data.shapes options.*num_trian"):
    pipeline.get_dataset(pipeline.default_config("shapes", shapes={"num_trian": 5}))
  with pytest.raises(ValueError, match="max_objects must be in"):
    pipeline.get_dataset(pipeline.default_config("shapes", shapes={"max_objects": 12}))


def test_switching_datasets_is_one_field(tmp_path):
  config = pipeline.default_config("shapes", data_dir=str(tmp_path), image_size=None)
  config.name = "cifar10"  # as --config.data.name=cifar10 does; the shapes section stays
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    assert pipeline.dataset_info(config)["num_classes"] == 10


@pytest.mark.parametrize("name,image_shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 3))])
def test_public_tfds_dataset_reads_through_the_same_pipeline(name, image_shape, tmp_path):
  config = pipeline.default_config(name, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    info = pipeline.dataset_info(config)
    assert info["num_classes"] == 10 and info["splits"]["train"] == 12
    batch = next(pipeline.create_train_iterator(config, global_batch_size=4, seed=0))
    assert batch["image"].shape == (4,) + image_shape and batch["label"].dtype == np.int32
    rows = [b["valid"].sum() for b in pipeline.create_eval_iterator(config, global_batch_size=8)]
    assert rows == [8, 4]


def test_unprepared_public_dataset_says_how_to_prepare_it(tmp_path):
  config = pipeline.default_config("cifar10", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tfds build cifar10 .*array_record"):
    pipeline.create_train_iterator(config, global_batch_size=4, seed=0)
