"""What an objective of the multimodal model is, and the helpers the built-in ones share.

An objective is a small stateless class registered by name in `mmjax.registry.OBJECTIVES`.
`MultimodalModel` runs those that its `loss_weights` names (and those they `need`); its
total loss is the weighted sum of their losses. Every method receives the bound model:
its fields configure the objective (`num_answers`, `mlm_rate`, ...) and its encoders
serve it (`model.encode`, `model.pooled`, `model.memory`, `model.embed_image`, ...).

  needs                 objectives whose features this one reads (ITM reads ITC's
                        embeddings); they run, and are logged, even at weight 0
  check(model)          raises ValueError for settings this objective cannot use
  inputs(model)         batch keys it tokenizes and fuses (modalities)
  targets(model)        the other batch keys it reads (labels, answers)
  heads(model)          {name: module} the model creates in its setup under these names:
                        they are parameter names, which checkpoints and converters address
  features(model, batch, run)
                        per-example arrays [B, ...]: embeddings, per-example losses, token
                        sums, correctness; everything `loss` and `summarize` read
  context(model, features, batch, key)
                        per-example batch entries drawn from the global batch's features
                        (ITM's hard negatives); the trainer adds them and recomputes features
  loss(model, features) (this objective's loss over the whole batch, other logged metrics);
                        logged as `{name}_loss` beside them
  summarize(outputs)    the evaluation summary from the whole split's features; {} when
                        they are absent (the model asks every registered objective)

`combines(model)` says whether its head reads `fused_pooled`, the model's modalities
combined by the model's `combiner` (vqa over answers, classify); and, for objectives that
write text (caption, generated VQA): `generates(model)`,
`max_len(model)`, `memory(model, batch, train)` and `logits(model, tokens, memory, mask,
...)`, which `multimodal.generate_text` decodes with.

The split into `features` and `loss` keeps gradient accumulation exact (see
mmjax/models/base.py): a loss over the batch must be computed in `loss` from per-example
features (e.g. token-weighted means as sums of nll and of tokens), never inside `features`.
"""
import abc
import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import losses, metrics
from mmjax.models import heads

Array = jax.Array
Batch = Mapping[str, Array]


@dataclasses.dataclass
class FeaturePass:
  """One `features` call, shared by the objectives it runs in turn."""
  train: bool
  key: Optional[Array]  # the call's "sample" key (None in evaluation); objectives fold in a tag
  features: Dict[str, Array] = dataclasses.field(default_factory=dict)  # earlier objectives'
  cache: Dict[str, Any] = dataclasses.field(default_factory=dict)  # encoder passes to share


class Objective(abc.ABC):
  """The defaults: no heads, no context, nothing generated (see the module docstring).
  A subclass must define inputs, features, loss and summarize."""
  needs: Tuple[str, ...] = ()

  def check(self, model) -> None:
    del model

  @abc.abstractmethod
  def inputs(self, model) -> Tuple[str, ...]:
    """Batch keys it tokenizes and fuses (modalities)."""

  def targets(self, model) -> Tuple[str, ...]:
    del model
    return ()

  def heads(self, model) -> Dict[str, nn.Module]:
    del model
    return {}

  @abc.abstractmethod
  def features(self, model, batch: Batch, run: FeaturePass) -> Dict[str, Array]:
    """Per-example arrays [B, ...] that `loss` and `summarize` read."""

  def context(self, model, features: Mapping[str, Array], batch: Batch,
              key: Optional[Array]) -> Dict[str, Array]:
    del model, features, batch, key
    return {}

  @abc.abstractmethod
  def loss(self, model, features: Mapping[str, Array]) -> Tuple[Array, Dict[str, Array]]:
    """(This objective's loss over the whole batch, other logged metrics)."""

  @staticmethod
  @abc.abstractmethod
  def summarize(outputs: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """The evaluation summary from the whole split's features ({} when absent)."""

  def generates(self, model) -> bool:
    del model
    return False

  def combines(self, model) -> bool:
    del model
    return False


# ---------------------------------------------------------------- shared by objectives

def classifier(model, num_classes: int) -> heads.ClassifierHead:
  """The model's classifier head (linear, or one GELU hidden layer: `head_hidden_dim`)."""
  return heads.ClassifierHead(num_classes, model.head_hidden_dim, model.head_zeroinit,
                              jnp.dtype(model.dtype))


def fused_pooled(model, batch: Batch, run: FeaturePass) -> Array:
  """The model's `modalities` fused, pooled per modality and combined [B, D']: one encoder
  pass serves every head that classifies them (vqa and classify)."""
  if "fused_pooled" not in run.cache:
    run.cache["fused_pooled"] = model.pooled(batch, model.modalities, train=run.train)
  return run.cache["fused_pooled"]


def classification_features(name: str, logits: Array, labels: Array) -> Dict[str, Array]:
  return {f"{name}_nll": losses.cross_entropy(logits, labels),
          f"{name}_correct": metrics.correct(logits, labels)}


def classification_loss(name: str, features: Mapping[str, Array]
                        ) -> Tuple[Array, Dict[str, Array]]:
  """The mean cross-entropy, and the accuracy logged as `{name}_accuracy`."""
  return (jnp.mean(features[f"{name}_nll"]),
          {f"{name}_accuracy": jnp.mean(features[f"{name}_correct"])})


def accuracy_summary(name: str, outputs: Mapping[str, np.ndarray]) -> Dict[str, float]:
  if f"{name}_correct" not in outputs:
    return {}
  return {f"{name}_accuracy": float(np.mean(outputs[f"{name}_correct"]))}


def token_features(name: str, logits: Array, targets: Array) -> Dict[str, Array]:
  """Per-example token statistics (nll_sum, correct_tokens, num_tokens), prefixed."""
  return {f"{name}_{k}": v for k, v in metrics.token_statistics(logits, targets).items()}


def token_loss(name: str, features: Mapping[str, Array]) -> Tuple[Array, Dict[str, Array]]:
  """The nll per token over the whole batch (not a mean of per-example means)."""
  return (jnp.sum(features[f"{name}_nll_sum"])
          / jnp.maximum(jnp.sum(features[f"{name}_num_tokens"]), 1)), {}


def token_summary(name: str, outputs: Mapping[str, np.ndarray]) -> Dict[str, float]:
  if f"{name}_num_tokens" not in outputs:
    return {}
  stats = {k: outputs[f"{name}_{k}"] for k in ("nll_sum", "correct_tokens", "num_tokens")}
  return {f"{name}_{k}": v for k, v in metrics.summarize_tokens(stats).items()}
