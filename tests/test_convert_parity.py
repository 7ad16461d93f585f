"""Parity of converted weights with the reference PyTorch models (randomly initialised,
tiny, built here: nothing is downloaded).

Hugging Face ViT and CLIP are run by transformers itself. timm cannot be imported next to
a CPU torch without torchvision, and big_vision is JAX code that is not packaged, so their
checkpoints are built from the same HF model through their documented tensor names (timm's
`_load_weights` / big_vision's `vit.py`) and must give the HF model's outputs.

Needs torch and transformers (pip install -e ".[convert]"); skipped without them.
"""
import functools
import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install -e '.[convert]')")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need transformers (pip install -e '.[convert]')")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mmjax.convert import __main__ as cli  # noqa: E402
from mmjax.convert import big_vision, common, export_hf, hf, layout, timm  # noqa: E402
from mmjax.models.base import build_model  # noqa: E402
from mmjax.train.checkpoint import load_params  # noqa: E402

TOL = 1e-4
WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE, CLASSES = 32, 2, 4, 64, 8, 32, 5
# The reference ViTs compute what each source format does: Hub ViTs transformers' defaults
# (exact GELU, LayerNorm epsilon 1e-12), timm exact GELU and 1e-6, big_vision tanh GELU
# and 1e-6.
TIMM = dict(hidden_act="gelu", layer_norm_eps=1e-6)
BIG_VISION = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def _hf_vit(seed, **numerics):
  torch.manual_seed(seed)
  config = transformers.ViTConfig(
      hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH, num_labels=CLASSES,
      **numerics)
  model = transformers.ViTForImageClassification(config).eval()
  _randomize(model)
  return model


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
  model = _hf_vit(0)
  assert (model.config.hidden_act, model.config.layer_norm_eps) == ("gelu", 1e-12)
  path = str(tmp_path_factory.mktemp("hf_vit"))
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def timm_reference():
  return _hf_vit(4, **TIMM)


@pytest.fixture(scope="module")
def big_vision_reference():
  return _hf_vit(5, **BIG_VISION)


