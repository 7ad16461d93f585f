"""Autoregressive decoding with a key/value cache: greedy, beam search and sampling.

Both take a `step_fn(tokens [N], cache) -> (logits [N, vocab], cache)` that feeds one
token per sequence through the decoder and returns the next-token logits together with
the updated cache (flax's 'cache' collection). N is batch * beams for beam search: the
cache is created for that many rows and reordered with the surviving beams every step.

Both run exactly `max_len` steps under `lax.scan` (static shapes, one compilation); a
sequence that emitted `eos_id` continues with padding (0) at no cost, so the outputs are
[B, max_len] with 0 after the end. The first input token is `bos_id`; it is not part of
the output. With beam_size=1 beam search takes the same argmax as greedy at every step,
hence returns the same tokens (tested). Sampling draws from softmax(logits / temperature),
optionally restricted to the `top_k` most likely tokens.
"""
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, Any], Tuple[jax.Array, Any]]


def greedy_decode(step_fn: StepFn, cache: Any, *, batch_size: int, max_len: int,
                  bos_id: int, eos_id: int) -> jax.Array:
  """Greedy decoding -> tokens [batch_size, max_len] (0 after the first eos)."""

  def step(carry, _):
    token, finished, cache = carry
    logits, cache = step_fn(token, cache)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    token = jnp.where(finished, 0, token)
    return (token, finished | (token == eos_id), cache), token

  init = (jnp.full((batch_size,), bos_id, jnp.int32), jnp.zeros((batch_size,), bool), cache)
  _, tokens = jax.lax.scan(step, init, None, length=max_len)
  return tokens.T


def sample_decode(step_fn: StepFn, cache: Any, *, rng: jax.Array, batch_size: int,
                  max_len: int, bos_id: int, eos_id: int, temperature: float = 1.0,
                  top_k: int = 0) -> jax.Array:
  """Temperature / top-k sampling -> tokens [batch_size, max_len] (0 after the first eos).

  temperature 0 is greedy decoding; top_k 0 samples from the whole vocabulary.
  """
  if temperature < 0 or top_k < 0:
    raise ValueError(f"sample_decode: temperature and top_k must be >= 0; given "
                     f"temperature={temperature}, top_k={top_k}.")

  def step(carry, key):
    token, finished, cache = carry
    logits, cache = step_fn(token, cache)
    logits = logits.astype(jnp.float32)
    if top_k:
      kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    if temperature == 0:
      token = jnp.argmax(logits, axis=-1)
    else:
      token = jax.random.categorical(key, logits / temperature, axis=-1)
    token = jnp.where(finished, 0, token.astype(jnp.int32))
    return (token, finished | (token == eos_id), cache), token

  init = (jnp.full((batch_size,), bos_id, jnp.int32), jnp.zeros((batch_size,), bool), cache)
  _, tokens = jax.lax.scan(step, init, jax.random.split(rng, max_len))
  return tokens.T


def _gather_beams(tree: Any, beam_index: jax.Array, batch_size: int, beam_size: int) -> Any:
  """Reorders every [batch * beam, ...] leaf of `tree` by beam_index [batch, beam]."""
  rows = (jnp.arange(batch_size)[:, None] * beam_size + beam_index).reshape(-1)

  def gather(x):
    if x.ndim == 0 or x.shape[0] != batch_size * beam_size:
      return x  # e.g. the scalar cache index, shared by all rows
    return x[rows]
  return jax.tree.map(gather, tree)


def beam_search(step_fn: StepFn, cache: Any, *, batch_size: int, beam_size: int,
                max_len: int, bos_id: int, eos_id: int,
                length_penalty: float = 0.0) -> Tuple[jax.Array, jax.Array]:
  """Beam search -> (best tokens [batch, max_len], their log-probability [batch]).

  `cache` must hold batch_size * beam_size rows (row b * beam_size + k is beam k of
  example b). Finished beams keep their score and extend with padding only; the final
  choice divides scores by ((5 + length) / 6) ** length_penalty (GNMT), 0 = raw sums.
  """
  n = batch_size * beam_size

  def step(carry, t):
    token, scores, finished, seqs, cache = carry
    logits, cache = step_fn(token.reshape(n), cache)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = logp.shape[-1]
    logp = logp.reshape(batch_size, beam_size, vocab)
    pad_only = jnp.where(jnp.arange(vocab) == 0, 0.0, -jnp.inf)
    logp = jnp.where(finished[..., None], pad_only, logp)
    candidates = (scores[..., None] + logp).reshape(batch_size, beam_size * vocab)
    scores, flat = jax.lax.top_k(candidates, beam_size)
    beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    seqs, finished, cache = _reorder(seqs, finished, cache, beam, batch_size, beam_size)
    seqs = seqs.at[:, :, t].set(token)
    return (token, scores, finished | (token == eos_id), seqs, cache), None

  # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
  scores = jnp.tile(jnp.where(jnp.arange(beam_size) == 0, 0.0, -jnp.inf), (batch_size, 1))
  init = (jnp.full((batch_size, beam_size), bos_id, jnp.int32), scores,
          jnp.zeros((batch_size, beam_size), bool),
          jnp.zeros((batch_size, beam_size, max_len), jnp.int32), cache)
  (_, scores, _, seqs, _), _ = jax.lax.scan(step, init, jnp.arange(max_len))
  lengths = jnp.sum(seqs != 0, axis=-1).astype(jnp.float32)
  ranked = scores / ((5.0 + lengths) / 6.0) ** length_penalty
  best = jnp.argmax(ranked, axis=-1)
  take = lambda x: jnp.take_along_axis(x, best[:, None, None] if x.ndim == 3 else best[:, None],
                                       axis=1)[:, 0]
  return take(seqs), take(scores)


def _reorder(seqs, finished, cache, beam, batch_size, beam_size):
  """Keeps the chosen beams: per-beam arrays [B, K, ...] and the [B * K, ...] cache."""
  seqs = jnp.take_along_axis(seqs, beam[..., None], axis=1)
  finished = jnp.take_along_axis(finished, beam, axis=1)
  return seqs, finished, _gather_beams(cache, beam, batch_size, beam_size)
