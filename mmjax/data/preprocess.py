"""Per-example preprocessing ops, named in the config as a big_vision-style string.

    config.data.preprocess = "decode|random_crop(32, pad=2)|normalize(0.5, 0.5)|" \
                             "tokenize('caption', 'text', 24)|keep('image', 'text')"

Each op is `name(args)` with Python literal arguments, ops are separated by `|` and run
left to right on a dict of numpy arrays (one example, no batch axis). Ops are factories
registered in `PP_OPS`; a fork adds one with `@PP_OPS.register("my_op")`.

Randomness: an op gets `rng`, a numpy Generator seeded from (seed, example index, epoch)
by the pipeline, so a resumed run replays exactly the same augmentations; at evaluation
`rng` is None and random ops take their deterministic form (central crop, no flip,
central frames).

Op factory signature: `factory(*args, ctx, **kwargs) -> fn(example, rng) -> example`,
where `ctx` is a `Context` (the tokenizer, ...).
"""
import ast
import dataclasses
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from PIL import Image

from mmjax.errors import ConfigError
from mmjax.registry import Registry

PP_OPS = Registry("preprocessing op")

Example = Dict[str, Any]
Op = Callable[[Example, Optional[np.random.Generator]], Example]


@dataclasses.dataclass
class Context:
  """What ops may need besides the example."""
  tokenizer: Any = None
  answers: Optional[List[str]] = None  # the dataset's answer vocabulary (answer_text)
  # (mean, std) of `normalize` without arguments: config.data.image_normalization, which
  # init_from fills from a converted checkpoint's model_config.json; None: (0.5, 0.5).
  image_normalization: Optional[tuple] = None


def parse(spec: str) -> List[tuple]:
  """'a(1, k=2)|b' -> [('a', (1,), {'k': 2}), ('b', (), {})]; errors name the bad op."""
  ops = []
  for part in filter(None, (p.strip() for p in spec.split("|"))):
    try:
      node = ast.parse(part if "(" in part else part + "()", mode="eval").body
      if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise SyntaxError("not a call")
      args = tuple(ast.literal_eval(a) for a in node.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError) as e:
      raise ConfigError(f"Cannot parse preprocessing op {part!r} in {spec!r}: expected "
                        "name(literal args), e.g. resize(32) or tokenize('caption', 'text', 16).") from e
    ops.append((node.func.id, args, kwargs))
  return ops


def build(spec: str, ctx: Context) -> Op:
  """The composed op for a preprocessing string."""
  fns = []
  for name, args, kwargs in parse(spec):
    try:
      fns.append(PP_OPS.get(name)(*args, ctx=ctx, **kwargs))
    except TypeError as e:
      raise ConfigError(f"Bad arguments for preprocessing op {name}{args}{kwargs}: {e}") from e

  def apply(example: Example, rng: Optional[np.random.Generator]) -> Example:
    example = dict(example)
    for fn in fns:
      example = fn(example, rng)
    return example
  return apply


def _need(example: Example, key: str, op: str):
  if key not in example:
    raise KeyError(f"Preprocessing op {op!r} needs key {key!r}; the example has "
                   f"{sorted(example)}.")
  return example[key]


@PP_OPS.register("decode")
def decode(key: str = "image", *, ctx: Context) -> Op:
  """Image (uint8 [H,W,C], C in {1,3}, or PNG/JPEG bytes) -> float32 [H,W,3] in [0,1].

  Also video uint8 [T,H,W,C] -> float32 in [0, 1] and int16 audio -> float32 in [-1, 1],
  when the key names them.
  """
  del ctx

  def fn(ex, rng):
    del rng
    x = _need(ex, key, "decode")
    if isinstance(x, (bytes, np.bytes_)):
      import io  # pylint: disable=g-import-not-at-top
      x = np.asarray(Image.open(io.BytesIO(x)).convert("RGB"))
    x = np.asarray(x)
    if x.dtype == np.int16:
      ex[key] = x.astype(np.float32) / 32768.0
      return ex
    if x.ndim in (2, 3) and key != "audio" and (x.ndim == 2 or x.shape[-1] == 1):
      x = np.broadcast_to(x.reshape(x.shape[:2] + (1,)), x.shape[:2] + (3,))
    elif x.ndim == 4 and x.shape[-1] == 1:
      x = np.broadcast_to(x, x.shape[:3] + (3,))
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    ex[key] = x.astype(np.float32) / scale
    return ex
  return fn


