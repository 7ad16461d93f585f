"""The research-fork examples (experiments/fork_fusion.py, experiments/fork_objective.py):
registered from outside mmjax, a real fusion strategy and a real objective, each trained
by the unchanged trainer selected from the config."""
import importlib

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn.transformer import BlockConfig
from mmjax.registry import FUSIONS, OBJECTIVES


def _fusion_and_streams():
  importlib.import_module("experiments.fork_fusion")
  fusion = FUSIONS.get("gated_xattn")(num_layers=2, block=BlockConfig(num_heads=2, mlp_dim=32),
                                      fusion_layer=1)
  rng = np.random.default_rng(0)
  tokens = {"image": jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32),
            "question": jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)}
  masks = {m: jnp.ones(x.shape[:2], bool) for m, x in tokens.items()}
  return fusion, tokens, masks


def test_importing_the_fork_registers_its_fusion_by_name():
  importlib.import_module("experiments.fork_fusion")
  assert "gated_xattn" in FUSIONS.names()


def test_gates_start_closed_then_let_the_other_modality_in():
  fusion, tokens, masks = _fusion_and_streams()
  variables = fusion.init(jax.random.key(0), tokens, masks)
  assert sorted(k for k in variables["params"] if "xattn" in k) == [
      "image_xattn1", "question_xattn1"]  # only from fusion_layer on
  changed = dict(tokens, question=tokens["question"][::-1])  # swap the examples

  @jax.jit  # op by op, each of the fusion's ops would compile on its own
  def image_out(params, inputs):
    return fusion.apply({"params": params}, inputs, masks)["image"]

  params = nn.meta.unbox(variables["params"])
  # Gate 0 at init: exactly late fusion, the image stream ignores the question.
  np.testing.assert_array_equal(image_out(params, tokens), image_out(params, changed))
  opened = traverse_util.unflatten_dict({
      k: jnp.ones_like(v) if k[-1] == "gate" else v
      for k, v in traverse_util.flatten_dict(params).items()})
  assert not np.allclose(image_out(opened, tokens), image_out(opened, changed), atol=1e-4)
  # The gate gets a gradient, so training can open it.
  grad = jax.grad(lambda p: jnp.sum(image_out(p, tokens) ** 2))(params)
  assert float(jnp.abs(grad["image_xattn1"]["gate"])) > 0


def test_unchanged_trainer_trains_the_forks_selected_by_name(tmp_path):
  """The fork's fusion strategy and its objective (below) in one run, to save a run."""
  from test_configs import ROOT, TINY, _tiny  # pylint: disable=g-import-not-at-top
  from mmjax.train.config import load_config_file  # pylint: disable=g-import-not-at-top
  from mmjax.train.trainer import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config = load_config_file(f"{ROOT}/configs/demo.py")
  config = _tiny(config, {**TINY["demo.py"], "model.fusion": "gated_xattn",
                          "model.loss_weights": {"itc": 1.0, "vqa": 1.0, "iac": 0.5},
                          "imports": ("experiments.fork_fusion", "experiments.fork_objective")},
                 str(tmp_path / "data"))
  result = train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 1 and np.isfinite(result["train/loss"])
  assert np.isfinite(result["train/iac_loss"]) and "eval/vqa_accuracy" in result
  assert 0.0 <= result["eval/iac_i2t_recall@1"] <= 1.0


# ---------------------------------------------------------- a fork's objective (iac)

def test_importing_the_fork_registers_its_objective_by_name():
  importlib.import_module("experiments.fork_objective")
  assert "iac" in OBJECTIVES.names()


def test_forked_objective_adds_its_heads_loss_and_summary_to_the_model():
  from fixtures import example_model_and_batch  # pylint: disable=g-import-not-at-top
  importlib.import_module("experiments.fork_objective")
  model, batch = example_model_and_batch(
      fusion="early", modalities=("image", "audio"), loss_weights={"iac": 1.0}, width=16,
      num_layers=1, num_heads=2, mlp_dim=32, embed_dim=8)
  params = jax.jit(lambda b: model.init(jax.random.key(0), b, method="loss"))(batch)["params"]
  assert {"iac_image_proj", "iac_audio_proj", "iac_contrastive"} <= set(params)
  loss_fn = lambda p: model.apply({"params": p}, batch, train=True, method="loss")
  (loss, logged), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert set(logged) == {"iac_loss"} and float(loss) == float(logged["iac_loss"]) > 0
  for head in ("iac_image_proj", "iac_audio_proj", "iac_contrastive"):
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads[head])), head
  outputs = jax.jit(lambda p: model.apply({"params": p}, batch, method="evaluate"))(params)
  summary = type(model).summarize({k: np.asarray(v) for k, v in outputs.items()})
  assert summary["iac_i2t_recall@5"] == 1.0  # 4 candidates
  assert set(summary) == {f"iac_{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}



def test_a_fork_objective_missing_a_method_is_refused_when_made():
  import pytest  # pylint: disable=g-import-not-at-top
  from mmjax.models.objectives import Objective  # pylint: disable=g-import-not-at-top

  class NoLoss(Objective):
    def inputs(self, model):
      return ("image",)

    def features(self, model, batch, run):
      return {}

    @staticmethod
    def summarize(outputs):
      return {}
  with pytest.raises(TypeError, match="loss"):
    NoLoss()
