"""Evaluation that generates: captions and answers decoded on the eval split, scored as papers do.

Switched on by `config.generation.decode` ("greedy" or "beam") for a model with
`generation_tasks()` (the captioning model; the multimodal model with the caption
objective or `vqa_mode="generate"`). At every evaluation it

  1. decodes every example of the eval split: jitted, with the batch sharded over the
     mesh like the rest of evaluation, one compilation per task;
  2. turns the ids into text with the data's own tokenizer and scores them against the
     dataset's references (`Dataset.references`): captions with `caption_scores`
     (eval/cider, eval/bleu1..4, eval/rouge_l; eval/meteor, eval/spice when
     `java_metrics` and Java are there), answers with the official `vqa_accuracy`
     (eval/vqa_accuracy);
  3. scores the baseline a constant predictor gets: the most frequent reference caption /
     answer of the eval split predicted for every example (eval/baseline_*; an optimistic
     baseline: it has seen the eval split's references);
  4. writes DIR/predictions/STEP.jsonl, one line per example: {"id": position in the
     split, "task", "prediction", "references"}, and logs its cost
     (eval/generation_seconds, eval/generation_examples_per_s).
"""
import collections
import functools
import importlib
import json
import os
import time
from typing import Any, Callable, Dict, List, Mapping

import jax
import ml_collections
import numpy as np

from mmjax import metrics
from mmjax.train import evaluate as evaluate_lib
from mmjax.train import paths
from mmjax.train import sharding as sharding_lib

DECODE = ("greedy", "beam")
SCORE_NAMES = (("cider", "CIDEr"), ("bleu4", "BLEU-4"), ("rouge_l", "ROUGE-L"),
               ("meteor", "METEOR"), ("spice", "SPICE"), ("vqa_accuracy", "VQA accuracy"))


def check_config(section: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict,
                 where: str) -> None:
  unknown = sorted(set(section.keys()) - set(defaults.keys()))
  if unknown:
    raise ValueError(f"Unknown {where} keys {unknown}; valid keys: {sorted(defaults.keys())}.")


def decode_ids(tokenizer, ids: np.ndarray) -> str:
  """Generated ids (0 after the end) -> text. Ids past the tokenizer's vocabulary (a model
  may have more rows than the data's vocabulary; an untrained one emits them) are dropped."""
  ids = np.asarray(ids)
  end = np.flatnonzero(ids == 0)
  ids = ids[:end[0]] if end.size else ids
  # A model vocabulary larger than the tokenizer's (e.g. an EOS id after it) can emit ids
  # the tokenizer has no piece for; they decode to nothing instead of failing.
  return tokenizer.decode(ids[ids < tokenizer.vocab_size])


def most_frequent(references: List[List[str]]) -> str:
  counts = collections.Counter(r for refs in references for r in refs)
  return max(counts, key=lambda r: (counts[r], r))  # ties: a fixed choice


def score(task: str, predictions: List[str], references: List[List[str]],
          java_metrics: bool) -> Dict[str, float]:
  if task == "caption":
    return metrics.caption_scores(predictions, references, java_metrics=java_metrics)
  return {"vqa_accuracy": metrics.vqa_accuracy(predictions, references)}


