"""The "vlm" model: prefix-LM mask, suffix-only loss, cached generation, sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import vlm as vlm_lib
from mmjax.models.base import build_model
from mmjax.train import sharding as sharding_lib
from mmjax.train.config import DEFAULT_AXIS_RULES
import ml_collections

TINY = dict(name="vlm", encoder=dict(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2,
                                     patch_size=8),
            vocab_size=50, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, eos_id=3, max_decode_len=5)


def tiny(**overrides):
  return build_model(ml_collections.ConfigDict({**TINY, **overrides}))


def tiny_batch(batch_size=2):
  rng = np.random.default_rng(0)
  prefix = np.zeros((batch_size, 4), np.int32)
  suffix = np.zeros((batch_size, 5), np.int32)
  for b in range(batch_size):
    n, m = 1 + b % 4, 1 + b % 3
    prefix[b, :n] = rng.integers(4, 50, n)
    suffix[b, :m] = rng.integers(4, 50, m)
    suffix[b, m] = 3
  return {"image": jnp.asarray(rng.normal(size=(batch_size, 16, 16, 3)), jnp.float32),
          "prefix": jnp.asarray(prefix), "suffix": jnp.asarray(suffix)}


@pytest.fixture(scope="module")
def model_and_params():
  model, batch = tiny(), tiny_batch()
  params = nn.meta.unbox(jax.jit(lambda: model.init(jax.random.key(0), batch, method="loss"))())
  return model, params, batch


def test_prefix_lm_mask():
  valid = jnp.array([[True, True, False, True, True]])
  full = vlm_lib.prefix_lm_mask(valid, 4, True)[0, 0]
  causal = vlm_lib.prefix_lm_mask(valid, 4, False)[0, 0]
  i, j = np.meshgrid(range(5), range(5), indexing="ij")
  want_causal = (j <= i) & np.asarray(valid[0])[None]
  want_full = ((j <= i) | ((i < 4) & (j < 4))) & np.asarray(valid[0])[None]
  np.testing.assert_array_equal(causal, want_causal)
  np.testing.assert_array_equal(full, want_full)
  assert not full[0, 2] and full[0, 3] and not full[3, 4]   # padding hidden; suffix causal
  np.testing.assert_array_equal(vlm_lib.positions_of(valid), [[0, 1, 1, 2, 3]])
  np.testing.assert_array_equal(vlm_lib.move_padding_first(jnp.array([[5, 6, 0, 0], [7, 0, 0, 0]])),
                                [[0, 0, 5, 6], [0, 0, 0, 7]])


def test_loss_is_on_the_suffix_only_and_prefix_attention_matters(model_and_params):
  model, params, batch = model_and_params
  padded = dict(batch, prefix=jnp.pad(batch["prefix"], ((0, 0), (0, 3))))
  causal = tiny(prefix_attention="causal")

  @jax.jit
  def run(params):
    return (model.apply(params, batch, method="_token_stats", train=False),
            model.apply(params, batch, method="loss")[0],
            model.apply(params, padded, method="loss")[0],
            causal.apply(params, batch, method="loss")[0])
  stats, loss, padded_loss, causal_loss = run(params)
  np.testing.assert_array_equal(stats["num_tokens"], np.sum(np.asarray(batch["suffix"]) != 0, 1))
  # Changing the prompt's padding layout does not change anything: padding is invisible.
  np.testing.assert_allclose(padded_loss, loss, rtol=1e-5)
  assert abs(float(causal_loss) - float(loss)) > 1e-4


def test_rematerialised_towers_give_the_same_loss_and_gradients(model_and_params):
  model, params, batch = model_and_params
  remat = tiny(remat_policy="full")
  grad = lambda m: jax.jit(jax.value_and_grad(lambda p: m.apply(p, batch, method="loss")[0]))
  (loss, grads), (remat_loss, remat_grads) = grad(model)(params), grad(remat)(params)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               remat_grads, grads)
  # Both towers are rematerialised: each block's backward recomputes its forward.
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: remat.apply(p, batch, method="loss")[0]))(params))
  assert jaxpr.count("remat") >= TINY["depth"] + TINY["encoder"]["depth"]


@pytest.mark.parametrize("prefix_attention", ["full", "causal"])
def test_cached_greedy_generation_equals_full_forward(model_and_params, prefix_attention):
  _, params, batch = model_and_params
  model = tiny(prefix_attention=prefix_attention)
  tokens = jax.jit(lambda p: model.apply(p, batch, method="generate_tokens", max_len=6))(params)
  # Teacher-forcing the generated tokens, every argmax is the token generated next.
  forced = dict(batch, suffix=jnp.pad(tokens, ((0, 0), (0, 1))))
  logits = jax.jit(lambda p: model.apply(p, forced, method="suffix_logits"))(params)
  argmax = np.asarray(jnp.argmax(logits, -1))[:, :6]
  for row, want in zip(np.asarray(tokens), argmax):
    n = np.flatnonzero(row == 3)[0] + 1 if (row == 3).any() else 6
    np.testing.assert_array_equal(row[:n], want[:n])


def test_beam_of_one_equals_greedy_and_sampling_is_valid(model_and_params):
  _, params, batch = model_and_params

  @jax.jit
  def run(params):
    generate = lambda model, **kw: model.apply(params, batch, method="generate_tokens", **kw)
    sample = dict(decoding="sample", rng=jax.random.key(1))
    return (generate(tiny()), generate(tiny(beam_size=1), decoding="beam"),
            generate(tiny(temperature=0.0), **sample), generate(tiny(top_k=1), **sample),
            generate(tiny(temperature=5.0), **sample),
            # The generation evaluation's interface: prompt_{task}, eos -> 0.
            tiny().generate(params, {**batch, "prompt_caption": batch["prefix"]},
                            task="caption", beam_size=1))
  greedy, beam, cold, top1, hot, evaluator = run(params)
  np.testing.assert_array_equal(beam, greedy)
  np.testing.assert_array_equal(evaluator, np.where(np.asarray(greedy) == 3, 0, greedy))
  np.testing.assert_array_equal(cold, greedy)
  np.testing.assert_array_equal(top1, greedy)
  assert hot.shape == greedy.shape and np.all((np.asarray(hot) >= 0) & (np.asarray(hot) < 50))
  assert not np.array_equal(hot, greedy)


def test_every_weight_has_logical_axes_and_8_devices_equal_1():
  model, batch = tiny(depth=1), tiny_batch(8)
  init = lambda rng: model.init(rng, batch, method="loss")
  boxed = jax.eval_shape(init, jax.random.key(0))["params"]
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    name = jax.tree_util.keystr(path)
    if not isinstance(leaf, nn.Partitioned):
      # The ViT tower's LayerNorm vectors are replicated (mmjax.nn.transformer's LayerNorms
      # carry no axis names); every other weight must have them.
      assert name.startswith("['image_encoder']") and "norm" in name and leaf.ndim == 1, name
      continue
    assert len(leaf.names) == leaf.value.ndim

  def loss_and_grads(variables, batch):
    return jax.value_and_grad(lambda p: model.apply({"params": p}, batch, method="loss")[0])(
        variables["params"])

  params = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))
  one = jax.jit(loss_and_grads)(params, batch)

  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = DEFAULT_AXIS_RULES
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0))),
                                          mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(jax.random.key(0))
    assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(sharded))
    eight = jax.jit(loss_and_grads)(sharded, batch)
  np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), eight[1], one[1])


def test_bad_config_and_batch_raise():
  batch = tiny_batch()
  with pytest.raises(ValueError, match="prefix_attention='bidirectional'; expected one of"):
    tiny(prefix_attention="bidirectional").init(jax.random.key(0), batch, method="loss")
  with pytest.raises(ValueError, match="pool_type"):
    tiny(encoder=dict(TINY["encoder"], pool_type="cls")).init(jax.random.key(0), batch,
                                                               method="loss")
  with pytest.raises(ValueError, match="missing \\['suffix'\\]"):
    tiny().init(jax.random.key(0), {k: batch[k] for k in ("image", "prefix")}, method="loss")


def test_vlm_task_op_makes_prefix_suffix_and_one_prompt_per_task():
  from mmjax.data import preprocess
  from mmjax.data.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  op = preprocess.build("vlm_task(prefix_len=8, suffix_len=6, eos_id=300, answers=('no', 'yes'))",
                        preprocess.Context(tokenizer=tok))
  record = {"caption": b"red circle", "question": b"is it red?", "answer": 1}
  tasks = {int(op(dict(record), np.random.default_rng(i))["task"]) for i in range(20)}
  assert tasks == {0, 1}                                # training draws both tasks
  ex = op(dict(record), None)
  assert all(int(op(dict(record), None)["task"]) == ex["task"] for _ in range(3))
  np.testing.assert_array_equal(ex["prompt_caption"], tok.encode("caption")[:8] + [0])
  np.testing.assert_array_equal(ex["prompt_vqa"], tok.encode("is it red?")[:8])
  task = preprocess.VLM_TASKS[int(ex["task"])]
  target = "red c" if task == "caption" else "yes"      # truncated to suffix_len - 1, + EOS
  want = tok.encode(target) + [300]
  np.testing.assert_array_equal(ex["suffix"], want + [0] * (6 - len(want)))
  np.testing.assert_array_equal(ex["prefix"], ex[f"prompt_{task}"])
  with pytest.raises(ValueError, match="expected a non-empty subset"):
    preprocess.build("vlm_task(('ocr',), eos_id=1)", preprocess.Context(tokenizer=tok))
