"""Each fusion strategy is what its name says: who depends on whom, and from which layer.

Dependence is tested by perturbation: change the text tokens, and check which image-stream
activations (captured per layer with `capture_intermediates`) change.
"""
import os
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures import example_model_and_batch
from mmjax.models import fusion, heads
from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.transformer import BlockConfig, Mlp
from mmjax.registry import FUSIONS
from test_transformer import numerics_used

B, D, N_IMG, N_TXT = 2, 16, 5, 4
BLOCK = BlockConfig(num_heads=2, mlp_dim=32)


def _inputs(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  tokens = {"image": jax.random.normal(k1, (B, N_IMG, D)),
            "text": jax.random.normal(k2, (B, N_TXT, D))}
  masks = {"image": jnp.ones((B, N_IMG), bool),
           "text": jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)}
  return tokens, masks


def _run(name, **fields):
  """Outputs and per-layer activations for the original and a text-perturbed input."""
  module = FUSIONS.get(name)(num_layers=3, block=BLOCK, **fields)
  tokens, masks = _inputs()
  variables = jax.jit(module.init)(jax.random.key(0), tokens, masks)

  @jax.jit
  def apply(tokens):
    out, state = module.apply(variables, tokens, masks, capture_intermediates=True,
                              mutable=["intermediates"])
    layers = {k: v["__call__"][0] for k, v in state["intermediates"].items() if k != "__call__"}
    return out, layers
  # Random, not constant: LayerNorm would remove a constant shift of every feature.
  noise = jax.random.normal(jax.random.key(9), (B, N_TXT, D))
  perturbed = dict(tokens, text=tokens["text"] + noise)
  return apply(tokens), apply(perturbed), variables


def _same(a, b):
  return bool(jnp.allclose(a, b, atol=1e-6))


def test_late_image_stream_ignores_text_until_the_combination_on_top():
  (out, layers), (out_p, layers_p), _ = _run("late")
  for i in range(3):
    assert _same(layers[f"image_block{i}"], layers_p[f"image_block{i}"])
  assert _same(out["image"], out_p["image"])
  assert not _same(out["text"], out_p["text"])
  combine = heads.Combine("gate")
  pooled = lambda o: [o["image"].mean(1), o["text"].mean(1)]
  variables = jax.jit(combine.init)(jax.random.key(1), pooled(out))
  top = jax.jit(lambda o: combine.apply(variables, pooled(o)))
  assert not _same(top(out), top(out_p))


def test_hybrid_streams_are_separate_below_fusion_layer_and_joint_above():
  (out, layers), (out_p, layers_p), _ = _run("hybrid", fusion_layer=2)
  for i in range(2):
    assert _same(layers[f"image_block{i}"], layers_p[f"image_block{i}"])
  joint, joint_p = layers["joint_block2"], layers_p["joint_block2"]
  assert not _same(joint[:, :N_IMG], joint_p[:, :N_IMG])     # image tokens now see text
  assert not _same(out["image"], out_p["image"])


def test_early_fusion_depends_on_the_other_modality_from_the_first_layer():
  (out, layers), (_, layers_p), _ = _run("early")
  assert not _same(layers["joint_block0"][:, :N_IMG], layers_p["joint_block0"][:, :N_IMG])
  assert set(out) == {"image", "text"} and out["image"].shape == (B, N_IMG, D)
  assert not any(k.startswith("image_") for k in layers)


def test_hybrid_fusion_layer_extremes_are_early_and_late():
  tokens, masks = _inputs()
  structure = lambda name, **f: jax.tree.structure(jax.eval_shape(
      FUSIONS.get(name)(num_layers=3, block=BLOCK, **f).init,
      jax.random.key(0), tokens, masks))
  assert structure("hybrid", fusion_layer=0) == structure("early")
  assert structure("hybrid", fusion_layer=3) == structure("late")
  assert structure("hybrid", fusion_layer=3) != structure("hybrid", fusion_layer=2)


def test_bottleneck_is_the_only_path_between_modalities():
  (out, layers), (out_p, layers_p), _ = _run("bottleneck", fusion_layer=1, num_bottlenecks=2)
  assert _same(layers["image_block0"], layers_p["image_block0"])
  # Layer 1 reads the initial (learned) bottlenecks: image tokens are still text-free;
  # its bottleneck outputs carry text into layer 2.
  assert _same(layers["image_block1"][:, :N_IMG], layers_p["image_block1"][:, :N_IMG])
  assert not _same(layers["image_block2"][:, :N_IMG], layers_p["image_block2"][:, :N_IMG])
  assert not _same(out["image"], out_p["image"])
  # Zero bottleneck tokens: the dependence disappears.
  (out, _), (out_p, _), _ = _run("bottleneck", fusion_layer=1, num_bottlenecks=0)
  assert _same(out["image"], out_p["image"])