@PP_OPS.register("resize")
def resize(size, key: str = "image", *, ctx: Context) -> Op:
  """Bilinear resize of float [H,W,C] (or [T,H,W,C]) to `size` (int or (h, w))."""
  del ctx
  h, w = (size, size) if isinstance(size, int) else size

  def one(img):
    if img.shape[:2] == (h, w):
      return img
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32), "F")
                        .resize((w, h), Image.BILINEAR)) for c in range(img.shape[-1])]
    return np.stack(chans, -1)

  def fn(ex, rng):
    del rng
    x = _need(ex, key, "resize")
    ex[key] = np.stack([one(f) for f in x]) if x.ndim == 4 else one(x)
    return ex
  return fn


@PP_OPS.register("random_crop")
def random_crop(size, pad: int = 0, key: str = "image", *, ctx: Context) -> Op:
  """Pads by `pad` (edge) then crops `size` at a random place (centre at evaluation)."""
  del ctx
  h, w = (size, size) if isinstance(size, int) else size

  def fn(ex, rng):
    x = _need(ex, key, "random_crop")
    if pad:
      x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    if x.shape[0] < h or x.shape[1] < w:
      raise ValueError(f"random_crop({size}) of {key!r} with shape {x.shape}: expected an "
                       f"image at least {h}x{w} after padding by {pad}.")
    if rng is None:
      top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
    else:
      top, left = rng.integers(0, x.shape[0] - h + 1), rng.integers(0, x.shape[1] - w + 1)
    ex[key] = x[top:top + h, left:left + w]
    return ex
  return fn


@PP_OPS.register("central_crop")
def central_crop(size, key: str = "image", *, ctx: Context) -> Op:
  crop = random_crop(size, key=key, ctx=ctx)
  return lambda ex, rng: crop(ex, None)


@PP_OPS.register("flip_lr")
def flip_lr(key: str = "image", p: float = 0.5, *, ctx: Context) -> Op:
  """Mirrors left-right with probability p (never at evaluation)."""
  del ctx

  def fn(ex, rng):
    if rng is not None and rng.random() < p:
      ex[key] = _need(ex, key, "flip_lr")[:, ::-1]
    return ex
  return fn


@PP_OPS.register("normalize")
def normalize(mean=None, std=None, key: str = "image", *, ctx: Context) -> Op:
  """(x - mean) / std, per channel when given sequences. Without arguments: the pixel
  normalisation of the weights being trained (`ctx.image_normalization`, e.g. CLIP's
  mean / std), else (0.5, 0.5), which maps [0, 1] pixels to big_vision's [-1, 1]."""
  if (mean is None) != (std is None):
    raise ConfigError(f"normalize: give both mean and std, or neither; given mean={mean}, "
                      f"std={std}.")
  if mean is None:
    mean, std = ctx.image_normalization or (0.5, 0.5)
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def fn(ex, rng):
    del rng
    ex[key] = ((_need(ex, key, "normalize") - mean) / std).astype(np.float32)
    return ex
  return fn


@PP_OPS.register("tokenize")
def tokenize(src: str, dst: Optional[str] = None, max_len: int = 16, *, ctx: Context) -> Op:
  """Text (bytes/str) -> int32 [max_len] ids padded with the tokenizer's pad id.

  When that pad id is also a real token (CLIP's BPE), the attention mask is written too,
  as `<dst>_mask` (bool [max_len]): models then take padding from it, not from the ids.
  """
  if ctx.tokenizer is None:
    raise ConfigError("tokenize needs a tokenizer; set config.data.tokenizer.")
  dst = dst or src

  def fn(ex, rng):
    del rng
    text = _need(ex, src, "tokenize")
    if isinstance(text, (list, tuple, np.ndarray)) and not isinstance(text, (bytes, str)):
      text = text[0]  # e.g. several captions per image: take the first
    if isinstance(text, (bytes, np.bytes_)):
      text = text.decode("utf-8")
    ex[dst], mask = ctx.tokenizer.encode_with_mask(str(text), max_len)
    if ctx.tokenizer.pad_is_token:
      ex[f"{dst}_mask"] = mask
    return ex
  return fn


