"""CLIP's byte-level BPE tokenizer, read from the `vocab.json` / `merges.txt` a user points at.

So that an imported CLIP text tower (mmjax.convert) is fed by mmjax's own pipeline with
the ids it was trained on: token-for-token equal to Hugging Face's `CLIPTokenizer` built
from the same two files (tests/test_clip_tokenizer.py). The steps, as CLIP defines them:

  text -> NFC, runs of whitespace -> " ", lower case
       -> pieces: CLIP's regex ('s 't 're 've 'm 'll 'd, runs of letters, single digits,
          runs of other non-space symbols)
       -> each piece's UTF-8 bytes as GPT-2's printable byte characters, "</w>" on the last
       -> BPE merges by rank -> ids; <|startoftext|> ... <|endoftext|> around the result.

Id 0 is a real token in CLIP's vocabulary ("!"), so padding cannot be recognised by id:
`pad_id` is <|endoftext|> (as in Hugging Face's CLIP tokenizer) and the preprocessing op
`tokenize` writes the attention mask next to the ids (batch key `<name>_mask`).
Differences from OpenAI's original tokenizer: no `ftfy` / HTML-unescape pass (Hugging
Face's tokenizer has none either), so mojibake or "&amp;" in raw text are not repaired.
"""
import functools
import json
import os
import unicodedata
from typing import Dict, Iterable, List, Tuple

import numpy as np
import regex

from mmjax.data.tokenizer import Tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_PIECES = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                        r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_SPACES = regex.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def byte_to_char() -> Dict[int, str]:
  """GPT-2's reversible map from the 256 bytes to printable characters (CLIP uses it too)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:  # control / space bytes are moved above 255 so every byte prints
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


class ClipBpeTokenizer(Tokenizer):
  """CLIP's BPE from `vocab.json` and `merges.txt` (paths, or a folder holding both)."""

  def __init__(self, vocab_path: str, merges_path: str):
    for path in (vocab_path, merges_path):
      if not os.path.exists(path):
        raise FileNotFoundError(f"CLIP tokenizer file {path!r} does not exist; expected "
                                "vocab.json and merges.txt (as shipped with a Hugging Face CLIP).")
    self._paths = (vocab_path, merges_path)
    try:
      with open(vocab_path, encoding="utf-8") as f:
        self.vocab: Dict[str, int] = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{vocab_path!r} is not a JSON token -> id map: {e}") from e
    with open(merges_path, encoding="utf-8") as f:
      lines = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#version")]
    self.ranks: Dict[Tuple[str, str], int] = {}
    for i, line in enumerate(lines):
      pair = line.split()
      if len(pair) != 2:
        raise ValueError(f"{merges_path!r} line {i + 1}: expected two symbols, got {line!r}.")
      self.ranks.setdefault(tuple(pair), i)
    for token in (BOS, EOS):
      if token not in self.vocab:
        raise ValueError(f"{vocab_path!r} lacks CLIP's special token {token!r}.")
    self.bos_id, self.eos_id = self.vocab[BOS], self.vocab[EOS]
    self.pad_id = self.eos_id  # as Hugging Face's CLIP; the mask, not the id, marks padding
    self.vocab_size = max(self.vocab.values()) + 1
    self._id_to_token = {i: t for t, i in self.vocab.items()}
    self._bytes = byte_to_char()
    self._unbytes = {c: b for b, c in self._bytes.items()}
    self._cache: Dict[str, List[int]] = {}

  pad_is_token = True  # <|endoftext|> is also the end token: padding needs the mask

  @classmethod
  def from_dir(cls, path: str) -> "ClipBpeTokenizer":
    return cls(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))

  def __getstate__(self):
    return {"paths": self._paths}

  def __setstate__(self, state):
    self.__init__(*state["paths"])

  def _bpe(self, piece: str) -> List[int]:
    if piece in self._cache:
      return self._cache[piece]
    symbols = [self._bytes[b] for b in piece.encode("utf-8")]
    symbols[-1] += "</w>"
    while len(symbols) > 1:
      pairs = [(self.ranks.get(p, np.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
      rank, i = min(pairs)
      if rank == np.inf:
        break
      merged, j, out = symbols[i] + symbols[i + 1], 0, []
      first = (symbols[i], symbols[i + 1])
      while j < len(symbols):  # merge every occurrence of the best pair, left to right
        if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == first:
          out.append(merged)
          j += 2
        else:
          out.append(symbols[j])
          j += 1
      symbols = out
    ids = [self.vocab.get(s, self.eos_id) for s in symbols]  # unknown -> <|endoftext|>
    self._cache[piece] = ids
    return ids

  def encode_text(self, text: str) -> List[int]:
    """Ids of `text` without <|startoftext|> / <|endoftext|> around it."""
    text = _SPACES.sub(" ", unicodedata.normalize("NFC", text)).lower()
    ids = []
    for piece in _PIECES.findall(text):
      if piece in (BOS, EOS):
        ids.append(self.vocab[piece])
      else:
        ids.extend(self._bpe(piece))
    return ids

  def encode(self, text: str) -> List[int]:
    return [self.bos_id] + self.encode_text(text) + [self.eos_id]

  def encode_with_mask(self, text: str, max_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """Truncates the text (not <|endoftext|>) to fit `max_len`, as CLIP does; pads with pad_id."""
    if max_len < 2:
      raise ValueError(f"CLIP token sequences need max_len >= 2 (start and end); got {max_len}.")
    ids = [self.bos_id] + self.encode_text(text)[:max_len - 2] + [self.eos_id]
    out = np.full([max_len], self.pad_id, np.int32)
    out[:len(ids)] = ids
    return out, np.arange(max_len) < len(ids)

  def decode(self, ids: Iterable[int]) -> str:
    text = "".join(self._id_to_token.get(int(i), "") for i in ids
                   if int(i) not in (self.bos_id, self.eos_id))
    words = [bytes(self._unbytes[c] for c in w if c in self._unbytes)
             for w in text.split("</w>")]  # "</w>" ends a word
    return b" ".join(words).decode("utf-8", errors="replace").strip()

  def __repr__(self) -> str:
    return f"ClipBpeTokenizer(vocab_size={self.vocab_size})"
