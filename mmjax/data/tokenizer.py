"""Text tokenizers: strings -> int32 token ids, padded with each tokenizer's `pad_id`.

Four kinds, chosen by `config.data.tokenizer`:

  "sentencepiece"   a SentencePiece model trained at prepare time on the dataset's own
                    text and stored next to it (`<dataset dir>/spm_<vocab>.model`);
  "bytes"           UTF-8 bytes shifted by one (byte b -> id b + 1), no file needed;
  "/path/x.model"   any SentencePiece model file (T5, mT5, Gemma vocabularies, ...);
  "/path/clip/"     a folder with CLIP's `vocab.json` and `merges.txt` (or the path of
                    that vocab.json): CLIP's byte-level BPE (clip_tokenizer.py).

Padding: these SentencePiece / byte tokenizers pad with id 0, which is no token of theirs.
Where the padding id is also a real token (CLIP: id 0 is "!", and it pads with
<|endoftext|>), `pad_is_token` is True and the attention mask (`encode_with_mask`, batch
key `<name>_mask`) is what marks padding, never the id.

A user model whose padding id is not 0 (e.g. LLaMA's, which has none) is shifted by one
so that id 0 stays free for padding; `vocab_size` accounts for the shift.

Tokenizers are plain picklable objects, so grain worker processes can carry them.
"""
import abc
import io
import os
from typing import Iterable, List, Optional, Tuple

import numpy as np
import sentencepiece as spm


class Tokenizer(abc.ABC):
  """Interface: `encode` a string to ids (no padding), `vocab_size`, `pad_id`."""

  pad_id = 0
  pad_is_token = False  # True: pad_id is also a real token, only the mask marks padding
  vocab_size: int

  @abc.abstractmethod
  def encode(self, text: str) -> List[int]:
    ...

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    ...

  def encode_with_mask(self, text: str, max_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """(int32 [max_len] ids truncated and padded with `pad_id`, bool [max_len] mask)."""
    ids = self.encode(text)[:max_len]
    out = np.full([max_len], self.pad_id, np.int32)
    out[:len(ids)] = ids
    return out, np.arange(max_len) < len(ids)

  def encode_padded(self, text: str, max_len: int) -> np.ndarray:
    """int32 [max_len] ids, truncated to `max_len` and padded with `pad_id`."""
    return self.encode_with_mask(text, max_len)[0]


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes, id = byte + 1; the fallback that needs no vocabulary file."""

  vocab_size = 257

  def encode(self, text: str) -> List[int]:
    return [b + 1 for b in text.encode("utf-8")]

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) - 1 for i in ids if i > 0).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model, from a file path or the serialized model bytes."""

  def __init__(self, model: str | bytes, *, add_eos: bool = False):
    if isinstance(model, str):
      if not os.path.exists(model):
        raise FileNotFoundError(f"SentencePiece model file {model!r} does not exist.")
      with open(model, "rb") as f:
        model = f.read()
    self._proto = model
    self._add_eos = add_eos
    self._load()

  def _load(self):
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    # Id 0 must be padding; models with another (or no) padding id are shifted by one.
    self._shift = 0 if self._sp.pad_id() == 0 else 1
    self.vocab_size = self._sp.vocab_size() + self._shift

  def __getstate__(self):
    return {"proto": self._proto, "add_eos": self._add_eos}

  def __setstate__(self, state):
    self._proto, self._add_eos = state["proto"], state["add_eos"]
    self._load()

  def encode(self, text: str) -> List[int]:
    ids = self._sp.encode(text)
    if self._add_eos and self._sp.eos_id() >= 0:
      ids.append(self._sp.eos_id())
    return [i + self._shift for i in ids]

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) - self._shift for i in ids if i > 0])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"


def train_sentencepiece(sentences: Iterable[str], path: str, *, vocab_size: int) -> str:
  """Trains a unigram SentencePiece model (pad=0, unk=1) on `sentences`, writes `path`.

  Deterministic for the same sentences (one thread). `vocab_size` is an upper bound:
  a small closed vocabulary (as in procedural datasets) gives fewer pieces.
  """
  model = io.BytesIO()
  # minloglevel quiets the trainer; its `logstream` redirect needs sys.stderr.fileno(),
  # which notebooks and captured test output do not have.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(sentences)), model_writer=model,
      vocab_size=vocab_size, hard_vocab_limit=False, model_type="unigram",
      pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, num_threads=1,
      character_coverage=1.0, minloglevel=2)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, path)  # atomic: concurrent preparers never see half a file
  return path


def build_tokenizer(spec: str, spm_path: Optional[str] = None) -> Tokenizer:
  """Tokenizer from `config.data.tokenizer` ("sentencepiece", "bytes", a .model path or a
  CLIP vocabulary folder / vocab.json path).

  `spm_path` is the dataset's prepare-time SentencePiece model, used for "sentencepiece".
  """
  if spec == "bytes":
    return ByteTokenizer()
  if spec == "sentencepiece":
    if spm_path is None or not os.path.exists(spm_path):
      raise ValueError(
          "tokenizer='sentencepiece' expects a model trained at prepare time "
          f"(got {spm_path!r}), but this dataset has none; use tokenizer='bytes' or a "
          ".model path.")
    return SentencePieceTokenizer(spm_path)
  path = os.path.expanduser(spec)
  if os.path.isdir(path) or path.endswith("vocab.json"):
    from mmjax.data.clip_tokenizer import ClipBpeTokenizer  # pylint: disable=g-import-not-at-top
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return ClipBpeTokenizer(os.path.join(folder, "vocab.json"),
                            os.path.join(folder, "merges.txt"))
  if spec.endswith(".model") or os.path.exists(path):
    return SentencePieceTokenizer(path)
  raise ValueError(
      f"Unknown tokenizer {spec!r}; expected 'sentencepiece', 'bytes', a path to a "
      "SentencePiece .model file, or a folder with CLIP's vocab.json and merges.txt.")
