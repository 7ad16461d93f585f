"""CLIP / SigLIP two-tower model: trains, uses the global batch on a mesh, zero-shot."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.models import heads, two_tower

TINY = dict(vocab_size=50, max_text_len=8, image_width=32, text_width=32, image_depth=1,
            text_depth=1, image_heads=2, text_heads=2, embed_dim=16, patch_size=8)


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  text = rng.integers(1, 50, (n, 8)).astype(np.int32)
  text[:, 5:] = 0
  return {"image": jnp.asarray(rng.normal(size=(n, 16, 16, 3)), jnp.float32),
          "text": jnp.asarray(text)}


def _init(model, batch):
  variables = jax.jit(functools.partial(model.init, method="loss"))(jax.random.key(0), batch)
  return nn.meta.unbox(variables)


@functools.lru_cache(maxsize=None)
def _tiny_tower():
  model = two_tower.TwoTower(**TINY)
  return model, _init(model, _batch(6))


def test_two_tower_softmax_gradients_are_finite_and_sharded_loss_equals_single_device():
  _check_gradients("softmax", check_sharded=True)


def test_two_tower_sigmoid_gradients_are_finite_and_reach_the_bias():
  _check_gradients("sigmoid", check_sharded=False)


def _check_gradients(loss_type, check_sharded):
  model = two_tower.TwoTower(loss_type=loss_type, **TINY)
  batch = _batch()
  variables = _init(model, batch)

  def loss_fn(params, batch):
    return model.apply({"params": params}, batch, train=True, method="loss")[0]
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  loss, grads = jax.device_get(grad_fn(variables["params"], batch))
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  flat = traverse_util.flatten_dict(grads, sep="/")
  assert np.abs(flat["contrastive/logit_scale"]) > 0  # the temperature learns
  if loss_type == "sigmoid":
    assert np.abs(flat["contrastive/logit_bias"]) > 0
  if not check_sharded:
    return  # (both losses are checked sharded at the loss level in tests/test_losses.py)
  # The same jitted function on a batch sharded over 8 devices: the loss still compares
  # all 16 images with all 16 texts, so it equals the single-device value.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  params = jax.device_put(variables["params"], NamedSharding(mesh, P()))
  assert sharded["image"].addressable_shards[0].data.shape[0] == 2
  sharded_loss, sharded_grads = jax.device_get(grad_fn(params, sharded))
  np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(
      traverse_util.flatten_dict(sharded_grads, sep="/")["contrastive/logit_scale"],
      flat["contrastive/logit_scale"], rtol=1e-4, atol=1e-6)


def test_param_tree_is_the_documented_clip_layout():
  _, variables = _tiny_tower()
  names = set(traverse_util.flatten_dict(variables["params"], sep="/"))
  for name in ("img/embedding/kernel", "img/cls", "img/pos_embedding",
               "img/encoder/encoderblock_0/attention/query/kernel",
               "img/encoder/encoder_norm/scale", "txt/embed/embedding/embedding",
               "txt/embed/pos_embedding", "txt/encoder/encoderblock_0/mlp/fc1/kernel",
               "txt/encoder/encoder_norm/scale", "img_proj/kernel", "txt_proj/kernel",
               "contrastive/logit_scale"):
    assert name in names, name
  assert not any("type_embedding" in n or "bias" in n.split("/")[0] for n in names)


def test_zero_shot_logits_use_prompt_ensembles_and_evaluate_gives_recall():
  model, variables = _tiny_tower()
  batch = _batch(6)
  prompts = batch["text"][:6].reshape(3, 2, 8)              # 3 classes x 2 prompts

  @jax.jit
  def run(variables, batch, prompts):
    classes = model.apply(variables, prompts, method="class_embeddings")
    logits = model.apply(variables, batch, classes, method="zero_shot_logits")
    zimg = model.apply(variables, batch["image"], method="embed_image")
    ztxt = model.apply(variables, batch["text"], method="embed_text")
    return classes, logits, zimg, ztxt, model.apply(variables, batch, method="evaluate")
  classes, logits, zimg, ztxt, outputs = run(variables, batch, prompts)
  assert classes.shape == (3, 2, 16) and logits.shape == (6, 3)
  mean = heads.l2_normalize(ztxt.reshape(3, 2, 16).mean(1))
  np.testing.assert_allclose(logits, 100 * zimg @ mean.T, rtol=1e-4, atol=1e-4)
  summary = model.summarize(jax.device_get(outputs))
  assert set(summary) == {f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_two_tower_bad_input():
  model = two_tower.TwoTower(**TINY)
  batch = _batch(4)
  with pytest.raises(ValueError, match=r"reads batch keys \['image', 'text'\]"):
    model.init(jax.random.key(0), {"image": batch["image"]}, method="loss")
  with pytest.raises(ValueError, match="batch sizes differ: 4 vs 3"):
    model.init(jax.random.key(0), dict(batch, text=batch["text"][:3]), method="loss")
  with pytest.raises(ValueError, match="Unknown contrastive loss 'cosine'"):
    jax.eval_shape(functools.partial(two_tower.TwoTower(loss_type="cosine", **TINY).init,
                                     method="loss"), jax.random.key(0), batch)
