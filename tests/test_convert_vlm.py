"""Parity of the "vlm" importer / exporter with Hugging Face PaliGemma, Gemma, Llama and
SigLIP (randomly initialised, tiny, built here: nothing is downloaded).

Logits agree within 1e-4 (relative to their scale) in float32 with the prefix-LM mask,
greedy generation agrees token for token, and export -> import is exact.
"""
import functools
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install -e '.[convert]')")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need transformers (pip install -e '.[convert]')")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mmjax.convert import __main__ as cli  # noqa: E402
from mmjax.convert import common, hf_vlm  # noqa: E402
from mmjax.models import vlm as vlm_lib  # noqa: E402
from mmjax.models.base import build_model  # noqa: E402
from mmjax.train.checkpoint import load_params  # noqa: E402

TOL = 1e-4
IMAGE, PATCH = 16, 8                         # 4 image tokens
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
TEXT = dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12)
PROMPT = [[2, 17, 33, 41, 5], [2, 60, 7, 8, 9]]
SUFFIX = [[70, 12, 44], [31, 90, 18]]


def _randomize(model, scale=0.1):
  """HF initialises norms to 0 / 1 and biases to 0; make every tensor matter."""
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))


def _images(n=2):
  return np.random.default_rng(0).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


def _relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.PaliGemmaConfig(
      vision_config=dict(VISION, vision_use_head=False), text_config=dict(model_type="gemma", **TEXT),
      projection_dim=TEXT["hidden_size"], image_token_index=TEXT["vocab_size"] - 1,
      vocab_size=TEXT["vocab_size"])
  model = transformers.PaliGemmaForConditionalGeneration(config).eval()
  _randomize(model, scale=0.5)   # larger weights: generation does not just repeat a token
  path = str(tmp_path_factory.mktemp("paligemma"))
  model.save_pretrained(path)
  return model, path


