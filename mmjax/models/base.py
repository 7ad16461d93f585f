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

Randomness: rng stream "dropout" (dropout, stochastic depth) and "sample" (e.g. masking
for masked-language modelling); both are given in training only.

Batches are dicts of arrays; see `mmjax.data` for the keys and their meaning.
"""
from typing import Any, Dict, Mapping

import flax.linen as nn
import jax
import numpy as np

from mmjax.errors import ConfigError
from mmjax.registry import MODELS


class Model(nn.Module):
  """Optional base class with the default `evaluate` / `summarize`; subclasses define `loss`."""

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
