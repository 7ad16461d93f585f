"""Ring contrastive losses: CLIP / SigLIP without ever building the global similarity matrix.

The dense losses (mmjax.losses) see the global batch: XLA all-gathers the embeddings and
every device holds a [N / devices, N] slice of logits, forward and backward. At SigLIP's
million-example batches that slice dominates memory. Here, under `shard_map`, every
data-parallel device (`data` x `fsdp`) keeps its own b = N / devices image and text
embeddings and the text blocks travel around a ring (`ppermute`): after `devices` steps
every image has met every text, and a device only ever holds one [b, b] block of logits.

  CLIP     both directions with a streaming log-sum-exp: row sums (images) stay home,
           column sums (texts) travel with their text block.
  SigLIP   the sigmoid loss is a plain sum over blocks; positives sit on the home block.

Autodiff of the ring would save every step's block (the full matrix again), so the
backward pass is a custom VJP that runs the ring once more and recomputes each block from
the saved log-sum-exps, like flash attention; text gradients travel with their block and
arrive home after a full turn. Both give the dense loss and gradients (temperature and
bias included) to float rounding; tests/test_ring_loss.py checks it on 8 devices.

Without a mesh (or with one data-parallel device) the same code runs on one block.
"""
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array

# The mesh axes the batch is split over (mmjax.train.sharding.BATCH_AXES).
DATA_AXES = ("data", "fsdp")
KINDS = ("softmax", "sigmoid")


def ring_contrastive_loss(zimg: Array, ztxt: Array, logit_scale: Array,
                          logit_bias: Optional[Array] = None, *,
                          kind: str) -> Tuple[Array, Array]:
  """Contrastive loss of the global batch computed around a ring of data-parallel devices.

  zimg, ztxt [N, D] (row i of each is a pair), `logit_scale` log(1 / temperature) (already
  capped), `logit_bias` SigLIP's bias (None for "softmax"). Returns (loss, i2t_correct [N]),
  the loss equal to `losses.clip_loss` / `losses.siglip_loss`, and 1.0 where image i scores
  its own text above every other text of the global batch.
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown contrastive loss {kind!r}; expected one of {KINDS}.")
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError("Contrastive losses expect image and text embeddings of the same shape "
                     f"[batch, dim]; got {zimg.shape} and {ztxt.shape}.")
  if (kind == "sigmoid") != (logit_bias is not None):
    raise ValueError(f"The {kind} loss {'needs' if kind == 'sigmoid' else 'takes no'} "
                     "logit_bias.")
  scale = jnp.exp(logit_scale.astype(jnp.float32))
  bias = jnp.zeros((), jnp.float32) if logit_bias is None else logit_bias.astype(jnp.float32)
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in DATA_AXES if a in mesh.axis_names)
  devices = 1
  for a in axes:
    devices *= mesh.shape[a]
  if zimg.shape[0] % devices:
    raise ValueError(f"The ring loss splits the batch over the data-parallel axes {axes} "
                     f"({devices} devices); batch {zimg.shape[0]} is not divisible by it.")
  x, y = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
  return _make_ring(kind, axes if devices > 1 else (), devices, zimg.shape[0], mesh)(
      x, y, scale, bias)


def _make_ring(kind: str, axes: Tuple[str, ...], devices: int, total: int, mesh):
  """The per-device loss (x, y, scale, bias) -> (loss, correct) with its ring backward."""

  def shift(tree):  # every device passes its travelling block to the next one
    if not axes:
      return tree
    perm = [(i, (i + 1) % devices) for i in range(devices)]
    return jax.tree.map(lambda v: jax.lax.ppermute(v, axes, perm), tree)

  def psum(v):
    return jax.lax.psum(v, axes) if axes else v

  def block(x, y_block, scale, bias, step):
    """(logits [b, b], similarities, positive mask) of home images vs a visiting text block."""
    sim = x @ y_block.T
    positive = jnp.eye(x.shape[0], dtype=bool) & (step == 0)  # the home block comes first
    return scale * sim + bias, sim, positive

  def forward(x, y, scale, bias):
    b = x.shape[0]
    lse0 = jnp.full((b,), -jnp.inf, jnp.float32)

    def body(step, carry):
      y_c, col_lse, row_lse, total_loss, off_max = carry
      logits, _, positive = block(x, y_c, scale, bias, step)
      if kind == "softmax":
        row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
        col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(logits, axis=0))
      else:
        total_loss -= jnp.sum(jax.nn.log_sigmoid(jnp.where(positive, logits, -logits)))
      off_max = jnp.maximum(off_max, jnp.max(jnp.where(positive, -jnp.inf, logits), axis=1))
      y_c, col_lse = shift((y_c, col_lse))
      return y_c, col_lse, row_lse, total_loss, off_max

    carry = (y, lse0, lse0, jnp.zeros((), jnp.float32), lse0)
    _, col_lse, row_lse, local, off_max = jax.lax.fori_loop(0, devices, body, carry)
    diagonal = scale * jnp.sum(x * y, axis=-1) + bias
    if kind == "softmax":  # after a full turn every text block's column sums are home
      local = 0.5 * (jnp.sum(row_lse) + jnp.sum(col_lse) - 2.0 * jnp.sum(diagonal))
    loss = psum(local) / total
    correct = (diagonal > off_max).astype(jnp.float32)
    return loss, correct, row_lse, col_lse

  def backward(x, y, scale, bias, row_lse, col_lse, g):
    g = g / total

    def body(step, carry):
      y_c, col_c, dy_c, dx, dscale, dbias = carry
      logits, sim, positive = block(x, y_c, scale, bias, step)
      if kind == "softmax":
        dlogits = 0.5 * (jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - col_c[None, :])
                         - 2.0 * positive)
      else:
        sign = jnp.where(positive, 1.0, -1.0)
        dlogits = -sign * jax.nn.sigmoid(-sign * logits)
      dlogits = g * dlogits
      dx += scale * dlogits @ y_c
      dy_c += scale * dlogits.T @ x
      dscale += jnp.sum(dlogits * sim)
      dbias += jnp.sum(dlogits)
      y_c, col_c, dy_c = shift((y_c, col_c, dy_c))  # text gradients travel with their block
      return y_c, col_c, dy_c, dx, dscale, dbias

    zero = jnp.zeros((), jnp.float32)
    carry = (y, col_lse, jnp.zeros_like(y), jnp.zeros_like(x), zero, zero)
    _, _, dy, dx, dscale, dbias = jax.lax.fori_loop(0, devices, body, carry)
    return dx, dy, psum(dscale), psum(dbias)

  def sharded(fn, in_specs, out_specs):
    if not axes:
      return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)

  # The custom VJP sits outside shard_map, so nothing of the ring is ever transposed by
  # autodiff; forward and backward are each one shard_map.
  dp, rep = P(axes), P()
  sharded_forward = sharded(forward, (dp, dp, rep, rep), (rep, dp, dp, dp))
  sharded_backward = sharded(backward, (dp, dp, rep, rep, dp, dp, rep), (dp, dp, rep, rep))

  @jax.custom_vjp
  def ring(x, y, scale, bias):
    return sharded_forward(x, y, scale, bias)[:2]

  def ring_forward(x, y, scale, bias):
    loss, correct, row_lse, col_lse = sharded_forward(x, y, scale, bias)
    return (loss, correct), (x, y, scale, bias, row_lse, col_lse)

  def ring_backward(residuals, cotangents):
    return sharded_backward(*residuals, cotangents[0])  # `correct` is a metric: no gradient

  ring.defvjp(ring_forward, ring_backward)
  return ring
