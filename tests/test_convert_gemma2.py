"""Parity of the "vlm" LM with Hugging Face Gemma 2 (Gemma2ForCausalLM) and PaliGemma 2
(randomly initialised, tiny, float32, built here: nothing is downloaded).

The sequences are longer than the sliding window and the weights large enough that both
soft-caps bite: the logits test also shows that dropping any Gemma 2 knob (attention or
final soft-cap, window, post-norms, query_pre_attn_scalar) breaks parity by far more
than the tolerance. Greedy generation runs through the key/value cache past the window.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install -e '.[convert]')")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need transformers (pip install -e '.[convert]')")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from mmjax.convert import hf_vlm  # noqa: E402
from mmjax.models import vlm as vlm_lib  # noqa: E402
from mmjax.models.base import build_model  # noqa: E402
from test_convert_vlm import (  # noqa: E402
    IMAGE, TOL, VISION, _convert, _relative_error, assert_exact_round_trip)

# Layers: local, global, local. query_pre_attn_scalar != head_dim so the scale matters.
GEMMA2 = dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=12,
              query_pre_attn_scalar=8, attn_logit_softcapping=3.0,
              final_logit_softcapping=4.0)
TOKENS = [[2, 17, 33, 41, 5, 60, 7, 8, 9, 70, 12, 44, 31, 90],
          [2, 60, 7, 8, 9, 33, 41, 5, 17, 18, 27, 11, 64, 3]]
TINY_ENCODER = dict(variant=None, width=8, depth=1, mlp_dim=16, num_heads=2, patch_size=8)


def _randomize(model, scale=0.3, post_norm_gain=4.0):
  """HF initialises norms to 0 and weights small; make every tensor (and the caps) matter.

  The post-norms get a larger gain: otherwise the tied embedding of the input token
  dominates the residual stream and greedy decoding just repeats it."""
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(scale * torch.randn_like(p))
      if "post_" in name and "layernorm" in name:
        p.add_(post_norm_gain)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
      sliding_window=4, **GEMMA2)).eval()
  _randomize(model)
  path = str(tmp_path_factory.mktemp("gemma2"))
  model.save_pretrained(path)
  params, config, _ = hf_vlm.load([path])
  config.encoder = TINY_ENCODER
  return model, {"params": params}, config


def _lm_logits(config, params, tokens):
  model = build_model(config)
  valid = jnp.ones(tokens.shape, bool)
  mask = vlm_lib.prefix_lm_mask(valid, 0, False)     # a plain causal LM
  return jax.jit(lambda p: model.apply(p, tokens, method=lambda m, t: m.lm(
      m.lm.embed(t), vlm_lib.positions_of(valid), mask)))(params)


def test_gemma2_causal_lm_logits_and_every_knob_matters(gemma2):
  hf_model, params, config = gemma2
  assert (config.post_norms, config.sliding_window, config.sliding_window_pattern,
          config.query_pre_attn_scalar, config.attn_logit_softcapping,
          config.final_logit_softcapping) == (True, 4, 2, 8.0, 3.0, 4.0)
  with torch.no_grad():
    want = hf_model(torch.tensor(TOKENS)).logits.numpy()
  tokens = jnp.asarray(TOKENS, jnp.int32)
  assert _relative_error(_lm_logits(config, params, tokens), want) < TOL
  for knob, off in (("attn_logit_softcapping", None), ("final_logit_softcapping", None),
                    ("sliding_window", None), ("query_pre_attn_scalar", None)):
    ablated = ml_collections.ConfigDict(config.to_dict())
    ablated[knob] = off
    error = _relative_error(_lm_logits(ablated, params, tokens), want)
    assert error > 100 * TOL, (knob, error)
  # Without the post-norms their parameters are left out: the outputs differ as well.
  ablated = ml_collections.ConfigDict(config.to_dict())
  ablated.post_norms = False
  stripped = {"params": {**params["params"], "lm": {
      name: ({k: v for k, v in layer.items() if not k.startswith("post_")}
             if name.startswith("layers_") else layer)
      for name, layer in params["params"]["lm"].items()}}}
  assert _relative_error(_lm_logits(ablated, stripped, tokens), want) > 100 * TOL


def test_gemma2_greedy_generation_with_the_cache_past_the_window(gemma2):
  hf_model, params, config = gemma2
  prompt = [t[:5] for t in TOKENS]
  with torch.no_grad():
    want = hf_model.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False,
                             eos_token_id=-1, pad_token_id=0)[:, 5:].numpy()
  config = ml_collections.ConfigDict(config.to_dict())
  config.prefix_attention, config.eos_id = "causal", -1     # a plain LM, never stopping
  generate = lambda config: jax.jit(lambda p: build_model(config).apply(
      p, jnp.asarray(prompt, jnp.int32), method=lambda m, t: m.generate_after(
          m.lm.embed(t), jnp.ones(t.shape, bool), max_len=8)))(params)
  np.testing.assert_array_equal(np.asarray(generate(config)), want)
  assert len(set(want.ravel().tolist())) > 3, want       # not one repeated token
  config.sliding_window = None                            # the window changes the tokens
  assert not np.array_equal(np.asarray(generate(config)), want)


@pytest.fixture(scope="module")
def paligemma2(tmp_path_factory):
  torch.manual_seed(0)
  text = dict(GEMMA2, model_type="gemma2", sliding_window=10)  # prefix 9 fits, + 8 does not
  config = transformers.PaliGemmaConfig(
      vision_config=dict(VISION, vision_use_head=False), text_config=text,
      projection_dim=GEMMA2["hidden_size"], image_token_index=GEMMA2["vocab_size"] - 1,
      vocab_size=GEMMA2["vocab_size"])
  model = transformers.PaliGemmaForConditionalGeneration(config).eval()
  _randomize(model)
  path = str(tmp_path_factory.mktemp("paligemma2"))
  model.save_pretrained(path)
  return model, path


def test_paligemma2_logits_generation_and_exact_export_round_trip(paligemma2, tmp_path):
  hf_model, path = paligemma2
  dst, config, params = _convert(tmp_path, path)
  assert config.post_norms and config.sliding_window == 10
  model = build_model(config)
  images = np.random.default_rng(0).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
  prompt, suffix = [t[:5] for t in TOKENS], [t[5:13] for t in TOKENS]
  image_ids = [hf_model.config.image_token_index] * 4
  ids = torch.tensor([image_ids + p + s for p, s in zip(prompt, suffix)])
  types = torch.tensor([[0] * 9 + [1] * 8] * 2)
  with torch.no_grad():   # 17 tokens: the suffix's last queries lose the first keys
    want = hf_model(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits.numpy()
  batch = {"image": jnp.asarray(images), "prefix": jnp.asarray(prompt, jnp.int32),
           "suffix": jnp.asarray([s + [0] for s in suffix], jnp.int32)}
  got = jax.jit(lambda p: model.apply(p, batch, method="suffix_logits"))(params)
  assert _relative_error(got, want[:, 8:]) < TOL

  # Greedy generation, token for token, through the cache and past the window.
  ids, types = ids[:, :9], types[:, :9]
  with torch.no_grad():
    out = hf_model.generate(input_ids=ids, pixel_values=pixels, token_type_ids=types,
                            max_new_tokens=8, do_sample=False, eos_token_id=-1,
                            pad_token_id=0)[:, 9:].numpy()
  config.eos_id = -1
  tokens = jax.jit(lambda p: build_model(config).apply(
      p, batch, method="generate_tokens", max_len=8))(params)
  np.testing.assert_array_equal(np.asarray(tokens), out)

  # --to hf writes a PaliGemma 2 that transformers loads as the same model; importing
  # it back gives the same parameters bit for bit.
  reloaded, again_config = assert_exact_round_trip(hf_model, dst, params, tmp_path)
  text = reloaded.config.text_config
  assert (text.model_type, text.sliding_window, text.layer_types) == (
      "gemma2", 10, ["sliding_attention", "full_attention", "sliding_attention"])
  for knob in ("post_norms", "query_pre_attn_scalar", "attn_logit_softcapping",
               "final_logit_softcapping", "sliding_window", "sliding_window_pattern"):
    assert again_config[knob] == config[knob], knob


def test_unsupported_gemma2_configs_are_refused():
  with pytest.raises(ValueError, match="every n-th layer global"):
    hf_vlm.lm_fields(dict(GEMMA2, layer_types=["full_attention", "sliding_attention",
                                               "sliding_attention"]), "gemma2")
  with pytest.raises(ValueError, match="use_bidirectional_attention"):
    hf_vlm.lm_fields(dict(GEMMA2, use_bidirectional_attention=True), "gemma2")
  fields = hf_vlm.lm_fields(dict(GEMMA2, sliding_window=None), "gemma2")
  assert fields["sliding_window"] is None and fields["post_norms"]
