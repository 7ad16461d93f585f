"""Exact evaluation over a whole held-out split.

The eval pipeline pads the last batch and marks real rows with `valid`; every process
evaluates its rows of each global batch under the same jit as training, the per-example
outputs of the model's `evaluate` are gathered to the host, padding rows dropped, and the
model's own `summarize` turns the whole split into metrics (accuracy, recall@K, ...).
Nothing is averaged per batch, so the numbers are exact for any batch size, with one
exception: image-text matching (ITM) scores each pair against its hardest wrong partner
*within the eval batch* (padding rows are never partners), so a larger eval batch gives
harder negatives and a lower ITM accuracy; compare ITM only at equal eval_batch_size.
MLM masks are drawn per example (keyed by the example's `index`), so MLM numbers do not
depend on the batch.

Evaluations the config switches on run after it, over the same split and mesh
(`make_extra_evaluators`): text generation scored with caption / VQA metrics
(text_eval.py, `config.generation`) and zero-shot classification (zeroshot.py,
`config.zeroshot`).
"""
import collections
from typing import Any, Callable, Dict, Iterable, List, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mmjax.train import sharding as sharding_lib


def make_eval_step(model: nn.Module, param_shardings: Any, mesh: Mesh) -> Callable:
  """jit(params, batch) -> per-example outputs of `model.evaluate`."""
  def eval_step(params, batch):
    return model.apply({"params": params}, batch, method="evaluate")
  return jax.jit(eval_step, in_shardings=(param_shardings, sharding_lib.batch_sharding(mesh)))


def to_host(tree: Any) -> Any:
  """Global arrays -> full numpy arrays on every process."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def evaluate(model: nn.Module, eval_step: Callable, params: Any,
             batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh) -> Dict[str, float]:
  """Runs the model over every batch of `batches` and summarises the valid rows."""
  outputs = collections.defaultdict(list)
  num_examples = 0
  for local_batch in batches:
    if "valid" not in local_batch:
      raise ValueError(f"Eval batches need a boolean 'valid' key marking real rows; got keys "
                       f"{sorted(local_batch)}.")
    batch = sharding_lib.global_batch(local_batch, mesh)
    out, valid = to_host((eval_step(params, batch), batch["valid"]))
    valid = np.asarray(valid, bool)
    num_examples += int(valid.sum())
    for key, value in out.items():
      value = np.asarray(value)
      if value.ndim == 0 or value.shape[0] != valid.shape[0]:
        raise ValueError(f"model.evaluate output {key!r} has shape {value.shape}; expected a "
                         f"leading batch axis of {valid.shape[0]}.")
      outputs[key].append(value[valid])
  if not num_examples:
    raise ValueError("The eval split produced no valid examples.")
  summary = type(model).summarize({k: np.concatenate(v) for k, v in outputs.items()})
  summary = {k: float(v) for k, v in summary.items()}
  summary["num_examples"] = num_examples
  return summary


def make_extra_evaluators(config, model: nn.Module, param_shardings: Any, mesh: Mesh,
                          workdir: str, make_eval_iter: Callable) -> List[Callable]:
  """The config's extra evaluations, each a callable(params, step) -> {metric: value}."""
  # pylint: disable=g-import-not-at-top  (they import this module)
  from mmjax.train import text_eval, zeroshot
  extra = []
  if config.get("generation") is not None and config.generation.decode:
    extra.append(text_eval.GenerationEvaluator(config, model, param_shardings, mesh, workdir,
                                               make_eval_iter))
  if config.get("zeroshot") is not None and config.zeroshot.enabled:
    extra.append(zeroshot.ZeroShotEvaluator(config, model, param_shardings, mesh))
  return extra
