"""The analytic FLOP count agrees with XLA's cost analysis (within 10%) for every model."""
import functools

import jax
import jax.numpy as jnp
import pytest

from fixtures import example_model_and_batch
from mmjax.models import flops, fusion, multimodal, two_tower

TINY = dict(width=32, num_layers=2, num_heads=2, mlp_dim=64, vocab_size=40, max_text_len=8,
            batch_size=2)


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).cost_analysis()["flops"]


def _assert_close(model, batch, method):
  variables = jax.eval_shape(functools.partial(model.init, train=False, method="loss"),
                             jax.random.key(0), batch)
  fn = lambda v, b: model.apply(v, b, method=method)
  ours, xla = flops.forward_flops(fn, variables, batch), _xla_flops(fn, variables, batch)
  assert abs(ours - xla) <= 0.1 * xla, (ours, xla)
  return ours


@pytest.mark.parametrize("name", multimodal.fusion_names())
def test_multimodal_flops_match_xla_for_every_fusion(name):
  model, batch = example_model_and_batch(
      fusion=name, **TINY, **fusion.fields_for(name, dict(fusion_layer=1, num_bottlenecks=2)))
  assert _assert_close(model, batch, "evaluate") > 0


def test_captioning_and_two_tower_flops_match_xla():
  model, batch = example_model_and_batch(
      fusion="early", modalities=("image",), loss_weights={"caption": 1.0, "itm": 1.0}, **TINY)
  _assert_close(model, batch, "evaluate")
  tower = two_tower.TwoTower(vocab_size=40, max_text_len=8, image_width=32, text_width=32,
                             image_depth=2, text_depth=2, image_heads=2, text_heads=2,
                             embed_dim=16, patch_size=8)
  _assert_close(tower, {"image": batch["image"], "text": batch["text"]}, "evaluate")


def test_matmul_count_is_exact_and_loops_multiply_by_trip_count():
  x, w = jnp.ones((3, 5, 7)), jnp.ones((7, 11))
  assert flops.count_flops(lambda x, w: x @ w, x, w).matmul == 2 * 3 * 5 * 7 * 11
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), "VALID",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  img, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((2, 2, 3, 16))
  assert flops.count_flops(conv, img, kernel).matmul == 2 * (2 * 4 * 4 * 16) * (2 * 2 * 3)
  body = lambda c, _: (jnp.tanh(c @ w @ w.T), None)
  scanned = lambda x: jax.lax.scan(body, x[..., :7], None, length=4)[0]
  once = lambda x: body(x[..., :7], None)[0]
  assert flops.count_flops(scanned, x).matmul == 4 * flops.count_flops(once, x).matmul


def test_shard_map_and_pallas_kernels_count_every_shard_and_block():
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  x, w = jnp.ones((32, 64)), jnp.ones((64, 16))
  plain = flops.count_flops(lambda x, w: x @ w, x, w).matmul
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:8])
  sharded = jax.jit(jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("data"), P()),
                                  out_specs=P("data"), axis_names={"data"}))

  def kernel(x_ref, w_ref, out_ref):
    out_ref[...] = x_ref[...] @ w_ref[...]
  blocked = lambda x, w: pl.pallas_call(
      kernel, grid=(4,), in_specs=[pl.BlockSpec((8, 64), lambda i: (i, 0)),
                                   pl.BlockSpec((64, 16), lambda i: (0, 0))],
      out_specs=pl.BlockSpec((8, 16), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((32, 16), jnp.float32), interpret=True)(x, w)
  assert flops.count_flops(sharded, x, w).matmul == plain
  assert flops.count_flops(blocked, x, w).matmul == plain


def test_fusion_table_lists_every_strategy():
  rows = flops.fusion_table(**TINY)
  assert [r[0] for r in rows] == multimodal.fusion_names()
  for _, params, vqa, both in rows:
    assert params > 0 and 0 < vqa < both


def test_the_trainers_flops_count_a_scanned_stack_depth_times():
  """The MFU numerator: XLA's cost analysis takes a loop body once; this count must not."""
  import os  # pylint: disable=g-import-not-at-top
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmjax.train import program as program_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top
  from mmjax.train.config import load_config_file  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  counts = {}
  for scan in (False, True):
    config = load_config_file(os.path.join(root, "configs", "vit_digits.py"))
    config.model.scan_layers = scan
    spec = pipeline.batch_spec(config.data)
    program = program_lib.build(config, spec, jax.devices()[:1])
    state = state_lib.abstract_with_shardings(program.abstract_state, program.shardings)
    with program.context():
      counts[scan] = trainer._flops(program.train_step, state,  # pylint: disable=protected-access
                                    program.batch(spec, config.batch_size))
  assert counts[False] > 0
  assert counts[True] == pytest.approx(counts[False], rel=1e-3)