def _randomize(model):
  """HF initialises biases / LayerNorms to 0 / 1 and tokens near 0; make every tensor
  matter so a wrong mapping cannot hide."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))


def _images(n=2, size=IMAGE, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _hf_vit_outputs(model, images):
  with torch.no_grad():
    out = model(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def _mmjax_vit_outputs(model_config, params, images):
  """(logits, per-block outputs) of the mmjax ViT."""
  model = build_model(model_config)
  logits, state = jax.jit(functools.partial(
      model.apply, capture_intermediates=True, mutable=["intermediates"]))(
          {"params": params}, jnp.asarray(images))
  captured = common.flatten(state["intermediates"])
  blocks = {int(m.group(1)): v[0] for k, v in captured.items()
            for m in [re.fullmatch(r"encoder/encoderblock_(\d+)/__call__", k)] if m}
  return np.asarray(logits), [np.asarray(blocks[i]) for i in sorted(blocks)]


def _assert_vit_parity(model_config, params, hf_model, images):
  want_logits, want_hidden = _hf_vit_outputs(hf_model, images)
  logits, hidden = _mmjax_vit_outputs(model_config, params, images)
  np.testing.assert_allclose(logits, want_logits, atol=TOL, rtol=0)
  assert len(hidden) == DEPTH
  for got, want in zip(hidden, want_hidden[1:]):
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- HF ViT


def test_hf_vit_logits_and_hidden_states_match(hf_vit):
  model, path = hf_vit
  params, config, report = hf.load(path)
  assert not report.unused and not report.missing
  _assert_vit_parity(config, params, model, _images())


def test_hf_vit_in_memory_v5_names_load_like_hub_names(hf_vit, tmp_path):
  model, _ = hf_vit
  from safetensors.torch import save_file
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert any(".q_proj." in k or ".query." in k for k in state)
  save_file(state, str(tmp_path / "model.safetensors"))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(model.config.to_dict(), f)
  params, config, _ = hf.load(str(tmp_path))
  _assert_vit_parity(config, params, model, _images())


def test_hf_vit_derived_config_computes_hub_gelu_and_epsilon(hf_vit):
  _, path = hf_vit
  _, config, report = hf.load(path)
  assert (config.activation, config.layer_norm_epsilon) == ("gelu", 1e-12)
  assert not any("approximate" in n for n in report.notes)


def test_hf_vit_refuses_activation_mmjax_does_not_compute(hf_vit, tmp_path):
  _, path = hf_vit
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["hidden_act"] = "silu"
  (tmp_path / "config.json").write_text(json.dumps(config))
  os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match="activation 'silu', which mmjax lacks"):
    hf.load(str(tmp_path))
  params, _, report = hf.load(str(tmp_path), allow_approximate=True)
  assert params and any("approximate" in n and "silu" in n for n in report.notes)


def test_hf_vit_refuses_model_config_with_other_numerics(hf_vit):
  _, path = hf_vit
  _, config, _ = hf.load(path)
  config.activation, config.layer_norm_epsilon = "gelu_tanh", 1e-6
  with pytest.raises(ValueError, match=r"activation 'gelu'; the mmjax model computes "
                     r"'gelu_tanh'.*epsilon 1e-12; the mmjax model uses 1e-06"):
    hf.load(path, config)
  params, _, _ = hf.load(path, config, allow_approximate=True)
  assert params


def test_hf_vit_wrong_model_config_is_refused_with_names_and_shapes(hf_vit):
  _, path = hf_vit
  params, config, _ = hf.load(path)
  config.num_classes = CLASSES + 1
  with pytest.raises(common.ConversionError, match=r"head/kernel <- classifier.weight: model "
                     rf"wants \({WIDTH}, {CLASSES + 1}\), checkpoint has \({CLASSES}, {WIDTH}\)"):
    hf.load(path, config)
  # A new head is left out on request (the trainer's init_from initialises it).
  params, _, report = hf.load(path, config, skip=[r"head/.*"], strict=False)
  assert "head" not in params and "classifier.weight" in report.unused


def test_hf_vit_loads_into_scanned_encoder(hf_vit):
  model, path = hf_vit
  _, config, _ = hf.load(path)
  config.scan_layers = True
  params, config, _ = hf.load(path, config)
  assert params["encoder"]["encoderblock"]["mlp"]["fc1"]["kernel"].shape == (DEPTH, WIDTH, MLP)
  logits = build_model(config).apply({"params": params}, jnp.asarray(_images()))
  np.testing.assert_allclose(logits, _hf_vit_outputs(model, _images())[0], atol=TOL, rtol=0)


def test_hf_vit_posemb_resampled_for_larger_images(hf_vit):
  model, path = hf_vit
  params, config, report = hf.load(path, image_size=2 * IMAGE)
  assert any("resampled" in n for n in report.notes)
  model_big = build_model(config)
  logits = model_big.apply({"params": params}, jnp.asarray(_images(size=2 * IMAGE)))
  assert logits.shape == (2, CLASSES) and np.all(np.isfinite(logits))
  grid = common.flatten(params)["pos_embedding"]
  assert grid.shape == (1, 1 + (2 * IMAGE // PATCH) ** 2, WIDTH)
  # The class-token row is kept as is; only the patch grid is interpolated.
  hf_table = model.vit.embeddings.position_embeddings.detach().numpy()
  np.testing.assert_array_equal(grid[0, 0], hf_table[0, 0])


def test_hf_vit_export_round_trip_is_exact_and_hf_agrees(hf_vit, tmp_path):
  model, path = hf_vit
  params, config, _ = hf.load(path)
  export_hf.export(params, config, str(tmp_path / "out"))
  again, again_config, _ = hf.load(str(tmp_path / "out"))
  assert again_config.to_dict() == config.to_dict()
  for name, value in common.flatten(params).items():
    np.testing.assert_array_equal(common.flatten(again)[name], value, err_msg=name)
  reloaded = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
  _assert_vit_parity(config, params, reloaded, _images())


def test_hf_vit_model_pooler_is_mmjax_pre_logits(tmp_path):
  torch.manual_seed(3)
  model = transformers.ViTModel(transformers.ViTConfig(
      hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH)).eval()
  _randomize(model)
  model.save_pretrained(str(tmp_path / "in"))
  params, config, report = hf.load(str(tmp_path / "in"))
  assert config.num_classes == 0 and config.representation_size == WIDTH
  assert not report.unused and not report.missing
  images = _images()
  with torch.no_grad():
    want = model(torch.from_numpy(images).permute(0, 3, 1, 2)).pooler_output.numpy()
  got = build_model(config).apply({"params": params}, jnp.asarray(images))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  export_hf.export(params, config, str(tmp_path / "out"))
  again, _, _ = hf.load(str(tmp_path / "out"))
  for name, value in common.flatten(params).items():
    np.testing.assert_array_equal(common.flatten(again)[name], value, err_msg=name)


# ----------------------------------------------------------------------------- timm


def timm_state_dict(hf_model):
  """timm VisionTransformer names (timm/models/vision_transformer.py) for an HF ViT."""
  sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  sd = hf.normalize_vit(sd)
  out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
         "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
  for i in range(DEPTH):
    h, t = f"encoder.layer.{i}.", f"blocks.{i}."
    for leaf in ("weight", "bias"):
      out[t + f"norm1.{leaf}"] = sd[h + f"layernorm_before.{leaf}"]
      out[t + f"norm2.{leaf}"] = sd[h + f"layernorm_after.{leaf}"]
      out[t + f"attn.qkv.{leaf}"] = np.concatenate(
          [sd[h + f"attention.attention.{n}.{leaf}"] for n in ("query", "key", "value")])
      out[t + f"attn.proj.{leaf}"] = sd[h + f"attention.output.dense.{leaf}"]
      out[t + f"mlp.fc1.{leaf}"] = sd[h + f"intermediate.dense.{leaf}"]
      out[t + f"mlp.fc2.{leaf}"] = sd[h + f"output.dense.{leaf}"]
  return out


def test_timm_state_dict_matches_reference(timm_reference, tmp_path):
  path = str(tmp_path / "vit.pth")
  torch.save({k: torch.from_numpy(v) for k, v in timm_state_dict(timm_reference).items()}, path)
  params, config, report = timm.load(path, num_heads=HEADS)
  assert (config.activation, config.layer_norm_epsilon) == ("gelu", 1e-6)
  assert not report.unused and not report.missing
  # A state dict has no pixel normalisation: the one note says to set it.
  assert len(report.notes) == 1 and "image_normalization" in report.notes[0]
  assert report.image_normalization is None
  _assert_vit_parity(config, params, timm_reference, _images())
  config.activation = "gelu_tanh"   # a model config computing something else is refused
  with pytest.raises(ValueError, match="timm's ViT uses activation 'gelu'"):
    timm.load(path, config)


def test_timm_norm_pre_loads_into_pre_norm(timm_reference, tmp_path):
  sd = timm_state_dict(timm_reference)
  rng = np.random.default_rng(0)
  sd["norm_pre.weight"], sd["norm_pre.bias"] = rng.normal(size=(2, WIDTH)).astype(np.float32)
  path = str(tmp_path / "vit.pth")
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  params, config, report = timm.load(path, num_heads=HEADS)
  assert config.pre_norm and not report.unused and not report.missing
  np.testing.assert_array_equal(params[layout.PRE_NORM]["scale"], sd["norm_pre.weight"])
  np.testing.assert_array_equal(params[layout.PRE_NORM]["bias"], sd["norm_pre.bias"])


def test_timm_refuses_features_mmjax_vit_lacks(timm_reference, tmp_path):
  sd = timm_state_dict(timm_reference)
  sd["blocks.0.ls1.gamma"] = np.ones(WIDTH, np.float32)
  path = str(tmp_path / "vit.pth")
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  with pytest.raises(common.ConversionError, match=r"blocks\.0\.ls1\.gamma"):
    timm.load(path, num_heads=HEADS)


# ----------------------------------------------------------------------------- big_vision


def big_vision_params(hf_model, *, old_format=False, scanned=False):
  """big_vision ViT names (big_vision/models/vit.py, as read by timm's `_load_weights`)."""
  sd = hf.normalize_vit({k: v.numpy() for k, v in hf_model.state_dict().items()})
  hd = WIDTH // HEADS
  pos, cls = sd["embeddings.position_embeddings"], sd["embeddings.cls_token"]
  out = {"embedding/kernel": sd["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["embeddings.patch_embeddings.projection.bias"],
         "Transformer/encoder_norm/scale": sd["layernorm.weight"],
         "Transformer/encoder_norm/bias": sd["layernorm.bias"],
         "head/kernel": sd["classifier.weight"].T, "head/bias": sd["classifier.bias"]}
  if old_format:  # class-token row inside the position table
    out.update({"cls": cls, "Transformer/posembed_input/pos_embedding": pos})
  else:           # big_vision: the class token carries no position
    out.update({"cls": cls + pos[:, :1], "pos_embedding": pos[:, 1:]})
  attn, ln2, mlp = (1, 2, 3) if old_format else (0, 1, 0)
  blocks = []
  for i in range(DEPTH):
    h = f"encoder.layer.{i}."
    a = f"MultiHeadDotProductAttention_{attn}/"
    b = {"LayerNorm_0/scale": sd[h + "layernorm_before.weight"],
         "LayerNorm_0/bias": sd[h + "layernorm_before.bias"],
         f"LayerNorm_{ln2}/scale": sd[h + "layernorm_after.weight"],
         f"LayerNorm_{ln2}/bias": sd[h + "layernorm_after.bias"],
         f"MlpBlock_{mlp}/Dense_0/kernel": sd[h + "intermediate.dense.weight"].T,
         f"MlpBlock_{mlp}/Dense_0/bias": sd[h + "intermediate.dense.bias"],
         f"MlpBlock_{mlp}/Dense_1/kernel": sd[h + "output.dense.weight"].T,
         f"MlpBlock_{mlp}/Dense_1/bias": sd[h + "output.dense.bias"],
         a + "out/kernel": sd[h + "attention.output.dense.weight"].T.reshape(HEADS, hd, WIDTH),
         a + "out/bias": sd[h + "attention.output.dense.bias"]}
    for n in ("query", "key", "value"):
      b[a + f"{n}/kernel"] = sd[h + f"attention.attention.{n}.weight"].T.reshape(WIDTH, HEADS, hd)
      b[a + f"{n}/bias"] = sd[h + f"attention.attention.{n}.bias"].reshape(HEADS, hd)
    blocks.append(b)
  if scanned:
    out.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks])
                for k in blocks[0]})
  else:
    out.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks)
                for k, v in b.items()})
  return {"params/" + k: v for k, v in out.items()}


