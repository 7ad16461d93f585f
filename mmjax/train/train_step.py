"""The train step: (state, global batch) -> (new state, metrics), a pure function to jit.

Gradient accumulation splits the batch into `grad_accum_steps` equal micro-batches and
averages their gradients in a `lax.scan`: exact for losses that are means over examples;
for contrastive losses it is the usual approximation (negatives come from the micro-batch
only).

A non-finite loss or gradient never updates the state; the per-parameter finite flags
(`metrics[GRADS_FINITE]`) let the host name the culprits.
"""
from typing import Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from mmjax.train import sharding as sharding_lib
from mmjax.train.state import TrainState

GRADS_FINITE = "grads_finite"  # metrics key of the per-parameter finite flags (not logged)



def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
                    grad_accum_steps: int) -> Callable[[TrainState, Dict[str, jax.Array]],
                                                       Tuple[TrainState, Dict[str, jax.Array]]]:
  """(state, global batch) -> (new state, metrics); pure, to be jitted with donation."""

  def loss_fn(params, batch, rng):
    dropout_rng, sample_rng = jax.random.split(rng)
    loss, metrics = model.apply({"params": params}, batch, train=True, method="loss",
                                rngs={"dropout": dropout_rng, "sample": sample_rng})
    return loss.astype(jnp.float32), metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated_grads(params, batch, rng):
    """Mean loss / metrics / grads over micro-batches, as if computed on the whole batch."""
    def split(x):
      # Row r of micro-batch i is row r * k + i: every device keeps its own rows, so no
      # data moves between devices (a [k, B/k] split would put micro-batch 0 on few devices).
      x = x.reshape((x.shape[0] // grad_accum_steps, grad_accum_steps) + x.shape[1:])
      x = jnp.swapaxes(x, 0, 1)
      return jax.lax.with_sharding_constraint(x, P(None, sharding_lib.BATCH_AXES))
    micro = jax.tree.map(split, batch)

    def body(carry, inputs):
      index, micro_batch = inputs
      out = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, out), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, first, rng))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
    return jax.tree.map(lambda x: x / grad_accum_steps, total)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, rng)
    else:
      (loss, metrics), grads = accumulated_grads(state.params, batch, rng)
    # Per-parameter sums of squares give the global norm and, read on the host only to
    # name the culprits of a divergence, which parameters' gradients are not finite.
    squares = jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32))), grads)
    grad_norm = jnp.sqrt(sum(jax.tree.leaves(squares)))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    # A non-finite update never enters the state: with on_nonfinite="skip" that is the
    # feature; with "error" the host stops the run, and the state it stops with is sane.
    # One cond, not a select per leaf: measured on XLA:CPU, the same step time, 9-13%
    # less temp memory (ViT, CLIP steps) and up to ~25% less compile time.
    params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o),
                                     state.params, state.opt_state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                   finite=finite)
    metrics[GRADS_FINITE] = {name: jnp.isfinite(sq) for name, sq in
                             traverse_util.flatten_dict(squares, sep="/").items()}
    return new_state, metrics

  return train_step