def test_cross_attention_streams_exchange_only_from_fusion_layer():
  (out, layers), (out_p, layers_p), variables = _run("cross", fusion_layer=1)
  assert _same(layers["image_block0"], layers_p["image_block0"])
  assert not _same(layers["image_cross_block1"], layers_p["image_cross_block1"])
  assert not _same(out["image"], out_p["image"])
  assert "cross_attention" in variables["params"]["image_cross_block1"]


def test_shared_weights_use_one_set_of_per_modality_layers():
  tokens, masks = _inputs()
  params = lambda name, **f: jax.eval_shape(
      FUSIONS.get(name)(num_layers=3, block=BLOCK, **fusion.fields_for(name, f)).init,
      jax.random.key(0), tokens, masks)["params"]
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  for name in ("late", "bottleneck", "cross"):
    separate, shared = params(name, fusion_layer=1), params(name, fusion_layer=1,
                                                           shared_weights=True)
    assert "block0" in shared and "image_block0" not in shared, name
    assert count(shared) < count(separate), name


@pytest.mark.parametrize("weights", ["head", "query"])
def test_fusion_in_transformer_weights_are_convex_per_head(weights):
  module = FUSIONS.get("fusion_in_transformer")(num_layers=2, block=BLOCK, fit_weights=weights)
  tokens, masks = _inputs()
  masks["text"] = masks["text"].at[1].set(False)           # example 1 has no text at all
  variables = jax.jit(module.init)(jax.random.key(0), tokens, masks)
  # Move the mixing parameters away from their uniform initialisation.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: x + jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if "weight_" in jax.tree_util.keystr(p) or "gate" in jax.tree_util.keystr(p) else x,
      variables)
  _, state = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))(
      variables, tokens, masks)
  for w in jax.tree.leaves(state["intermediates"]):
    assert w.shape == (B, N_IMG + N_TXT, 2, 2)               # [B, T, heads, modalities]
    assert bool(jnp.all(w >= 0))
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(w[1, :, :, 1], 0.0)        # absent modality: weight 0
    assert not _same(w[0, :, 0], w[0, :, 1])                 # heads mix differently
    if weights == "head":
      assert _same(w[0], jnp.broadcast_to(w[0, :1], w[0].shape))
    else:
      assert not _same(w[0, 0], w[0, 1])                    # computed from each query


def test_fusion_in_transformer_with_one_modality_is_ordinary_attention():
  x = jax.random.normal(jax.random.key(0), (B, 6, D))
  mask = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)
  fit = fusion.FusionInTransformerAttention(BlockConfig(num_heads=4, mlp_dim=1), (("image", 6),),
                                            weights="query")
  variables = jax.jit(fit.init)(jax.random.key(1), x, mask[:, None, None, :])
  got = jax.jit(fit.apply)(variables, x, mask[:, None, None, :])
  mha = MultiHeadAttention(num_heads=4)
  params = {k: v for k, v in variables["params"].items() if not k.startswith("gate")}
  want = jax.jit(mha.apply)({"params": params}, x, mask=mask[:, None, None, :])
  np.testing.assert_array_equal(got, want)


def test_fusion_rejects_bad_streams_and_layers():
  tokens, masks = _inputs()
  module = FUSIONS.get("hybrid")(num_layers=2, block=BLOCK, fusion_layer=3)
  with pytest.raises(ValueError, match=r"fusion_layer must be in \[0, num_layers=2\]"):
    module.init(jax.random.key(0), tokens, masks)
  module = FUSIONS.get("early")(num_layers=1, block=BLOCK)
  bad = dict(tokens, text=tokens["text"][:1])
  with pytest.raises(ValueError, match=r"\[batch=2, tokens, width=16\]"):
    module.init(jax.random.key(0), bad, {"image": masks["image"], "text": masks["text"][:1]})
  with pytest.raises(ValueError, match="needs a mask for every modality"):
    module.init(jax.random.key(0), tokens, {"image": masks["image"]})
  with pytest.raises(ValueError, match="Unknown fusion strategy 'nope'"):
    FUSIONS.get("nope")
  assert set(FUSIONS.names()) >= {"early", "late", "hybrid", "bottleneck", "cross",
                                  "fusion_in_transformer"}


@pytest.mark.parametrize("name, field, value", [
    ("early", "fusion_layer", 1), ("late", "fusion_layer", 2),
    ("fusion_in_transformer", "fusion_layer", 1),
    ("fusion_in_transformer", "shared_weights", False),
    ("early", "shared_weights", True), ("hybrid", "num_bottlenecks", 4),
    ("cross", "fit_weights", "query")])
