"""The multimodal model: every fusion strategy and objective jit-compiles and trains one
step with finite gradients; evaluate/summarize follow the trainer contract; bad input
raises errors that name what was expected."""
import functools
from typing import Dict

import flax.linen as nn
import jax
import numpy as np
import pytest

from fixtures import example_model_and_batch
from mmjax.models import fusion, multimodal, two_tower
from mmjax.models.base import build_model
from mmjax.registry import FUSIONS, MODELS

TINY = dict(width=32, num_layers=2, num_heads=2, mlp_dim=64, vocab_size=40, max_text_len=8)
FUSION_FIELDS = dict(fusion_layer=1, num_bottlenecks=2)  # where a strategy uses them


def _train_step(model, batch):
  """jit(init), then one jitted SGD step; returns (loss, logged metrics, grads, new params)."""
  variables = jax.jit(functools.partial(model.init, train=False, method="loss"))(
      jax.random.key(0), batch)
  params = nn.meta.unbox(variables["params"])
  rngs = {"dropout": jax.random.key(1), "sample": jax.random.key(2)}

  @jax.jit
  def step(params):
    loss_fn = lambda p: model.apply({"params": p}, batch, train=True, method="loss", rngs=rngs)
    (loss, logged), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logged, grads, jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)
  return step(params)


def _check_trains(model, batch, every_parameter=True):
  # numpy from here on: an eager jnp op per leaf would compile a kernel per shape.
  loss, logged, grads, new_params = jax.device_get(_train_step(model, batch))
  assert np.isfinite(loss) and all(np.isfinite(v) for v in logged.values())
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(new_params))
  if every_parameter:
    silent = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
              if not np.any(g != 0)]
    assert not silent, f"parameters without gradient: {silent}"
  return logged


@pytest.mark.parametrize("name", sorted(FUSIONS.names()))
def test_every_fusion_jit_compiles_with_finite_gradients_for_every_parameter(name):
  # VQA alone (one pass through the fusion); a random head lets gradients reach every
  # parameter on the first step.
  model, batch = example_model_and_batch(
      fusion=name, modalities=("image", "question"), loss_weights={"vqa": 1.0},
      head_zeroinit=False, **TINY, **fusion.fields_for(name, FUSION_FIELDS))
  logged = _check_trains(model, batch)
  assert {"vqa_loss", "vqa_accuracy"} <= set(logged)


def test_every_objective_has_finite_loss_and_gradients_with_audio_sigmoid_loss_and_gate():
  model, batch = example_model_and_batch(
      fusion="early", modalities=("image", "question", "audio"), contrastive_loss="sigmoid",
      combine="gate", loss_weights={"itc": 1.0, "vqa": 0.5, "classify": 0.5, "itm": 1.0,
                                    "mlm": 1.0, "caption": 1.0},
      num_classes=10, **dict(TINY, num_layers=1))
  logged = _check_trains(model, batch, every_parameter=False)
  assert {"itm_loss", "mlm_loss", "caption_loss", "classify_accuracy"} <= set(logged)
  # The gate weighs the model's three modalities; ITM's (image, text) pair has its own.
  params = jax.eval_shape(functools.partial(model.init, train=False, method="loss"),
                          jax.random.key(0), batch)["params"]
  assert nn.meta.unbox(params["combiner"]["gate"]["kernel"]).shape == (3 * 32, 3)
  assert nn.meta.unbox(params["itm_combiner"]["gate"]["kernel"]).shape == (2 * 32, 2)


@functools.lru_cache(maxsize=None)
def _early_audio_model():
  """One initialised model shared by the contract and bad-input tests (one compile)."""
  model, batch = example_model_and_batch(
      fusion="early", modalities=("image", "question", "audio"), **TINY)
  variables = jax.jit(functools.partial(model.init, train=False, method="loss"))(
      jax.random.key(0), batch)
  return model, batch, variables


