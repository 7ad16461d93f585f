"""The contract between models and the trainer; read this before writing a model.

A model is a `flax.linen.Module` registered by name in `mmjax.registry.MODELS` and built
by `build_model(config.model)`: every field of `config.model` except `name` is a dataclass
field of the module, so the config documents the model and vice versa.

The trainer never special-cases a model. It only calls, through `model.apply`:

  loss, metrics = model.apply(variables, batch, train=True, method="loss",
                              rngs={"dropout": k1, "sample": k2})
      `loss` a float32 scalar, `metrics` a dict of float32 scalars (logged as given).
  outputs = model.apply(variables, batch, method="evaluate")
      a dict of per-example arrays (leading axis = batch), e.g. correctness or embeddings.
  summary = type(model).summarize(outputs)
      called once per evaluation with numpy arrays concatenated over the whole split,
      padding rows already removed; returns a dict of python floats (recall@K, accuracy..).

and initialises with `model.init(rngs, batch, train=False, method="loss")`.

Exact gradient accumulation (optional; every built-in model with a contrastive loss has
it). A model whose loss couples examples (CLIP / SigLIP compare every image with every
text of the global batch) splits its loss in two:

  features = model.apply(variables, batch, train=True, method="features", rngs=...)
      per-example float arrays (leading axis = batch): embeddings, per-example losses
      (e.g. a VQA cross-entropy), token sums, correctness; everything the loss reads.
  loss, metrics = model.apply(variables, features, train=True, method="loss_from_features")
      the loss of the whole batch from its features: cheap, no encoder runs here.

and `Model.loss` is then their composition. With `grad_accum_steps=K` the trainer embeds
all K micro-batches without keeping activations, takes the loss and its gradient with
respect to the features of the global batch, and backpropagates those through the
encoders micro-batch by micro-batch (the GradCache method): the gradient of the global
batch, with about one micro-batch of activations in memory. A model may also define

  context = model.apply(variables, features, batch, method="feature_context", rngs=...)
      extra per-example batch entries computed from the global batch's features without
      gradient (e.g. ITM's hard negatives, drawn from the global similarities); the
      trainer then adds them to the batch and computes the features again.

Models without `features` accumulate by averaging micro-batch gradients: exact for
losses that are means over examples.

Per-example randomness (MLM masks, ITM negatives) is keyed by `example_ids(batch)`, so
it does not depend on how the batch is split: in training the trainer adds
`example_id` [B] int32 (the row's index in the global batch); evaluation falls back to
the data's `index` (the example's index in its split), else the row.

Randomness: rng stream "dropout" (dropout, stochastic depth) and "sample" (e.g. masking
for masked-language modelling); both are given in training only.

Position tables: a model with learned position embeddings over a patch grid says how
each is laid out, `model.position_grids(batch) -> {param name: PositionGrid(prefix_tokens,
height, width)}` for the grids it uses on `batch` (shapes only). `init_from` resamples
exactly these tables (`mmjax.nn.embed.resample_posemb`) when a checkpoint's grid differs.

Batches are dicts of arrays; see `mmjax.data` for the keys and their meaning.
"""
from typing import Any, Dict, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.nn.embed import PositionGrid
from mmjax.registry import MODELS


def example_ids(batch: Mapping[str, Any]) -> jnp.ndarray:
  """Per-example ids [B] for per-example randomness (see the module docstring)."""
  for key in ("example_id", "index"):
    if key in batch:
      return jnp.asarray(batch[key], jnp.int32)
  first = next(iter(batch.values()))
  return jnp.arange(first.shape[0], dtype=jnp.int32)


class Model(nn.Module):
  """Optional base class with the default `loss` / `evaluate` / `summarize`; subclasses
  define `loss`, or `features` and `loss_from_features`."""

  def loss(self, batch: Mapping[str, Any], train: bool = False):
    return self.loss_from_features(self.features(batch, train=train), train=train)

  def evaluate(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
    """Default: `loss` and its metrics computed on each example alone, as [B] arrays, so
    the split's mean is exact for any batch size and ignores padding rows. A model whose
    loss compares examples with each other (contrastive, hard negatives) defines its own."""
    def one(model, example):
      loss, metrics = model.loss(jax.tree.map(lambda x: x[None], example), train=False)
      return {"loss": loss, **metrics}
    per_example = nn.vmap(one, variable_axes={"params": None}, split_rngs={"params": False})
    return per_example(self, dict(batch))

  @staticmethod
  def summarize(outputs: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """Default: the mean of every per-example output."""
    return {k: float(np.mean(v)) for k, v in outputs.items()}

  @nn.nowrap  # plain arithmetic: callable on an unbound model
  def position_grids(self, batch: Mapping[str, Any]) -> Dict[str, PositionGrid]:
    """{flat param name ('a/b/pos_embedding'): PositionGrid} of the learned position
    tables this model uses on `batch` (arrays or ShapeDtypeStructs). Default: none."""
    del batch
    return {}


def build_model(model_config) -> nn.Module:
  """Builds the registered model `model_config.name` with the other fields as arguments."""
  fields = dict(model_config)
  name = fields.pop("name", None)
  if name is None:
    raise ConfigError(f"config.model needs a `name`; expected one of {MODELS.names()}.")
  cls = MODELS.get(name)
  valid = set(getattr(cls, "__dataclass_fields__", {})) - {"parent", "name"}
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ConfigError(
        f"Unknown config.model fields {unknown} for model {name!r}; valid fields: {sorted(valid)}.")
  fields = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in fields.items()}
  return cls(**fields)
