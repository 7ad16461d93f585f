"""`shapes`: a procedural multimodal dataset where answering needs fusing modalities.

Every example is a scene of 1..max_objects coloured shapes, generated deterministically
from (seed, split, index). Within a scene all colours, all shapes and all grid cells are
distinct, so every question below has exactly one answer.

  image     uint8 [S, S, 3]: shapes (6 colours x 4 shapes x 2 sizes) on a 3x3 grid of
            cells, with colour jitter, sub-cell position jitter and pixel noise.
  caption   all objects in reading order, e.g. "a scene with large red circle at top left
            and small blue cross at center" (432 scenes for one object, ~5x10^4 for two,
            ~2x10^6 for three: retrieval cannot be solved by memorising captions).
  audio     int16 [sample_rate * audio_seconds]: a noisy tone whose pitch names the SHAPE
            of one object of the scene, the "heard" object (random phase, +-2% pitch).
  sensor    float32 [sensor_steps, 3]: a noisy stream whose channel 0 oscillates at 1, 2
            or 3 cycles for the ROW and channel 1 for the COLUMN of the "sensed" object;
            channel 2 is noise. Half the scenes with 2+ objects sense the heard object
            (so "is the shape you hear at the sensed place?" is yes half the time).
  question / answer   one question per scene, of one of these types (uniformly among
            those that apply), answered from the ANSWERS vocabulary:

    type              example                                       needs
    color             what color is the circle?                     image + question
    shape             what shape is the red object?                 image + question
    count             how many (large|small)? objects are there?    image + question
    position          where is the red circle?                      image + question
    relation          is the red circle left of the blue cross?     image + question
    heard_color       what color is the shape you hear?             image + audio
    heard_position    where is the shape you hear?                  image + audio
    sensed_shape      what shape is at the sensed place?            image + sensor
    sensed_color      what color is at the sensed place?            image + sensor
    heard_at_sensed   is the shape you hear at the sensed place?    image + audio + sensor

  question_type  index into QUESTION_TYPES (for accuracy per type / modality set).

Chance levels (uniform over the possible answers of a type) and the question-only
baseline (always answering the most frequent answer of each exact question text, measured
on the train split, scored on the validation split at prepare time) are in
`Shapes.info()['chance']`, with recall@1 chance of caption retrieval per split.
"""
import collections
import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, List, Tuple

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import dataset as dataset_lib
from mmjax.errors import ConfigError
from mmjax.registry import DATASETS

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
          "yellow": (230, 210, 40), "purple": (150, 60, 200), "cyan": (40, 200, 210)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # cell = 3 * row + column
COUNTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANSWERS = tuple(COLORS) + SHAPES + COUNTS + POSITIONS + ("yes", "no")
# relation -> (axis of divmod(cell, 3) = (row, column), sign): "a REL b" holds when
# sign * (a's coordinate - b's) > 0; row 0 is the top.
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}
QUESTION_TYPES = ("color", "shape", "count", "position", "relation", "heard_color",
                  "heard_position", "sensed_shape", "sensed_color", "heard_at_sensed")
MODALITIES = {"color": "image", "shape": "image", "count": "image", "position": "image",
              "relation": "image", "heard_color": "image+audio",
              "heard_position": "image+audio", "sensed_shape": "image+sensor",
              "sensed_color": "image+sensor", "heard_at_sensed": "image+audio+sensor"}