@pytest.mark.parametrize("old_format,scanned", [(False, False), (False, True), (True, False)])
def test_big_vision_npz_matches_reference(big_vision_reference, tmp_path, old_format, scanned):
  model = big_vision_reference
  path = str(tmp_path / "vit.npz")
  np.savez(path, **big_vision_params(model, old_format=old_format, scanned=scanned))
  params, config, report = big_vision.load(path)
  assert not report.unused and not report.missing
  _assert_vit_parity(config, params, model, _images())


def test_cli_writes_checkpoint_the_trainer_reads(big_vision_reference, tmp_path):
  model = big_vision_reference
  src = str(tmp_path / "vit.npz")
  np.savez(src, **big_vision_params(model))
  dst = str(tmp_path / "converted")
  assert cli.main(["--from", "big_vision", "--src", src, "--dst", dst]) == 0
  config = cli.read_model_config(os.path.join(dst, "model_config.json"))
  params = common.unflatten(load_params(dst))  # as the trainer's init_from reads it
  _assert_vit_parity(config, params, model, _images())
  with pytest.raises(FileExistsError):
    cli.main(["--from", "big_vision", "--src", src, "--dst", dst])
  out = str(tmp_path / "hf_out")
  assert cli.main(["--to", "hf", "--src", dst, "--dst", out]) == 0
  reloaded = transformers.ViTForImageClassification.from_pretrained(out).eval()
  _assert_vit_parity(config, params, reloaded, _images())


