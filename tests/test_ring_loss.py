"""The ring contrastive losses equal the dense ones on 8 devices, forward and gradients,
never hold more than [local, local] logits, and refuse what they cannot do exactly."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses, ring_loss
from fixtures import example_model_and_batch
from mmjax.models import heads
from mmjax.train import sharding

N, D = 64, 16  # 8 rows per device


def _mesh():
  return sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))  # the ring spans data x fsdp


def _inputs(mesh):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, N, D)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  z[1, :8] = z[0, :8]  # some pairs match exactly: positives of every size
  x, y = (jax.device_put(v, sharding.batch_sharding(mesh)) for v in z)
  return x, y, jnp.float32(np.log(10.0)), jnp.float32(-5.0)


def _loss(kind, impl):
  def fn(x, y, scale, bias):
    if impl == "ring":
      return ring_loss.ring_contrastive_loss(x, y, scale, bias if kind == "sigmoid" else None,
                                             kind=kind)
    if kind == "softmax":
      loss, logits = losses.clip_loss(x, y, scale)
    else:
      loss, logits = losses.siglip_loss(x, y, scale, bias)
    return loss, jnp.argmax(logits, axis=1) == jnp.arange(N)
  return fn


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_equals_dense_on_8_devices_forward_and_gradients(kind):
  mesh = _mesh()
  args = _inputs(mesh)
  out = {}
  with jax.set_mesh(mesh):
    for impl in ("dense", "ring"):
      grad = jax.value_and_grad(lambda *a, f=_loss(kind, impl): f(*a)[0], argnums=(0, 1, 2, 3))
      out[impl] = jax.device_get((jax.jit(grad)(*args), jax.jit(_loss(kind, impl))(*args)[1]))
  (dense_loss, dense_grads), dense_correct = out["dense"]
  (ring_loss_, ring_grads), ring_correct = out["ring"]
  np.testing.assert_allclose(ring_loss_, dense_loss, rtol=1e-5)
  for name, a, b in zip(("zimg", "ztxt", "logit_scale", "logit_bias"), ring_grads, dense_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
  assert np.abs(ring_grads[2]) > 0 and (kind == "softmax" or np.abs(ring_grads[3]) > 0)
  np.testing.assert_array_equal(ring_correct, dense_correct)


def test_ring_program_holds_only_local_blocks_of_logits():
  """Neither forward nor backward holds a [rows per device, N] (or [N, N]) array."""
  mesh = _mesh()
  args = _inputs(mesh)
  local = N // 8
  with jax.set_mesh(mesh):
    texts = {}
    for impl in ("dense", "ring"):
      fn = lambda *a, f=_loss("sigmoid", impl): f(*a)[0]
      grad = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))
      texts[impl] = grad.lower(*args).compile().as_text()
  wide = re.compile(rf"f32\[({local},{N}|{N},{local}|{N},{N})\]")
  assert wide.search(texts["dense"])  # the check can fail: the dense program has them
  assert not wide.search(texts["ring"]), wide.search(texts["ring"]).group(0)
  assert re.search(rf"f32\[{local},{local}\]", texts["ring"])


def test_ring_without_a_mesh_is_the_dense_loss_on_one_block():
  x, y, scale, bias = (jax.device_get(a) for a in _inputs(_mesh()))
  for kind in ("softmax", "sigmoid"):
    ring, _ = _loss(kind, "ring")(x, y, scale, bias)
    dense, _ = _loss(kind, "dense")(x, y, scale, bias)
    np.testing.assert_allclose(ring, dense, rtol=1e-5)


def test_ring_refuses_what_it_cannot_do_exactly():
  mesh = _mesh()
  x = jnp.ones((12, D)) / np.sqrt(D)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="not divisible"):
    ring_loss.ring_contrastive_loss(x, x, jnp.float32(1.0), kind="softmax")
  with pytest.raises(ValueError, match="needs logit_bias"):
    ring_loss.ring_contrastive_loss(x, x, jnp.float32(1.0), kind="sigmoid")
  head = heads.ContrastiveHead(impl="sparse")
  with pytest.raises(ValueError, match="contrastive_impl"):
    head.init(jax.random.key(0), x, x)
  model, batch = example_model_and_batch(
      width=16, num_layers=2, num_heads=2, mlp_dim=32, fusion_layer=1, modalities=("image",),
      loss_weights={"itc": 1.0, "itm": 1.0}, contrastive_impl="ring")
  with pytest.raises(ValueError, match="cannot serve the 'itm' objective"):
    model.init(jax.random.key(0), batch, method="loss")


def test_two_tower_with_ring_loss_equals_dense_loss_and_gradients():
  from mmjax.models import two_tower  # pylint: disable=g-import-not-at-top
  mesh = _mesh()
  tiny = dict(vocab_size=50, max_text_len=8, image_width=16, text_width=16, image_depth=1,
              text_depth=1, image_heads=2, text_heads=2, embed_dim=16, patch_size=8,
              loss_type="sigmoid")
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
           "text": rng.integers(1, 50, (16, 8)).astype(np.int32)}
  out = {}
  with jax.set_mesh(mesh):
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    for impl in ("dense", "ring"):
      model = two_tower.TwoTower(contrastive_impl=impl, **tiny)
      params = nn.meta.unbox(model.init(jax.random.key(0), batch, method="loss"))["params"]
      loss = lambda p, m=model: m.apply({"params": p}, batch, method="loss")
      out[impl] = jax.device_get(jax.jit(jax.value_and_grad(loss, has_aux=True))(params))
  (dense, dense_logged), dense_grads = out["dense"]
  (ring, ring_logged), ring_grads = out["ring"]
  np.testing.assert_allclose(ring, dense, rtol=1e-5)
  np.testing.assert_allclose(ring_logged["i2t_batch_accuracy"],
                             dense_logged["i2t_batch_accuracy"])
  for a, b in zip(jax.tree.leaves(ring_grads), jax.tree.leaves(dense_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