PITCHES_HZ = (392.0, 587.0, 880.0, 1319.0)  # one per shape, > 1 bin apart at 256-pt FFT
PREFIXES = ("", "a scene with ", "there is ")
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Generation options; the config name is a hash of them, so each set has its own dir."""
  options: Dict[str, Any] = dataclasses.field(default_factory=dict)


def make_scene(options: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
  """One raw record from a generator (all randomness comes from `rng`)."""
  size = options["image_size"]
  k = int(rng.integers(1, options["max_objects"] + 1))
  objects = [dict(color=c, shape=s, cell=int(p), size=SIZES[int(z)])
             for c, s, p, z in zip(rng.choice(len(COLORS), k, replace=False),
                                   rng.choice(len(SHAPES), k, replace=False),
                                   rng.choice(9, k, replace=False), rng.integers(0, 2, k))]
  objects.sort(key=lambda o: o["cell"])  # reading order, as the caption lists them
  heard = int(rng.integers(k))
  sensed = heard if (k == 1 or rng.random() < 0.5) else int(
      rng.choice([i for i in range(k) if i != heard]))
  qtype, question, answer = make_question(objects, heard, sensed, rng)
  caption = PREFIXES[int(rng.integers(len(PREFIXES)))] + " and ".join(
      f"{o['size']} {describe(o)} at {POSITIONS[o['cell']]}" for o in objects)
  return {
      "image": render(objects, size, options["noise"], rng),
      "caption": caption,
      "audio": tone(objects[heard]["shape"], options, rng),
      "sensor": sensor_stream(objects[sensed]["cell"], options, rng),
      "question": question,
      "answer": ANSWERS.index(answer),
      "question_type": QUESTION_TYPES.index(qtype),
  }


def describe(o) -> str:
  return f"{list(COLORS)[o['color']]} {SHAPES[o['shape']]}"


def make_question(objects: List[dict], heard: int, sensed: int,
                  rng: np.random.Generator) -> Tuple[str, str, str]:
  # Both need two objects to be balanced yes / no questions.
  types = [t for t in QUESTION_TYPES
           if len(objects) > 1 or t not in ("relation", "heard_at_sensed")]
  qtype = types[int(rng.integers(len(types)))]
  o = objects[int(rng.integers(len(objects)))]
  color, shape = list(COLORS)[o["color"]], SHAPES[o["shape"]]
  if qtype == "color":
    return qtype, f"what color is the {shape}?", color
  if qtype == "shape":
    return qtype, f"what shape is the {color} object?", shape
  if qtype == "count":
    which = ("", "large ", "small ")[int(rng.integers(3))]
    n = sum(1 for x in objects if not which or x["size"] == which.strip())
    return qtype, f"how many {which}objects are there?", COUNTS[n]
  if qtype == "position":
    return qtype, f"where is the {color} {shape}?", POSITIONS[o["cell"]]
  if qtype == "relation":
    a, b = rng.choice(len(objects), 2, replace=False)
    a, b = objects[int(a)], objects[int(b)]
    def holds(rel):
      axis, sign = RELATIONS[rel]
      return sign * (divmod(a["cell"], 3)[axis] - divmod(b["cell"], 3)[axis]) > 0
    true = [r for r in RELATIONS if holds(r)]
    false = [r for r in RELATIONS if not holds(r)]
    answer = "yes" if true and rng.random() < 0.5 else "no"
    options = true if answer == "yes" else false
    rel = options[int(rng.integers(len(options)))]
    return qtype, f"is the {describe(a)} {rel} the {describe(b)}?", answer
  h, s = objects[heard], objects[sensed]
  if qtype == "heard_color":
    return qtype, "what color is the shape you hear?", list(COLORS)[h["color"]]
  if qtype == "heard_position":
    return qtype, "where is the shape you hear?", POSITIONS[h["cell"]]
  if qtype == "sensed_shape":
    return qtype, "what shape is at the sensed place?", SHAPES[s["shape"]]
  if qtype == "sensed_color":
    return qtype, "what color is at the sensed place?", list(COLORS)[s["color"]]
  return qtype, "is the shape you hear at the sensed place?", "yes" if heard == sensed else "no"


def render(objects: List[dict], size: int, noise: float,
           rng: np.random.Generator) -> np.ndarray:
  """Anti-aliased shapes (2x supersampled) on a dark noisy background, uint8 [S, S, 3]."""
  ss = 2 * size
  yy, xx = np.mgrid[0:ss, 0:ss].astype(np.float32) + 0.5
  canvas = np.full((ss, ss, 3), 0.1, np.float32)
  cell = ss / 3
  for o in objects:
    row, col = divmod(o["cell"], 3)
    r = cell * (0.28 if o["size"] == "small" else 0.45)
    jitter = (cell / 2 - r) * 0.8
    cy, cx = (row + 0.5) * cell + rng.uniform(-jitter, jitter), (
        col + 0.5) * cell + rng.uniform(-jitter, jitter)
    dy, dx = yy - cy, xx - cx
    shape = SHAPES[o["shape"]]
    if shape == "circle":
      mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
      mask = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    elif shape == "triangle":
      mask = (dy <= 0.8 * r) & (np.abs(dx) <= 0.55 * (dy + r))
    else:  # cross
      mask = ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | (
          (np.abs(dy) <= r / 3) & (np.abs(dx) <= r))
    rgb = np.array(list(COLORS.values())[o["color"]], np.float32) / 255
    rgb = np.clip(rgb + rng.uniform(-0.08, 0.08, 3), 0, 1)
    canvas[mask] = rgb
  image = canvas.reshape(size, 2, size, 2, 3).mean((1, 3))
  image += rng.normal(0, 0.1 * noise, image.shape)
  return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def tone(shape: int, options: Dict[str, Any], rng: np.random.Generator) -> np.ndarray:
  """int16 waveform: a tone naming `shape` under white noise (std `noise` x amplitude)."""
  n = int(options["sample_rate"] * options["audio_seconds"])
  t = np.arange(n, dtype=np.float64) / options["sample_rate"]
  freq = PITCHES_HZ[shape] * rng.uniform(0.98, 1.02)
  envelope = np.minimum(1.0, np.minimum(t, t[-1] - t) * 40)  # 25 ms fade in / out
  wave = 0.4 * envelope * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
  wave += rng.normal(0, 0.4 * options["noise"], n)
  return (np.clip(wave, -1, 1) * 32767).astype(np.int16)


def sensor_stream(cell: int, options: Dict[str, Any], rng: np.random.Generator) -> np.ndarray:
  """float32 [T, 3]: channel 0 at (row + 1) cycles, channel 1 at (column + 1), 2 noise."""
  steps = options["sensor_steps"]
  row, col = divmod(cell, 3)
  t = np.arange(steps) / steps
  phase = rng.uniform(0, 2 * np.pi, 2)
  signal = np.stack([np.sin(2 * np.pi * (row + 1) * t + phase[0]),
                     np.sin(2 * np.pi * (col + 1) * t + phase[1]), np.zeros(steps)], -1)
  return (signal + rng.normal(0, options["noise"], signal.shape)).astype(np.float32)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS.index(split), index])


class ShapesBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS array_record builder for `shapes`; built with a ShapesConfig."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First version.",
                   "1.1.0": "Fix inverted answers of relation questions; bigger shapes."}

  def _info(self):
    o = self.builder_config.options
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(o["image_size"],) * 2 + (3,), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "audio": tfds.features.Tensor(
                shape=(int(o["sample_rate"] * o["audio_seconds"]),), dtype=np.int16),
            "sensor": tfds.features.Tensor(shape=(o["sensor_steps"], 3), dtype=np.float32),
            "question": tfds.features.Text(),
            "answer": tfds.features.ClassLabel(names=ANSWERS),
            "question_type": tfds.features.ClassLabel(names=QUESTION_TYPES),
        }),
        metadata=tfds.core.MetadataDict(options=o))

  def _split_generators(self, dl_manager):
    del dl_manager
    o = self.builder_config.options
    return {split: self._generate_examples(split, o[f"num_{split}"]) for split in SPLITS}

  def _generate_examples(self, split, num):
    options = self.builder_config.options
    for i in range(num):
      yield i, make_scene(options, scene_rng(options["seed"], split, i))


@DATASETS.register("shapes")
class Shapes(dataset_lib.TfdsDataset):
  """The procedural multimodal dataset (see the module docstring)."""

  text_keys = ("caption", "question")
  default_eval_split = "validation"

  @classmethod
  def builder_defaults(cls):
    return {
        "num_train": 20000, "num_validation": 1000, "num_test": 1000,
        "image_size": 32,      # pixels per side of the generated images
        "max_objects": 3,      # 1..9 objects per scene
        "sample_rate": 8000, "audio_seconds": 0.25,
        "sensor_steps": 32,
        "noise": 0.5,          # audio / sensor noise std relative to the signal; image x0.1
        "seed": 0,             # generation seed (the train order seed is separate)
        "vocab_size": 256,     # SentencePiece pieces (upper bound)
    }

  def make_builder(self):
    options = {k: v for k, v in self.options.items() if k != "vocab_size"}
    if not 1 <= options["max_objects"] <= 9:
      raise ConfigError(f"shapes: max_objects must be in [1, 9]; got {options['max_objects']}.")
    if options["image_size"] < 12:
      raise ConfigError(f"shapes: image_size must be >= 12; got {options['image_size']}.")
    digest = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    config = ShapesConfig(name=f"opts_{digest}", description=json.dumps(options),
                          options=options)
    return ShapesBuilder(config=config, data_dir=self.data_dir, file_format="array_record")

  def default_preprocess(self, train: bool) -> str:
    c = self.config
    size = c.get("image_size") or self.options["image_size"]
    resize = f"resize({size})|" if size != self.options["image_size"] else ""
    # Shifts of a few pixels keep every object in its grid cell; flips would not
    # (they change "left" / "right" in the captions and answers).
    crop = f"random_crop({size}, pad=1)|" if train else ""
    return (f"decode|{resize}{crop}normalize|decode('audio')|"
            f"tokenize('caption', 'text', {c.max_text_len})|"
            f"tokenize('question', 'question', {c.max_question_len})|"
            "keep('image', 'text', 'audio', 'sensor', 'question', 'answer', 'question_type')")

  def prepare(self) -> None:
    super().prepare()
    path = os.path.join(os.fspath(self.builder.data_path), "chance.json")
    if not os.path.exists(path):
      chance = chance_levels(self.builder.as_data_source(split="train"),
                             self.builder.as_data_source(split=self.default_eval_split),
                             self.options)
      with open(f"{path}.tmp{os.getpid()}", "w") as f:
        json.dump(chance, f, indent=1, sort_keys=True)
      os.replace(f"{path}.tmp{os.getpid()}", path)

  def info(self) -> Dict[str, Any]:
    self.prepare()
    with open(os.path.join(os.fspath(self.builder.data_path), "chance.json")) as f:
      chance = json.load(f)
    for split, num in self.splits().items():
      chance[f"retrieval_recall_at_1_{split}"] = 1 / max(1, num)
    return {
        "num_answers": len(ANSWERS), "answers": list(ANSWERS),
        "question_types": list(QUESTION_TYPES),
        "modalities_needed": MODALITIES,
        "chance": chance,
        "options": dict(self.options),
    }


def chance_levels(train_source, eval_source, options: Dict[str, Any]) -> Dict[str, Any]:
  """Chance per question type: uniform over its answers, and the question-only baseline.

  The question-only baseline answers each exact question text of the eval split with its
  most frequent train answer (the type's most frequent answer for unseen texts): what a
  model that ignores image, audio and sensor can reach.
  """
  uniform = {"color": 1 / 6, "shape": 1 / 4,
             "count": 1 / (options["max_objects"] + 1), "position": 1 / 9,
             "relation": 1 / 2, "heard_color": 1 / 6, "heard_position": 1 / 9,
             "sensed_shape": 1 / 4, "sensed_color": 1 / 6, "heard_at_sensed": 1 / 2}
  by_question: Dict[bytes, collections.Counter] = collections.defaultdict(collections.Counter)
  by_type: Dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
  for record in train_source:
    by_question[record["question"]][int(record["answer"])] += 1
    by_type[int(record["question_type"])][int(record["answer"])] += 1
  right, total = collections.Counter(), collections.Counter()
  for record in eval_source:
    t = int(record["question_type"])
    prior = by_question.get(record["question"]) or by_type[t]
    right[QUESTION_TYPES[t]] += int(prior.most_common(1)[0][0] == int(record["answer"]))
    total[QUESTION_TYPES[t]] += 1
  return {
      "answer_uniform": uniform,
      "answer_question_only": {t: right[t] / total[t] for t in total},
      "answer_question_only_overall": sum(right.values()) / max(1, sum(total.values())),
  }