# ----------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  torch.manual_seed(1)
  text = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
              intermediate_size=MLP, vocab_size=100, max_position_embeddings=16,
              eos_token_id=2)   # transformers' CLIP defaults: quick GELU, LayerNorm eps 1e-5
  vision = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH)
  model = transformers.CLIPModel(
      transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
  _randomize(model)
  path = str(tmp_path_factory.mktemp("hf_clip"))
  model.save_pretrained(path)
  return model, path


def _texts():
  # Captions end with the largest id (CLIP's end-of-text token); 0 pads.
  return np.array([[98, 5, 17, 33, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                   [98, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 30, 40, 50, 99]], np.int32)


def _clip_outputs(hf_model):
  images, texts = _images(), _texts()
  with torch.no_grad():
    return hf_model(input_ids=torch.from_numpy(texts).long(),
                    pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))


def _clip_config(path):
  with open(os.path.join(path, "config.json")) as f:
    return hf.clip_model_config(json.load(f))


def _assert_clip_parity(config, params, hf_model):
  out = _clip_outputs(hf_model)
  model, variables = build_model(config), {"params": params}
  zimg = np.asarray(jax.jit(functools.partial(model.apply, method="embed_image"))(
      variables, jnp.asarray(_images())))
  ztxt = np.asarray(jax.jit(functools.partial(model.apply, method="embed_text"))(
      variables, jnp.asarray(_texts())))
  np.testing.assert_allclose(zimg, out.image_embeds.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(ztxt, out.text_embeds.numpy(), atol=TOL, rtol=0)
  scale = np.exp(np.asarray(common.flatten(params)[layout.LOGIT_SCALE]))
  np.testing.assert_allclose(scale * zimg @ ztxt.T, out.logits_per_image.numpy(),
                             atol=TOL * scale, rtol=0)


def test_hf_clip_text_tower_embeddings_match(hf_clip):
  model, path = hf_clip
  params, config, report = hf.load(path, skip=[r"img/.*", r"img_proj/.*"])
  assert not report.missing
  assert all(k.startswith(("vision_model.", "visual_projection.")) for k in report.unused)
  ztxt = build_model(config).apply({"params": params}, jnp.asarray(_texts()),
                                   method="embed_text")
  np.testing.assert_allclose(ztxt, _clip_outputs(model).text_embeds.numpy(), atol=TOL, rtol=0)


def test_hf_clip_embeddings_and_logits_match(hf_clip):
  model, path = hf_clip
  params, config, report = hf.load(path)
  assert config.image_pre_norm
  assert (config.activation, config.layer_norm_epsilon) == ("quick_gelu", 1e-5)
  assert not report.unused and not report.missing
  assert not any("approximate" in n for n in report.notes)
  _assert_clip_parity(config, params, model)


def test_hf_clip_text_with_token_id_0_matches(hf_clip):
  """Id 0 is a real token in CLIP ("!"): it must be attended to, not taken for padding."""
  model, path = hf_clip
  params, config, _ = hf.load(path)
  assert config.pad_id is None
  texts = np.array([[98, 0, 17, 0, 33, 99, 0, 0], [98, 7, 0, 0, 0, 0, 0, 99]], np.int32)
  mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8], bool)
  with torch.no_grad():
    want = model.get_text_features(input_ids=torch.from_numpy(texts).long(),
                                   attention_mask=torch.from_numpy(mask).long())
  want = getattr(want, "pooler_output", want).numpy()
  want = want / np.linalg.norm(want, axis=-1, keepdims=True)
  mm = build_model(config)
  for m in (jnp.asarray(mask), None):  # the pipeline's mask, or none (as HF without one)
    got = mm.apply({"params": params}, jnp.asarray(texts), m, method="embed_text")
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  config.pad_id = 0  # the old rule "id 0 is padding" moves the embedding well beyond TOL
  old = build_model(config).apply({"params": params}, jnp.asarray(texts), method="embed_text")
  assert np.max(np.abs(np.asarray(old) - want)) > 100 * TOL


