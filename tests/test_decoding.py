"""Greedy and beam search: beam 1 == greedy, beam search is exact with enough beams,
and decoding with the key/value cache equals recomputing the whole prefix."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from fixtures import example_model_and_batch
from mmjax.models import decoding, multimodal

VOCAB, EOS, BOS = 5, 4, 3


def _toy_lm(seed=0):
  """A stateful toy LM: the logits depend on the last token and on the cache's history,
  so beams whose cache rows are not reordered correctly get the wrong scores."""
  rng = np.random.default_rng(seed)
  table = jnp.asarray(rng.normal(size=(VOCAB, VOCAB)) * 2, jnp.float32)
  table2 = jnp.asarray(rng.normal(size=(7, VOCAB)) * 2, jnp.float32)

  def step_fn(token, cache):
    history = cache["history"] * 3 + token
    logits = table[token] + table2[history % 7]
    logits = logits.at[:, 0].set(-1e9)  # the toy model never emits padding
    return logits, {"history": history, "steps": cache["steps"] + 1}
  return step_fn


def _cache(rows):
  return {"history": jnp.zeros((rows,), jnp.int32), "steps": jnp.zeros((), jnp.int32)}


def _score(step_fn, seq):
  """log p(seq) token by token (stopping after EOS), as beam search defines it."""
  cache, token, total = _cache(1), jnp.array([BOS]), 0.0
  for t in seq:
    logits, cache = step_fn(token, cache)
    total += float(jax.nn.log_softmax(logits[0])[t])
    if t == EOS:
      break
    token = jnp.array([t])
  return total


def test_beam_size_one_equals_greedy():
  step_fn = _toy_lm()
  for seed in range(2):
    step_fn = _toy_lm(seed)
    greedy = decoding.greedy_decode(step_fn, _cache(2), batch_size=2, max_len=6,
                                    bos_id=BOS, eos_id=EOS)
    beam, _ = decoding.beam_search(step_fn, _cache(2), batch_size=2, beam_size=1, max_len=6,
                                   bos_id=BOS, eos_id=EOS)
    np.testing.assert_array_equal(beam, greedy)


def test_wide_beam_finds_the_best_sequence_and_pads_after_eos():
  step_fn = _toy_lm(1)
  max_len = 3
  best = max((s for s in itertools.product(range(1, VOCAB), repeat=max_len)),
             key=lambda s: _score(step_fn, s))
  best_score = _score(step_fn, best)
  tokens, score = decoding.beam_search(step_fn, _cache(64), batch_size=1, beam_size=64,
                                       max_len=max_len, bos_id=BOS, eos_id=EOS)
  assert abs(float(score[0]) - best_score) < 1e-4
  got = list(np.asarray(tokens[0]))
  if EOS in got:
    assert all(t == 0 for t in got[got.index(EOS) + 1:])
  assert abs(_score(step_fn, [t for t in got if t]) - best_score) < 1e-4
  greedy = decoding.greedy_decode(step_fn, _cache(1), batch_size=1, max_len=max_len,
                                  bos_id=BOS, eos_id=EOS)
  assert _score(step_fn, [t for t in np.asarray(greedy[0]) if t]) <= best_score + 1e-6


def test_cached_greedy_captions_equal_full_recomputation():
  model, batch = example_model_and_batch(
      modalities=("image",), width=32, num_layers=1, num_heads=2, mlp_dim=64, max_text_len=6,
      vocab_size=20, loss_weights={"caption": 1.0}, fusion="early", batch_size=2)
  variables = jax.jit(functools.partial(model.init, train=False, method="loss"))(
      jax.random.key(0), batch)
  greedy = jax.jit(functools.partial(multimodal.generate_captions, model))(variables, batch)
  assert greedy.shape == (2, model.max_text_len + 1)
  # Without the cache: one teacher-forced pass over [BOS, greedy...] must predict the
  # greedy token at every position up to the end of each caption.
  bos, eos = model.vocab_size + 1, model.vocab_size + 2
  inputs = jnp.concatenate([jnp.full((2, 1), bos), greedy[:, :-1]], axis=1)

  @jax.jit
  def teacher_forced(variables, batch, inputs):
    memory, mask = model.apply(variables, batch, method="caption_memory")
    return model.apply(variables, inputs, memory, mask, method="caption_logits")
  logits = teacher_forced(variables, batch, inputs)
  logits = logits.at[..., jnp.array([0, model.vocab_size, bos])].set(-jnp.inf)
  predicted = np.asarray(jnp.argmax(logits, -1))
  for row in range(2):
    tokens = list(np.asarray(greedy[row]))
    n = tokens.index(0) if 0 in tokens else len(tokens)  # EOS was emitted at position n
    np.testing.assert_array_equal(predicted[row, :n], tokens[:n])
    if n < len(tokens):
      assert predicted[row, n] == eos and not any(tokens[n:])