class GenerationEvaluator:
  """Callable(params, step) -> {metric: value}; built once per run (compiles lazily)."""

  def __init__(self, config: ml_collections.ConfigDict, model, param_shardings: Any, mesh,
               workdir: str, make_eval_iter: Callable):
    from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
    gen = config.generation
    check_config(gen, config_lib.default_config().generation, "config.generation")
    if gen.decode not in DECODE:
      raise ValueError(f"config.generation.decode={gen.decode!r}; expected one of {DECODE} "
                       "(or '' for no generation).")
    tasks = model.generation_tasks() if hasattr(model, "generation_tasks") else ()
    if not tasks:
      raise ValueError(f"config.generation.decode={gen.decode!r}, but model "
                       f"{config.model.name!r} generates no text (it needs generation_tasks(): "
                       "the caption objective, or vqa_mode='generate').")
    self.tasks, self.gen, self.mesh = tasks, gen, mesh
    self.workdir, self.make_eval_iter = workdir, make_eval_iter
    pipeline = importlib.import_module(config.data_pipeline)
    self.tokenizer = pipeline.data_tokenizer(config.data)
    dataset = pipeline.get_dataset(config.data)
    split = config.data.get("eval_split") or dataset.default_eval_split
    self.references = {t: dataset.references(split, t) for t in tasks}
    beam = gen.beam_size if gen.decode == "beam" else None
    batch_sharding = sharding_lib.batch_sharding(mesh)
    self.steps = {
        t: jax.jit(functools.partial(_generate, model, task=t, beam_size=beam,
                                     max_len=gen.max_len or None,
                                     length_penalty=gen.length_penalty),
                   in_shardings=(param_shardings, batch_sharding))
        for t in tasks}
    self.baseline = {}
    for t in tasks:
      constant = most_frequent(self.references[t])
      scores = score(t, [constant] * len(self.references[t]), self.references[t],
                     java_metrics=False)
      self.baseline.update({f"baseline_{k}": v for k, v in scores.items()})
    _register_summary_hook()

  def __call__(self, params, step: int) -> Dict[str, float]:
    start = time.perf_counter()
    rows = {t: [] for t in self.tasks}  # (index, prediction)
    for local in self.make_eval_iter():
      batch = sharding_lib.global_batch(local, self.mesh)
      out = evaluate_lib.to_host(({t: fn(params, batch) for t, fn in self.steps.items()},
                      batch["valid"], batch["index"]))
      tokens, valid, index = out
      for t in self.tasks:
        ids = np.asarray(tokens[t])
        for r in np.flatnonzero(np.asarray(valid, bool)):
          rows[t].append((int(index[r]), decode_ids(self.tokenizer, ids[r])))
    seconds = time.perf_counter() - start
    results = dict(self.baseline)
    lines = []
    for t in self.tasks:
      refs = [self.references[t][i] for i, _ in rows[t]]
      preds = [p for _, p in rows[t]]
      results.update(score(t, preds, refs, self.gen.java_metrics))
      lines += [{"id": i, "task": t, "prediction": p, "references": r}
                for (i, p), r in zip(rows[t], refs)]
    count = sum(len(v) for v in rows.values())
    results.update(generation_seconds=seconds, generation_examples_per_s=count / seconds)
    if self.gen.predictions and jax.process_index() == 0:
      write_predictions(self.workdir, step, lines)
    return results


def _generate(model, params, batch, *, task, beam_size, max_len, length_penalty):
  return model.generate({"params": params}, batch, task=task, beam_size=beam_size,
                        max_len=max_len, length_penalty=length_penalty)


def write_predictions(workdir: str, step: int, lines: List[Mapping[str, Any]]) -> str:
  """DIR/predictions/STEP.jsonl (replaced atomically: `paths.write_text`)."""
  path = os.path.join(workdir, "predictions", f"{step}.jsonl")
  paths.write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
  return path


def format_text_summary(results: Mapping[str, Any]) -> str:
  """Generated-text scores next to the most-frequent-reference baseline ("" if none)."""
  rows = [(name, results[f"eval/{k}"], results.get(f"eval/baseline_{k}"))
          for k, name in SCORE_NAMES if f"eval/{k}" in results and
          f"eval/baseline_{k}" in results]
  if not rows:
    return ""
  lines = ["", "=== generated text vs. a constant baseline (the most frequent reference) ==="]
  lines += [f"  {name:<14}{value:>8.3f}   baseline {base:.3f}" for name, value, base in rows]
  if "eval/generation_seconds" in results:
    lines.append(f"  decoding took {results['eval/generation_seconds']:.1f} s "
                 f"({results['eval/generation_examples_per_s']:.1f} examples/s)")
  return "\n".join(lines)


def _summary_hook(results, config, workdir) -> str:
  del config, workdir
  return format_text_summary(results)


def _register_summary_hook() -> None:
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top  (trainer imports us)
  if _summary_hook not in trainer.SUMMARY_HOOKS:
    trainer.SUMMARY_HOOKS.append(_summary_hook)
