"""Tokenizers and preprocessing ops."""
import io

import numpy as np
import pytest
import sentencepiece as spm

from mmjax.data import preprocess
from mmjax.data import tokenizer as tokenizer_lib


def test_byte_tokenizer_round_trips_and_pads_with_zero():
  tok = tokenizer_lib.build_tokenizer("bytes")
  ids = tok.encode_padded("héllo", 10)
  assert ids.dtype == np.int32 and ids.shape == (10,)
  assert np.all(ids[:6] > 0) and np.all(ids[6:] == 0)
  assert tok.decode(ids) == "héllo" and tok.vocab_size == 257


def test_trained_sentencepiece_is_deterministic_and_reserves_zero(tmp_path):
  text = ["a large red circle at top left", "what color is the square?"] * 20
  paths = [tokenizer_lib.train_sentencepiece(text, str(tmp_path / f"{i}.model"),
                                             vocab_size=64) for i in range(2)]
  assert open(paths[0], "rb").read() == open(paths[1], "rb").read()
  tok = tokenizer_lib.build_tokenizer(paths[0])
  ids = tok.encode("what color is the circle?")
  assert 0 not in ids and tok.decode(ids) == "what color is the circle?"


def test_sentencepiece_trains_where_stderr_has_no_file_descriptor(tmp_path, monkeypatch):
  # As in a notebook: sys.stderr is a Python stream whose fileno() raises.
  monkeypatch.setattr("sys.stderr", io.StringIO())
  path = tokenizer_lib.train_sentencepiece(["a red circle", "a blue square"] * 20,
                                           str(tmp_path / "m.model"), vocab_size=32)
  assert tokenizer_lib.build_tokenizer(path).decode(
      tokenizer_lib.build_tokenizer(path).encode("a red square")) == "a red square"


def test_user_model_without_padding_id_is_shifted(tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["hello world", "hello there"] * 10), model_writer=model,
      vocab_size=20, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
  path = tmp_path / "llama_like.model"
  path.write_bytes(model.getvalue())
  tok = tokenizer_lib.build_tokenizer(str(path))
  raw = spm.SentencePieceProcessor(model_file=str(path))
  assert tok.vocab_size == raw.vocab_size() + 1
  assert tok.encode("hello") == [i + 1 for i in raw.encode("hello")]
  assert tok.decode(tok.encode_padded("hello", 8)) == "hello"


def test_unknown_tokenizer_and_missing_model_are_errors(tmp_path):
  with pytest.raises(ValueError, match="Unknown tokenizer 'wordpiece'"):
    tokenizer_lib.build_tokenizer("wordpiece")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizer_lib.build_tokenizer(str(tmp_path / "none.model"))
  with pytest.raises(ValueError, match="trained at prepare time"):
    tokenizer_lib.build_tokenizer("sentencepiece", None)


def test_preprocess_string_parses_and_rejects_bad_ops():
  assert preprocess.parse("decode|resize(16, key='image')|keep") == [
      ("decode", (), {}), ("resize", (16,), {"key": "image"}), ("keep", (), {})]
  with pytest.raises(ValueError, match="Cannot parse preprocessing op 'resize\\(x\\)'"):
    preprocess.parse("decode|resize(x)")
  with pytest.raises(ValueError, match="Unknown preprocessing op 'rezise'"):
    preprocess.build("rezise(3)", preprocess.Context())


def test_image_ops_shapes_and_eval_determinism():
  ctx = preprocess.Context()
  op = preprocess.build("decode|resize(12)|random_crop(10, pad=1)|flip_lr|normalize(0.5, 0.5)",
                        ctx)
  ex = {"image": np.random.default_rng(0).integers(0, 255, (8, 8, 1), dtype=np.uint8)}
  out = op(ex, np.random.default_rng(1))["image"]
  assert out.shape == (10, 10, 3) and out.dtype == np.float32
  assert -1 <= out.min() and out.max() <= 1
  np.testing.assert_array_equal(op(ex, None)["image"], op(ex, None)["image"])
  np.testing.assert_array_equal(op(ex, np.random.default_rng(1))["image"], out)


def test_audio_and_video_ops():
  ctx = preprocess.Context()
  wave = (np.sin(np.arange(2000) * 2 * np.pi * 1000 / 8000) * 20000).astype(np.int16)
  ex = preprocess.build("decode('audio')|spectrogram(256, 128)", ctx)({"audio": wave}, None)
  assert ex["audio"].dtype == np.float32 and np.abs(ex["audio"]).max() <= 1
  assert ex["spectrogram"].shape == (14, 129)
  assert np.all(np.argmax(ex["spectrogram"], -1) == 32)  # 1 kHz at 8 kHz / 256 points
  video = (np.arange(10)[:, None, None, None] * np.ones((10, 4, 4, 1))).astype(np.uint8)
  op = preprocess.build("sample_frames(4, stride=2)|decode('video')", ctx)
  clip = op({"video": video}, None)["video"]
  assert clip.shape == (4, 4, 4, 3)
  np.testing.assert_allclose(clip[:, 0, 0, 0] * 255, [1, 3, 5, 7])
  random_clip = op({"video": video}, np.random.default_rng(0))["video"]
  assert np.all(np.diff(random_clip[:, 0, 0, 0] * 255) == 2)
