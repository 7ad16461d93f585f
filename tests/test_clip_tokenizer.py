"""CLIP BPE tokenizer: token-for-token equal to Hugging Face's CLIPTokenizer on the same files,
and padding that never relies on id 0 (CLIP's "!")."""
import collections
import json

import numpy as np
import pytest

from mmjax.data import preprocess, tokenizer as tokenizer_lib
from mmjax.data.clip_tokenizer import BOS, EOS, ClipBpeTokenizer, byte_to_char

transformers = pytest.importorskip("transformers")

CORPUS = ["a photo of a dog.", "a photo of a cat!", "two dogs playing in the snow",
          "a black and white photo of the big dog", "the cat's toy isn't here",
          "photos of 12 cats, 3 dogs", "naïve café photo"] * 3
TEXTS = ["A photo of a dog!", "Two  DOGS\tplaying... in the snow!!", "the cat's toy isn't here",
         "photo 2024: 12 cats & 3 dogs", "naïve café ☺ zebra", "!!!", "",
         "<|startoftext|>a dog<|endoftext|>", "photographs of dogs' toys"]


def _learn_merges(corpus, num_merges=60):
  """A tiny BPE vocabulary learned the CLIP way: byte characters, "</w>" on word ends."""
  chars = byte_to_char()
  words = collections.Counter()
  for line in corpus:
    for w in line.lower().split():
      symbols = [chars[b] for b in w.encode("utf-8")]
      symbols[-1] += "</w>"
      words[tuple(symbols)] += 1
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for w, n in words.items():
      for p in zip(w, w[1:]):
        pairs[p] += n
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    new_words = collections.Counter()
    for w, n in words.items():
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      new_words[tuple(out)] += n
    words = new_words
  # CLIP's layout: 256 byte characters (id 0 = "!"), the same with "</w>", merges, specials.
  vocab = [chars[b] for b in sorted(chars, key=lambda b: ord(chars[b]) if b in range(33, 127)
                                    else 1000 + ord(chars[b]))]
  vocab = list(dict.fromkeys(vocab))
  vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [BOS, EOS]
  return {t: i for i, t in enumerate(dict.fromkeys(vocab))}, merges


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip_vocab")
  vocab, merges = _learn_merges(CORPUS)
  assert vocab["!"] == 0
  (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges)
                                   + "\n", encoding="utf-8")
  return path


def test_ids_equal_hugging_face_clip_tokenizer(clip_files):
  ours = tokenizer_lib.build_tokenizer(str(clip_files))
  hf = transformers.CLIPTokenizer(vocab=str(clip_files / "vocab.json"),
                                  merges=str(clip_files / "merges.txt"))
  for text in TEXTS:
    assert ours.encode(text) == hf(text)["input_ids"], text
  # Merges are exercised (some pieces longer than one byte) and "!" is id 0.
  assert any(len(hf.convert_ids_to_tokens(i)) > 5 for i in ours.encode(TEXTS[0]))
  assert 0 in ours.encode("wow!!")  # "!" inside a piece ("!!" -> "!", "!</w>")
  assert ours.decode(ours.encode("a photo of a dog")) == "a photo of a dog"


def test_padding_and_truncation_equal_hugging_face(clip_files):
  ours = ClipBpeTokenizer.from_dir(str(clip_files))
  hf = transformers.CLIPTokenizer(vocab=str(clip_files / "vocab.json"),
                                  merges=str(clip_files / "merges.txt"))
  for text in TEXTS:
    want = hf(text, padding="max_length", truncation=True, max_length=8)
    ids, mask = ours.encode_with_mask(text, 8)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"], bool))


def test_tokenize_op_writes_the_mask_and_keep_carries_it(clip_files):
  tok = ClipBpeTokenizer.from_dir(str(clip_files))
  op = preprocess.build("tokenize('caption', 'text', 8)|keep('text')",
                        preprocess.Context(tokenizer=tok))
  ex = op({"caption": b"a dog!!", "other": 1}, None)
  assert sorted(ex) == ["text", "text_mask"]
  assert 0 in ex["text"][ex["text_mask"]]             # "!" (id 0) is a real token here
  assert not ex["text_mask"][-1] and ex["text"][-1] == tok.pad_id


def test_bad_vocabulary_files_are_named(tmp_path):
  (tmp_path / "vocab.json").write_text("{not json")
  (tmp_path / "merges.txt").write_text("a b\n")
  with pytest.raises(ValueError, match="vocab.json"):
    ClipBpeTokenizer.from_dir(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    ClipBpeTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "nope" / "merges.txt"))