@PP_OPS.register("pick")
def pick(src: str, dst: Optional[str] = None, *, ctx: Context) -> Op:
  """One entry of a list (e.g. one of an image's captions): drawn at random in training,
  the first at evaluation, so every caption is trained on and evaluation is fixed."""
  del ctx
  dst = dst or src

  def fn(ex, rng):
    values = _need(ex, src, "pick")
    if len(values) == 0:
      raise ValueError(f"pick({src!r}): the list is empty.")
    ex[dst] = values[int(rng.integers(len(values)))] if rng is not None else values[0]
    return ex
  return fn


@PP_OPS.register("answer_text")
def answer_text(max_len: int = 8, src: str = "answer", dst: str = "answer_text", *,
                ctx: Context) -> Op:
  """Answer index -> its text's token ids int32 [max_len] (generative VQA targets)."""
  if ctx.tokenizer is None or not ctx.answers:
    raise ValueError("answer_text needs a tokenizer and a dataset with an answer vocabulary "
                     "(dataset_info()['answers']).")

  def fn(ex, rng):
    del rng
    index = int(_need(ex, src, "answer_text"))
    if not 0 <= index < len(ctx.answers):
      raise ValueError(f"answer_text: {src}={index} is outside the {len(ctx.answers)} answers.")
    ex[dst], mask = ctx.tokenizer.encode_with_mask(ctx.answers[index], max_len)
    if ctx.tokenizer.pad_is_token:
      ex[f"{dst}_mask"] = mask
    return ex
  return fn


@PP_OPS.register("spectrogram")
def spectrogram(frame: int = 256, hop: int = 128, key: str = "audio",
                dst: str = "spectrogram", *, ctx: Context) -> Op:
  """Log-magnitude STFT of a float waveform [N] -> float32 [frames, frame // 2 + 1]."""
  del ctx
  window = np.hanning(frame).astype(np.float32)

  def fn(ex, rng):
    del rng
    x = np.asarray(_need(ex, key, "spectrogram"), np.float32)
    if x.shape[0] < frame:
      x = np.pad(x, (0, frame - x.shape[0]))
    n = 1 + (x.shape[0] - frame) // hop
    frames = np.stack([x[i * hop:i * hop + frame] for i in range(n)]) * window
    ex[dst] = np.log1p(np.abs(np.fft.rfft(frames, axis=-1))).astype(np.float32)
    return ex
  return fn