def test_hf_clip_without_pre_norm_is_refused_by_name(hf_clip):
  _, path = hf_clip
  config = _clip_config(path)
  config.image_pre_norm = False
  with pytest.raises(common.ConversionError, match="pre_layrnorm.*image_pre_norm=True"):
    hf.load(path, config)


def test_hf_clip_export_round_trip_is_exact_and_hf_agrees(hf_clip, tmp_path):
  model, path = hf_clip
  params, config, _ = hf.load(path)
  export_hf.export(params, config, str(tmp_path / "out"))
  again, again_config, _ = hf.load(str(tmp_path / "out"))
  assert again_config.to_dict() == config.to_dict()
  flat_again = common.flatten(again)
  assert sorted(flat_again) == sorted(common.flatten(params))
  for name, value in common.flatten(params).items():
    np.testing.assert_array_equal(flat_again[name], value, err_msg=name)
  reloaded = transformers.CLIPModel.from_pretrained(str(tmp_path / "out")).eval()
  _assert_clip_parity(config, params, reloaded)


# ----------------------------------------------------------------------------- SigLIP


@pytest.fixture(scope="module")
def hf_siglip():
  """HF SiglipModel: the reference for big_vision SigLIP (HF converted it from big_vision)."""
  torch.manual_seed(2)
  text = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
              intermediate_size=MLP, vocab_size=100, max_position_embeddings=16,
              projection_size=WIDTH)
  vision = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH)
  model = transformers.SiglipModel(
      transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
  _randomize(model)
  return model


def siglip_big_vision_params(hf_model):
  """big_vision SigLIP names (big_vision/models/proj/image_text/two_towers.py) for an HF
  SiglipModel, following HF's own big_vision -> HF conversion mapping."""
  sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  hd = WIDTH // HEADS

  def block(hf_prefix):
    b = {"LayerNorm_0/scale": sd[hf_prefix + "layer_norm1.weight"],
         "LayerNorm_0/bias": sd[hf_prefix + "layer_norm1.bias"],
         "LayerNorm_1/scale": sd[hf_prefix + "layer_norm2.weight"],
         "LayerNorm_1/bias": sd[hf_prefix + "layer_norm2.bias"],
         "MlpBlock_0/Dense_0/kernel": sd[hf_prefix + "mlp.fc1.weight"].T,
         "MlpBlock_0/Dense_0/bias": sd[hf_prefix + "mlp.fc1.bias"],
         "MlpBlock_0/Dense_1/kernel": sd[hf_prefix + "mlp.fc2.weight"].T,
         "MlpBlock_0/Dense_1/bias": sd[hf_prefix + "mlp.fc2.bias"],
         "MultiHeadDotProductAttention_0/out/kernel":
             sd[hf_prefix + "self_attn.out_proj.weight"].T.reshape(HEADS, hd, WIDTH),
         "MultiHeadDotProductAttention_0/out/bias": sd[hf_prefix + "self_attn.out_proj.bias"]}
    for n, p in (("query", "q"), ("key", "k"), ("value", "v")):
      b[f"MultiHeadDotProductAttention_0/{n}/kernel"] = \
          sd[hf_prefix + f"self_attn.{p}_proj.weight"].T.reshape(WIDTH, HEADS, hd)
      b[f"MultiHeadDotProductAttention_0/{n}/bias"] = \
          sd[hf_prefix + f"self_attn.{p}_proj.bias"].reshape(HEADS, hd)
    return b

  v, t, h = "vision_model.", "text_model.", "vision_model.head."
  out = {"img/embedding/kernel": sd[v + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
         "img/embedding/bias": sd[v + "embeddings.patch_embedding.bias"],
         "img/pos_embedding": sd[v + "embeddings.position_embedding.weight"][None],
         "img/Transformer/encoder_norm/scale": sd[v + "post_layernorm.weight"],
         "img/Transformer/encoder_norm/bias": sd[v + "post_layernorm.bias"],
         "img/MAPHead_0/probe": sd[h + "probe"],
         "img/MAPHead_0/LayerNorm_0/scale": sd[h + "layernorm.weight"],
         "img/MAPHead_0/LayerNorm_0/bias": sd[h + "layernorm.bias"],
         "img/MAPHead_0/MlpBlock_0/Dense_0/kernel": sd[h + "mlp.fc1.weight"].T,
         "img/MAPHead_0/MlpBlock_0/Dense_0/bias": sd[h + "mlp.fc1.bias"],
         "img/MAPHead_0/MlpBlock_0/Dense_1/kernel": sd[h + "mlp.fc2.weight"].T,
         "img/MAPHead_0/MlpBlock_0/Dense_1/bias": sd[h + "mlp.fc2.bias"],
         "img/MAPHead_0/MultiHeadDotProductAttention_0/out/kernel":
             sd[h + "attention.out_proj.weight"].T.reshape(HEADS, hd, WIDTH),
         "img/MAPHead_0/MultiHeadDotProductAttention_0/out/bias": sd[h + "attention.out_proj.bias"],
         "txt/Embed_0/embedding": sd[t + "embeddings.token_embedding.weight"],
         "txt/pos_embedding": sd[t + "embeddings.position_embedding.weight"][None],
         "txt/Encoder_0/encoder_norm/scale": sd[t + "final_layer_norm.weight"],
         "txt/Encoder_0/encoder_norm/bias": sd[t + "final_layer_norm.bias"],
         "txt/head/kernel": sd[t + "head.weight"].T, "txt/head/bias": sd[t + "head.bias"],
         "t": sd["logit_scale"], "b": sd["logit_bias"]}
  for n, w, b in zip(("query", "key", "value"), np.split(sd[h + "attention.in_proj_weight"], 3),
                     np.split(sd[h + "attention.in_proj_bias"], 3)):
    out[f"img/MAPHead_0/MultiHeadDotProductAttention_0/{n}/kernel"] = w.T.reshape(WIDTH, HEADS, hd)
    out[f"img/MAPHead_0/MultiHeadDotProductAttention_0/{n}/bias"] = b.reshape(HEADS, hd)
  for i in range(DEPTH):
    out.update({f"img/Transformer/encoderblock_{i}/{k}": x
                for k, x in block(f"{v}encoder.layers.{i}.").items()})
    out.update({f"txt/Encoder_0/encoderblock_{i}/{k}": x
                for k, x in block(f"{t}encoder.layers.{i}.").items()})
  return {"params/" + k: x for k, x in out.items()}


def test_big_vision_siglip_embeddings_logits_and_loss_match(hf_siglip, tmp_path):
  with torch.no_grad():  # a trained SigLIP's temperature: above CLIP's cap of 100
    hf_siglip.logit_scale.fill_(np.log(118.0))
  path = str(tmp_path / "siglip.npz")
  np.savez(path, **siglip_big_vision_params(hf_siglip))
  params, config, report = big_vision.load(path)
  assert not report.unused and not report.missing
  # SigLIP attends to every token and pools the last one: texts without padding (id 0).
  images, texts = _images(), np.random.default_rng(3).integers(1, 100, (2, 16)).astype(np.int32)
  with torch.no_grad():
    out = hf_siglip(input_ids=torch.from_numpy(texts).long(),
                    pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2), return_loss=True)
  loss, _ = build_model(config).apply({"params": params}, {"image": images, "text": texts},
                                      method="loss")
  np.testing.assert_allclose(loss, out.loss.item(), rtol=TOL)
  model, variables = build_model(config), {"params": params}
  zimg = np.asarray(jax.jit(functools.partial(model.apply, method="embed_image"))(
      variables, jnp.asarray(images)))
  ztxt = np.asarray(jax.jit(functools.partial(model.apply, method="embed_text"))(
      variables, jnp.asarray(texts)))
  np.testing.assert_allclose(zimg, out.image_embeds.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(ztxt, out.text_embeds.numpy(), atol=TOL, rtol=0)
  flat = common.flatten(params)
  scale, bias = np.exp(flat[layout.LOGIT_SCALE]), flat[layout.LOGIT_BIAS]
  np.testing.assert_allclose(scale * zimg @ ztxt.T + bias, out.logits_per_image.numpy(),
                             atol=TOL * scale, rtol=0)