def _hf_inputs(model, prompt, suffix=()):
  n = (IMAGE // PATCH) ** 2
  ids = [[model.config.image_token_index] * n + list(p) + list(s)
         for p, s in zip(prompt, suffix or [[]] * len(prompt))]
  types = [[0] * (n + len(p)) + [1] * (len(i) - n - len(p)) for p, i in zip(prompt, ids)]
  pixels = torch.from_numpy(_images(len(prompt)).transpose(0, 3, 1, 2))
  return torch.tensor(ids), torch.tensor(types), pixels


def _mmjax_batch(prompt, suffix):
  return {"image": jnp.asarray(_images(len(prompt))), "prefix": jnp.asarray(prompt, jnp.int32),
          "suffix": jnp.asarray(suffix, jnp.int32)}


def _convert(tmp_path, *sources):
  dst = str(tmp_path / "converted")
  assert cli.main(["--from", "hf", "--src", *sources, "--dst", dst]) == 0
  with open(os.path.join(dst, "model_config.json")) as f:
    assert json.load(f)["image_normalization"] == common.HALF_NORMALIZATION  # the data's
  config = cli.read_model_config(os.path.join(dst, "model_config.json"))  # the model's
  return dst, config, {"params": common.unflatten(load_params(dst))}


def test_paligemma_logits_with_prefix_mask_and_greedy_generation(paligemma, tmp_path):
  hf_model, path = paligemma
  dst, config, params = _convert(tmp_path, path)
  assert config.prefix_attention == "full" and config.tie_embeddings
  model = build_model(config)
  batch = _mmjax_batch(PROMPT, [s + [0] for s in SUFFIX])  # the last input is the last token
  ids, types, pixels = _hf_inputs(hf_model, PROMPT, SUFFIX)
  with torch.no_grad():
    want = hf_model(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits.numpy()
  got = jax.jit(functools.partial(model.apply, method="suffix_logits"))(params, batch)
  start = ids.shape[1] - len(SUFFIX[0]) - 1       # the last prompt position
  assert _relative_error(got, want[:, start:]) < TOL
  # Without the prefix-LM mask (HF's plain causal LM) the logits differ: the mask matters.
  with torch.no_grad():
    causal = hf_model(input_ids=ids, pixel_values=pixels).logits.numpy()
  assert _relative_error(causal[:, start:], want[:, start:]) > 100 * TOL

  # Greedy generation, token for token (the prefix computed once into the cache).
  ids, types, pixels = _hf_inputs(hf_model, PROMPT)
  with torch.no_grad():
    out = hf_model.generate(input_ids=ids, pixel_values=pixels, token_type_ids=types,
                            max_new_tokens=8, do_sample=False, eos_token_id=-1,
                            pad_token_id=0)[:, ids.shape[1]:].numpy()
  tokens = jax.jit(functools.partial(model.apply, method="generate_tokens", max_len=8))(
      params, _mmjax_batch(PROMPT, SUFFIX))
  np.testing.assert_array_equal(np.asarray(tokens), out)
  assert len(set(out.ravel().tolist())) > 3, out       # not one repeated token


def test_paligemma_export_round_trip_is_exact_and_loads_in_transformers(paligemma, tmp_path):
  hf_model, path = paligemma
  dst, _, params = _convert(tmp_path, path)
  assert_exact_round_trip(hf_model, dst, params, tmp_path)


def assert_exact_round_trip(hf_model, dst, params, tmp_path):
  """Exports the converted DST: transformers loads `hf_model`'s tensors, and importing
  the export gives `params` bit for bit. Returns (reloaded model, imported config)."""
  exported = str(tmp_path / "exported")
  assert cli.main(["--to", "hf", "--src", dst, "--dst", exported]) == 0
  reloaded = transformers.PaliGemmaForConditionalGeneration.from_pretrained(exported).eval()
  for name, tensor in hf_model.state_dict().items():   # HF sees the same model
    np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), name)
  again, config, _ = hf_vlm.load([exported])
  flat, flat_again = common.flatten(params["params"]), common.flatten(again)
  assert sorted(flat) == sorted(flat_again)
  for name in flat:
    np.testing.assert_array_equal(flat_again[name], flat[name], name)
  return reloaded, config


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_causal_lm_logits(family, tmp_path):
  torch.manual_seed(0)
  cls, cfg = {"gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig),
              "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig)}[family]
  hf_model = cls(cfg(**TEXT)).eval()
  _randomize(hf_model)
  path = str(tmp_path / family)
  hf_model.save_pretrained(path)
  params = hf_vlm.load([path])       # the default vision tower (SigLIP So400m/14, 224 px)
  config = params[1]
  assert config.tie_embeddings == (family == "gemma") and config.embed_scale == (family == "gemma")
  config.encoder = dict(variant=None, width=8, depth=1, mlp_dim=16, num_heads=2, patch_size=8)
  model = build_model(config)
  tokens = jnp.asarray(PROMPT, jnp.int32)
  valid = jnp.ones(tokens.shape, bool)
  mask = vlm_lib.prefix_lm_mask(valid, 0, False)     # a plain causal LM
  positions = vlm_lib.positions_of(valid)
  got = jax.jit(functools.partial(
      model.apply, method=lambda m, t: m.lm(m.lm.embed(t), positions, mask)))(
          {"params": params[0]}, tokens)
  with torch.no_grad():
    want = hf_model(torch.tensor(PROMPT)).logits.numpy()
  assert _relative_error(got, want) < TOL


def test_siglip_vision_tower_and_pairing_with_an_lm(tmp_path):
  torch.manual_seed(0)
  siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).eval()
  _randomize(siglip)
  siglip_path, gemma_path = str(tmp_path / "siglip"), str(tmp_path / "gemma")
  siglip.save_pretrained(siglip_path)
  transformers.GemmaForCausalLM(transformers.GemmaConfig(**TEXT)).save_pretrained(gemma_path)
  dst, config, params = _convert(tmp_path, gemma_path, siglip_path)
  report = open(os.path.join(dst, "conversion_report.txt")).read()
  assert "no source for projection/.*" in report and "attention-pooling head" in report
  assert "projection" not in params["params"] and "lm" in params["params"]
  model = build_model(config)
  encoder = jax.jit(functools.partial(model.apply, method=lambda m, x: m.image_encoder(x)))(
      params, jnp.asarray(_images()))
  with torch.no_grad():
    want = siglip(torch.from_numpy(_images().transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  assert _relative_error(encoder, want) < TOL


def test_unsupported_checkpoints_are_refused(tmp_path):
  with pytest.raises(ValueError, match="attention_bias=True"):
    hf_vlm.lm_fields(dict(TEXT, attention_bias=True), "llama")
  with pytest.raises(ValueError, match="'gemma3' is not supported"):
    hf_vlm.lm_fields(TEXT, "gemma3")
  with pytest.raises(ValueError, match="RoPE variant"):
    hf_vlm.lm_fields(dict(TEXT, rope_parameters=dict(rope_type="llama3", rope_theta=1.0)), "llama")


def test_gemma_sentencepiece_tokenizer_matches_transformers(tmp_path):
  """A user's Gemma-style .model (BPE, byte fallback, no dummy prefix, pad 0 / eos 1 /
  bos 2) gives Hugging Face's GemmaTokenizer ids, and vlm_task lays out PaliGemma's
  [bos] prompt "\\n" | target [eos]."""
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from mmjax.data import preprocess  # pylint: disable=g-import-not-at-top
  from mmjax.data.tokenizer import build_tokenizer  # pylint: disable=g-import-not-at-top
  text = ["a scene with large red circle at top left", "what color is the circle?",
          "answer en where is it\n"] * 20
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text), model_writer=model, vocab_size=320, hard_vocab_limit=False,
      model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True,
      add_dummy_prefix=False, remove_extra_whitespaces=False,
      normalization_rule_name="identity", user_defined_symbols=["\n"], minloglevel=2,
      num_threads=1)
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "GemmaTokenizer"}')
  ours = build_tokenizer(str(tmp_path / "tokenizer.model"))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for s in ["where is the red circle?", "caption en\n", "zebra! 123",
            "answer en what color is the circle?\n"]:
    assert ours.encode(s) == theirs.encode(s, add_special_tokens=False), s
    assert ours.decode(ours.encode(s)) == s
  op = preprocess.build("vlm_task(('vqa',), prefix_len=12, suffix_len=6, eos_id=1, bos_id=2, "
                        "separator='\\n')", preprocess.Context(tokenizer=ours))
  ex = op({"question": b"answer en where is it", "answer": b"top left"}, None)
  prompt = [2] + ours.encode("answer en where is it") + ours.encode("\n")
  np.testing.assert_array_equal(ex["prefix"], prompt + [0] * (12 - len(prompt)))
  target = ours.encode("top left") + [1]
  np.testing.assert_array_equal(ex["suffix"], target + [0] * (6 - len(target)))
  assert ex["task"] == preprocess.VLM_TASKS.index("vqa")
