"""The train step: (state, global batch) -> (new state, metrics), a pure function to jit.

Gradient accumulation splits the batch into `grad_accum_steps` equal micro-batches,
scanned with `lax.scan`. For models that split their loss into per-example `features`
and `loss_from_features` (every contrastive model; see mmjax/models/base.py) it is
exact, GradCache-style: the loss sees the global batch (all negatives) while about one
micro-batch of activations is alive at a time. Other models average micro-batch
gradients: exact for losses that are means over examples.

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
  k = grad_accum_steps

  def rngs(rng, index=None):
    # "sample" is the same for every micro-batch (per-example draws fold in example ids);
    # "dropout" differs per micro-batch, and is the same when a micro-batch is recomputed.
    dropout_rng, sample_rng = jax.random.split(rng)
    if index is not None:
      dropout_rng = jax.random.fold_in(dropout_rng, index)
    return {"dropout": dropout_rng, "sample": sample_rng}

  def loss_fn(params, batch, rng, index=None):
    loss, metrics = model.apply({"params": params}, batch, train=True, method="loss",
                                rngs=rngs(rng, index))
    return loss.astype(jnp.float32), metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def split(x):
    # Row r of micro-batch i is row r * k + i: every device keeps its own rows, so no
    # data moves between devices (a [k, B/k] split would put micro-batch 0 on few devices).
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(x, P(None, sharding_lib.BATCH_AXES))

  def merge(x):  # the inverse of split: [k, B / k, ...] -> [B, ...] in global row order
    x = jnp.swapaxes(x, 0, 1)
    x = x.reshape((x.shape[0] * k,) + x.shape[2:])
    return jax.lax.with_sharding_constraint(x, P(sharding_lib.BATCH_AXES))

  def accumulated_grads(params, batch, rng):
    """Mean loss / metrics / grads over micro-batches: exact for means over examples."""
    micro = jax.tree.map(split, batch)

    def body(carry, inputs):
      index, micro_batch = inputs
      out = grad_fn(params, micro_batch, rng, index)
      return jax.tree.map(jnp.add, carry, out), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, first, rng, 0))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    return jax.tree.map(lambda x: x / k, total)

  def features_fn(params, micro_batch, rng, index):
    return model.apply({"params": params}, micro_batch, train=True, method="features",
                       rngs=rngs(rng, index))

  def global_features(params, batch, rng):
    """Every micro-batch's features, activations dropped, as one global-batch tree."""
    def body(_, inputs):
      index, micro_batch = inputs
      return None, jax.lax.stop_gradient(features_fn(params, micro_batch, rng, index))
    _, features = jax.lax.scan(body, None, (jnp.arange(k), jax.tree.map(split, batch)))
    return jax.tree.map(merge, features)

  def cached_grads(params, batch, rng):
    """The global batch's loss and gradient, one micro-batch of activations at a time.

    GradCache: (1) embed every micro-batch without keeping activations; (2) the loss of
    the global batch from its features, and its gradient w.r.t. the params it uses
    directly (temperature, bias) and w.r.t. the features; (3) per micro-batch, recompute
    the features and pull their gradient back through the encoders (a VJP).
    """
    features = global_features(params, batch, rng)
    if hasattr(model, "feature_context"):
      context = model.apply({"params": params}, features, batch, method="feature_context",
                            rngs=rngs(rng))
      if context:  # e.g. ITM negatives from the global batch: features read them
        batch = dict(batch, **jax.lax.stop_gradient(context))
        features = global_features(params, batch, rng)

    def global_loss(params, features):
      loss, metrics = model.apply({"params": params}, features, train=True,
                                  method="loss_from_features", rngs=rngs(rng))
      return loss.astype(jnp.float32), metrics
    (loss, metrics), (grads, feature_grads) = jax.value_and_grad(
        global_loss, argnums=(0, 1), has_aux=True)(params, features)

    def body(grads, inputs):
      index, micro_batch, micro_grads = inputs
      _, pull_back = jax.vjp(lambda p: features_fn(p, micro_batch, rng, index), params)
      return jax.tree.map(jnp.add, grads, pull_back(micro_grads)[0]), None
    micro = (jnp.arange(k), jax.tree.map(split, batch), jax.tree.map(split, feature_grads))
    grads, _ = jax.lax.scan(body, grads, micro)
    return (loss, metrics), grads

  exact = hasattr(model, "features") and hasattr(model, "loss_from_features")

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    batch = dict(batch, example_id=jnp.arange(next(iter(batch.values())).shape[0]))
    if k == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, rng)
    elif exact:
      (loss, metrics), grads = cached_grads(state.params, batch, rng)
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
    # One cond, not a select per leaf: the same step time, less temporary memory and
    # less compile time.
    params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o),
                                     state.params, state.opt_state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                   finite=finite)
    metrics[GRADS_FINITE] = {name: jnp.isfinite(sq) for name, sq in
                             traverse_util.flatten_dict(squares, sep="/").items()}
    return new_state, metrics

  return train_step