@PP_OPS.register("sample_frames")
def sample_frames(num_frames: int, stride: int = 1, key: str = "video", *,
                  ctx: Context) -> Op:
  """`num_frames` frames `stride` apart from [T,...]: random start, central at evaluation."""
  del ctx

  def fn(ex, rng):
    x = _need(ex, key, "sample_frames")
    span = (num_frames - 1) * stride + 1
    if x.shape[0] < span:  # short clip: loop it
      x = np.concatenate([x] * (-(-span // x.shape[0])))
    start = (x.shape[0] - span) // 2 if rng is None else rng.integers(0, x.shape[0] - span + 1)
    ex[key] = x[start:start + span:stride]
    return ex
  return fn


@PP_OPS.register("rename")
def rename(src: str, dst: str, *, ctx: Context) -> Op:
  del ctx

  def fn(ex, rng):
    del rng
    ex[dst] = ex.pop(src) if src in ex else _need(ex, src, "rename")
    return ex
  return fn


@PP_OPS.register("astype")
def astype(key: str, dtype: str, *, ctx: Context) -> Op:
  del ctx

  def fn(ex, rng):
    del rng
    ex[key] = np.asarray(_need(ex, key, "astype")).astype(dtype)
    return ex
  return fn


@PP_OPS.register("keep")
def keep(*keys: str, ctx: Context) -> Op:
  """Keeps only `keys` (batch-contract keys), and their `<key>_mask` if tokenize wrote one;
  errors if a key is missing."""
  del ctx

  def fn(ex, rng):
    del rng
    out = {k: _need(ex, k, "keep") for k in keys}
    out.update({f"{k}_mask": ex[f"{k}_mask"] for k in keys if f"{k}_mask" in ex})
    return out
  return fn


# Tasks of a generative VLM example (`task` in the batch is an index into this tuple).
VLM_TASKS = ("caption", "vqa")


@PP_OPS.register("vlm_task")
def vlm_task(tasks=VLM_TASKS, prefix_len: int = 16, suffix_len: int = 24, *,
             eos_id: int, bos_id: Optional[int] = None, separator: str = "",
             caption_prompt: str = "caption", answers: Optional[tuple] = None,
             caption_key: str = "caption", question_key: str = "question",
             answer_key: str = "answer", ctx: Context) -> Op:
  """Raw text -> a generative example: `prefix` (prompt ids), `suffix` (target ids ending
  with `eos_id`), `task` (index into VLM_TASKS), and `prompt_{task}` for every one of
  `tasks` (so that evaluation can generate every task for every example).

  Each example becomes one of `tasks`: "caption" (prompt `caption_prompt`, target the
  caption) or "vqa" (prompt the question, target the answer; an integer answer is looked
  up in `answers`). Training draws the task at random; evaluation picks it from a hash of
  the record's text, so every run scores the same rows. PaliGemma's format is
  `bos_id=2, separator="\\n"`: [bos] prompt "\\n" | target [eos].
  """
  if ctx.tokenizer is None:
    raise ValueError("vlm_task needs a tokenizer; set config.data.tokenizer.")
  unknown = [t for t in tasks if t not in VLM_TASKS]
  if unknown or not tasks:
    raise ValueError(f"vlm_task: tasks {list(tasks)}; expected a non-empty subset of {VLM_TASKS}.")
  import zlib  # pylint: disable=g-import-not-at-top

  def text(ex, key, rng=None):
    value = _need(ex, key, "vlm_task")
    if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (bytes, str)):
      if np.ndim(value):  # several references: a random one in training, else the first
        value = value[int(rng.integers(len(value))) if rng is not None else 0]
      else:
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
      value = value.decode("utf-8")
    if isinstance(value, (int, np.integer)):
      if answers is None:
        raise ValueError(f"vlm_task: {key!r} is an integer ({value}); pass `answers`, the "
                         "answer strings it indexes.")
      value = answers[int(value)]
    return str(value)

  def padded(ids, length):
    out = np.zeros([length], np.int32)
    out[:len(ids)] = ids[:length]
    return out

  def prompt_ids(prompt):
    # The prompt is truncated, never the bos / separator around it.
    head = [bos_id] if bos_id is not None else []
    tail = ctx.tokenizer.encode(separator) if separator else []
    return padded(head + ctx.tokenizer.encode(prompt)[:prefix_len - len(head) - len(tail)]
                  + tail, prefix_len)

  def fn(ex, rng):
    if rng is not None:
      task = tasks[int(rng.integers(len(tasks)))]
    else:
      key = "".join(text(ex, k) for k in (caption_key, question_key) if k in ex)
      task = tasks[zlib.crc32(key.encode("utf-8")) % len(tasks)]
    prompts = {t: prompt_ids(caption_prompt if t == "caption" else text(ex, question_key))
               for t in tasks}
    target = text(ex, caption_key if task == "caption" else answer_key, rng)
    suffix = ctx.tokenizer.encode(target)[:suffix_len - 1] + [eos_id]
    ex["prefix"], ex["suffix"] = prompts[task], padded(suffix, suffix_len)
    ex["task"] = np.int32(VLM_TASKS.index(task))
    ex.update({f"prompt_{t}": ids for t, ids in prompts.items()})
    return ex
  return fn