def test_evaluate_and_summarize_follow_the_trainer_contract():
  model, batch, variables = _early_audio_model()
  outputs = jax.jit(functools.partial(model.apply, method="evaluate"))(variables, batch)
  assert outputs["image_embedding"].shape == (4, model.embed_dim)
  assert outputs["vqa_correct"].shape == (4,)
  summary = type(model).summarize({k: np.asarray(v) for k, v in outputs.items()})
  for direction in ("i2t", "t2i"):
    for k in (1, 5, 10):
      assert 0.0 <= summary[f"{direction}_recall@{k}"] <= 1.0
  assert summary["i2t_recall@5"] == 1.0  # only 4 candidates
  assert set(summary) >= {"vqa_accuracy"} and all(isinstance(v, float) for v in summary.values())


def test_build_model_from_config_fields():
  config = dict(name="multimodal", fusion="bottleneck", modalities=("image", "question"),
                loss_weights={"vqa": 1.0}, num_answers=5, **TINY, **FUSION_FIELDS)
  model = build_model(config)
  assert isinstance(model, multimodal.MultimodalModel) and model.fusion == "bottleneck"
  assert isinstance(build_model(dict(name="captioning")), multimodal.CaptioningModel)
  with pytest.raises(ValueError, match="Unknown config.model fields"):
    build_model(dict(config, fusion_layers=2))


@FUSIONS.register("mean_of_streams")
class _MeanOfStreams(fusion.FusionEncoder):
  """A fork's strategy: every stream plus the mean token of all streams (no attention)."""

  @nn.compact
  def __call__(self, tokens, masks, *, deterministic=True) -> Dict[str, jax.Array]:
    fusion.check_streams(tokens, masks)
    mean = sum(x.mean(1, keepdims=True) for x in tokens.values()) / len(tokens)
    return {m: nn.Dense(x.shape[-1], name=f"{m}_proj")(x + mean) for m, x in tokens.items()}


def test_a_forked_fusion_strategy_is_selected_by_name():
  model, batch = example_model_and_batch(
      fusion="mean_of_streams", modalities=("image", "question"), **TINY)
  variables = jax.eval_shape(functools.partial(model.init, train=False, method="loss"),
                             jax.random.key(0), batch)
  assert "image_proj" in variables["params"]["fusion_encoder"]


def test_bad_input_raises_errors_naming_what_was_expected():
  model, batch, variables = _early_audio_model()
  loss = functools.partial(model.apply, variables, method="loss")
  with pytest.raises(ValueError, match=r"lacks \['audio'\].*reads \['image', 'text', "
                                       r"'question', 'audio', 'answer'\]"):
    loss({k: v for k, v in batch.items() if k != "audio"})
  with pytest.raises(ValueError, match=r"'question' token ids must be in \[0, vocab_size=40\)"):
    loss(dict(batch, question=batch["question"].at[0, 0].set(40)))
  with pytest.raises(ValueError, match="same batch size.*'answer': 3"):
    loss(dict(batch, answer=batch["answer"][:3]))
  for fields, message in (
      (dict(fusion="nope"), r"Unknown fusion strategy 'nope'; expected one of \[.*'bottleneck'"),
      (dict(loss_weights={"vqa": 1.0, "contrast": 1.0}), r"Unknown objectives \['contrast'\]"),
      (dict(num_answers=0), "needs num_answers > 0"),
      (dict(modalities=("image", "smell")), "Unknown modality 'smell'"),
  ):
    bad, _ = example_model_and_batch(
        **{**TINY, "modalities": ("image", "question"), **fields})
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(functools.partial(bad.init, method="loss"), jax.random.key(0), batch)


def test_models_are_registered():
  assert MODELS.get("multimodal") is multimodal.MultimodalModel
  assert MODELS.get("captioning") is multimodal.CaptioningModel
  assert MODELS.get("two_tower") is two_tower.TwoTower