def test_a_strategy_refuses_a_field_it_does_not_use(name, field, value):
  uses = ", ".join(FUSIONS.get(name).uses) or "none of"
  with pytest.raises(ValueError, match=rf"fusion '{name}' does not use {field} \(given "
                                       rf"{value!r}\); it uses {uses}.*Leave {field} unset"):
    FUSIONS.get(name)(num_layers=2, block=BLOCK, **{field: value})
  every = dict(fusion_layer=1, num_bottlenecks=2, shared_weights=True, fit_weights="query")
  FUSIONS.get(name)(num_layers=2, block=BLOCK, **fusion.fields_for(name, every))  # accepted


BUILT_IN = ("early", "late", "hybrid", "bottleneck", "cross", "fusion_in_transformer")


@pytest.mark.parametrize("name", BUILT_IN)
def test_block_settings_reach_every_block_of_every_fusion_and_the_decoder(name):
  """The multimodal model's activation, LayerNorm epsilon, param dtype and key/value heads
  reach every fusion layer (co-attention and fusion-in-transformer ones included), the
  final norms and the caption decoder."""
  settings = dict(activation="quick_gelu", layer_norm_epsilon=1e-5, param_dtype="bfloat16",
                  num_kv_heads=1)
  model, batch = example_model_and_batch(
      fusion=name, modalities=("image", "question"), loss_weights={"vqa": 1.0, "caption": 1.0},
      width=16, num_layers=2, num_heads=2, mlp_dim=32, decoder_layers=1, **settings,
      **fusion.fields_for(name, dict(fusion_layer=1)))
  under = [("fusion_encoder",), ("caption_decoder",)]
  init = lambda: nn.meta.unbox(model.init(jax.random.key(0), batch, method="loss"))
  epsilons, activations = numerics_used(init, under)
  params = jax.eval_shape(init)["params"]
  assert set(epsilons) == {1e-5} and len(epsilons) >= 7   # 2 layers x 2 + final + decoder
  assert set(activations) == {"quick_gelu"} and len(activations) >= 3
  blocks = {"fusion": params["fusion_encoder"], "decoder": params["caption_decoder"]["decoder"]}
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(blocks)}
  assert {str(x.dtype) for x in flat.values()} == {"bfloat16"}
  keys = [x.shape for p, x in flat.items() if p.endswith("['key']['kernel']")]
  assert keys and all(shape == (16, 1, 8) for shape in keys)   # [embed, kv heads, head_dim]


def test_a_config_switches_strategy_by_unsetting_the_fields_it_set():
  """configs/mbt_audiovisual.py sets fusion_layer and num_bottlenecks; `=None` on the
  command line unsets them (config_flags alone cannot), so another strategy accepts it."""
  import os  # pylint: disable=g-import-not-at-top
  from mmjax import cli  # pylint: disable=g-import-not-at-top
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "mbt_audiovisual.py")
  overrides = {"model.fusion": "early", "model.fusion_layer": "None",
               "model.num_bottlenecks": "None"}
  new = cli.check_overrides(["x", f"--config={path}"] + [f"--config.{k}={v}"
                                                         for k, v in overrides.items()])
  assert new == {k: v for k, v in overrides.items() if k != "model.fusion"}
  config = config_lib.load_config_file(path)
  with pytest.raises(ValueError, match="fusion 'early' does not use fusion_layer"):
    FUSIONS.get("early")(num_layers=2, block=BLOCK, fusion_layer=config.model.fusion_layer)
  config.model.fusion = "early"
  config_lib.apply_overrides(config, new, parse=True)
  m = config.model
  assert m.fusion_layer is None and m.num_bottlenecks is None
  FUSIONS.get(m.fusion)(num_layers=2, block=BLOCK, fusion_layer=m.fusion_layer,
                        num_bottlenecks=m.num_bottlenecks)


def test_config_check_refuses_a_field_the_strategy_ignores_before_any_data(tmp_path):
  """`mmjax.main` checks this with the config, before data or workdir exist."""
  from mmjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "mbt_audiovisual.py"))
  config.model.fusion = "early"  # mbt sets fusion_layer=8 and num_bottlenecks=4
  with pytest.raises(ConfigError, match=r"'early' does not use fusion_layer \(given 8\).*"
                                        r"--config.model.fusion_layer=None"):
    config_lib.validate(config, 1, 1)
  config.model.fusion_layer = config.model.num_bottlenecks = None
  config_lib.validate(config, 1, 1)
