"""Zero-shot classification as an evaluation: class-name prompts vs images (CLIP's recipe).

Switched on by `config.zeroshot.enabled` for a model with `class_embeddings` and
`zero_shot_logits` (two_tower, multimodal with the itc objective). Each class name fills
every prompt template ("a photo of a {}."); the prompts are tokenised with the tokenizer
of the model's own training data (`config.data`), embedded, L2-normalised and averaged
per class (prompt ensemble); each image of the classification dataset's eval split is
assigned its most similar class. Logs eval/zeroshot_accuracy over the whole split
(padding rows excluded) and eval/zeroshot_chance (1 / classes).

`config.zeroshot.data` names the classification dataset (any config.data: digits,
cifar10, image_folder, ...); left empty it is `config.data` itself. Its images must be
the size the model takes (set its `image_size`).
"""
import importlib
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.train import evaluate as evaluate_lib
from mmjax.train import sharding as sharding_lib
from mmjax.train import text_eval


def prompt_tokens(tokenizer, classes, prompts, max_len: int):
  """Token ids and mask [C, P, max_len] of every (class, template) pair."""
  pairs = [[tokenizer.encode_with_mask(p.format(c), max_len) for p in prompts] for c in classes]
  ids = np.array([[ids for ids, _ in row] for row in pairs], np.int32)
  mask = np.array([[m for _, m in row] for row in pairs], bool)
  return ids, mask


class ZeroShotEvaluator:
  """Callable(params, step) -> {'zeroshot_accuracy', 'zeroshot_chance'}."""

  def __init__(self, config: ml_collections.ConfigDict, model, param_shardings: Any, mesh):
    from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
    zs = config.zeroshot
    text_eval.check_config(zs, config_lib.default_config().zeroshot, "config.zeroshot")
    for method in ("class_embeddings", "zero_shot_logits"):
      if not hasattr(model, method):
        raise ValueError(f"config.zeroshot.enabled, but model {config.model.name!r} has no "
                         f"{method}() (two_tower and multimodal do).")
    if not zs.prompts or any("{}" not in p for p in zs.prompts):
      raise ValueError(f"config.zeroshot.prompts must be templates with '{{}}' for the class "
                       f"name; got {tuple(zs.prompts)}.")
    pipeline = importlib.import_module(config.data_pipeline)
    self.data = zs.data if zs.data.get("name") else config.data
    if (self.data.get("image_normalization") is None
        and config.data.get("image_normalization") is not None):  # the model's pixels
      self.data = ml_collections.ConfigDict(
          dict(self.data.to_dict(), image_normalization=config.data.image_normalization))
    classes = list(zs.classes) or pipeline.dataset_info(self.data).get("classes")
    if not classes:
      raise ValueError(f"Dataset {self.data.name!r} names no classes; set "
                       "config.zeroshot.classes.")
    tokenizer = pipeline.data_tokenizer(config.data)  # the text the model was trained on
    ids, mask = prompt_tokens(tokenizer, classes, zs.prompts, config.data.max_text_len)
    self.prompts = (jnp.asarray(ids), jnp.asarray(mask) if tokenizer.pad_is_token else None)
    self.num_classes, self.mesh = len(classes), mesh
    self.make_iter = lambda: pipeline.create_eval_iterator(
        self.data, global_batch_size=config.eval_batch_size)
    self.class_fn = jax.jit(lambda params, t, m: model.apply(
        {"params": params}, t, m, method="class_embeddings"))
    self.logits_fn = jax.jit(
        lambda params, batch, classes_: model.apply(
            {"params": params}, batch, classes_, method="zero_shot_logits"),
        in_shardings=(param_shardings, sharding_lib.batch_sharding(mesh),
                      sharding_lib.replicated(mesh)))

  def __call__(self, params, step: int) -> Dict[str, float]:
    del step
    classes = self.class_fn(params, *self.prompts)
    correct = total = 0
    for local in self.make_iter():
      if "label" not in local:
        raise ValueError(f"Zero-shot data {self.data.name!r} has no 'label'; got "
                         f"{sorted(local)}.")
      batch = sharding_lib.global_batch(
          {k: local[k] for k in ("image", "label", "valid")}, self.mesh)
      logits, label, valid = evaluate_lib.to_host(
          (self.logits_fn(params, {"image": batch["image"]}, classes), batch["label"],
           batch["valid"]))
      valid = np.asarray(valid, bool)
      correct += int(np.sum((np.argmax(logits, -1) == np.asarray(label))[valid]))
      total += int(valid.sum())
    return {"zeroshot_accuracy": correct / max(total, 1), "zeroshot_chance": 1 / self.num_classes}
