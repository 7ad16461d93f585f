"""Caption scores as the COCO caption evaluation (`pycocoevalcap`) computes them.

`caption_scores(predictions, references)` tokenises every caption with the toolkit's PTB
tokenisation (`ptb_tokenizer.tokenize`), then computes, over the whole corpus:

- `bleu1`..`bleu4`: corpus BLEU with the toolkit's "closest" reference length per
  caption and its smoothing constants (1e-15 / 1e-9);
- `rouge_l`: ROUGE-L F-measure (beta 1.2) against the best-matching reference, averaged
  over images;
- `cider`: CIDEr-D as the toolkit computes it: n = 1..4, TF-IDF with document
  frequencies over the references of *this* corpus (so the score depends on the whole
  split, not on one image), clipped n-gram counts, a Gaussian length penalty
  (sigma 6) and a factor of 10;
- `meteor` and `spice` when Java and `pycocoevalcap` are installed: these are Java
  programs shipped inside `pycocoevalcap`, run as the toolkit runs them. SPICE also needs
  the Stanford CoreNLP 3.6.0 jars the toolkit downloads once
  (`python -m pycocoevalcap.spice.get_stanford_models`); without them `spice` is left out.

BLEU, ROUGE-L and CIDEr-D are re-implemented here (no Java, no extra dependency) and
tested to equal the toolkit's scorers on the same tokenised inputs.
"""
import collections
import functools
import logging
import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from mmjax.metrics import ptb_tokenizer

Ngrams = collections.Counter


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                   *, tokenizer: str = "auto", java_metrics: bool = True
                   ) -> Dict[str, float]:
  """COCO caption metrics of one generated caption per image against its references.

  Args:
    predictions: one generated caption per image.
    references: for each image, one or more human captions.
    tokenizer: 'auto' (Java PTB tokenizer if available, else the Python one), 'java' or
      'python'; see `mmjax.metrics.ptb_tokenizer`.
    java_metrics: add METEOR and SPICE when Java can run them (their Java programs take
      ~10 s to start, so a quick in-training evaluation may turn them off).

  Returns:
    {'bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l', 'cider'} plus 'meteor' and 'spice'
    when Java can run them; scores in [0, 1] except CIDEr-D (in [0, 10]).
  """
  if len(predictions) != len(references):
    raise ValueError(f"caption_scores needs one prediction per image: got {len(predictions)} "
                     f"predictions and {len(references)} reference lists.")
  if not predictions:
    raise ValueError("caption_scores needs at least one image; got none.")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError(f"references[{i}] must be a non-empty list of captions; got {refs!r}.")
  flat = list(predictions) + [r for refs in references for r in refs]
  tokens = ptb_tokenizer.tokenize(flat, tokenizer)
  hyps, refs, pos = tokens[:len(predictions)], [], len(predictions)
  for r in references:
    refs.append(tokens[pos:pos + len(r)])
    pos += len(r)
  scores = dict(zip(("bleu1", "bleu2", "bleu3", "bleu4"), bleu(hyps, refs)))
  scores["rouge_l"] = rouge_l(hyps, refs)
  scores["cider"] = cider_d(hyps, refs)
  if java_metrics and ptb_tokenizer.java_tokenizer_jar() is not None:
    scores.update(_java_scores(hyps, refs))
  return scores


def _ngrams(caption: str, n: int = 4) -> Ngrams:
  words = caption.split()
  return Ngrams(tuple(words[i:i + k]) for k in range(1, n + 1)
                for i in range(len(words) - k + 1))


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> List[float]:
  """Corpus BLEU-1..n of tokenised captions, as the toolkit's BleuScorer('closest')."""
  tiny, small = 1e-15, 1e-9  # the toolkit's constants: 0 matches give ~0, not NaN
  correct, guess = [0] * n, [0] * n
  hyp_len = ref_len = 0
  for hyp, rs in zip(hyps, refs):
    length = len(hyp.split())
    ref_lengths = [len(r.split()) for r in rs]
    max_counts = collections.Counter()
    for r in rs:
      max_counts |= _ngrams(r, n)  # `|` keeps the maximum count per n-gram
    for gram, count in _ngrams(hyp, n).items():
      correct[len(gram) - 1] += min(max_counts[gram], count)
    for k in range(n):
      guess[k] += max(0, length - k)
    hyp_len += length
    ref_len += min((abs(l - length), l) for l in ref_lengths)[1]  # closest, ties -> shorter
  scores, product = [], 1.0
  for k in range(n):
    product *= (correct[k] + tiny) / (guess[k] + small)
    scores.append(product ** (1.0 / (k + 1)))
  ratio = (hyp_len + tiny) / (ref_len + small)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
  row = [0] * (len(b) + 1)
  for x in a:
    prev_diag = 0
    for j, y in enumerate(b, start=1):
      prev_diag, row[j] = row[j], (prev_diag + 1 if x == y else max(row[j], row[j - 1]))
  return row[-1]


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
  """Mean over images of ROUGE-L F (best precision and recall over the references)."""
  scores = []
  for hyp, rs in zip(hyps, refs):
    h = hyp.split(" ")  # split(" ") as the toolkit does: "" is one (empty) token
    precision = recall = 0.0
    for r in rs:
      rt = r.split(" ")
      common = _lcs(rt, h)
      precision = max(precision, common / len(h))
      recall = max(recall, common / len(rt))
    if precision and recall:
      scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    else:
      scores.append(0.0)
  return float(np.mean(scores))


def cider_d(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> float:
  """CIDEr-D of tokenised captions with corpus-level IDF, as the toolkit's CiderScorer."""
  hyp_grams = [_ngrams(h, n) for h in hyps]
  ref_grams = [[_ngrams(r, n) for r in rs] for rs in refs]
  doc_freq = collections.Counter(g for rs in ref_grams for g in set().union(*rs))
  log_num_docs = np.log(float(len(refs)))

  def tfidf(grams: Ngrams) -> Tuple[List[Dict], List[float], int]:
    vec, norm, length = [{} for _ in range(n)], [0.0] * n, 0
    for gram, tf in grams.items():
      k = len(gram) - 1
      vec[k][gram] = float(tf) * (log_num_docs - np.log(max(1.0, doc_freq[gram])))
      norm[k] += vec[k][gram] ** 2
      if k == 1:  # the toolkit measures length in bigrams; reproduced for equal scores
        length += tf
    return vec, [np.sqrt(x) for x in norm], length

  scores = []
  for hyp, rs in zip(hyp_grams, ref_grams):
    vh, nh, lh = tfidf(hyp)
    total = np.zeros(n)
    for r in rs:
      vr, nr, lr = tfidf(r)
      penalty = np.e ** (-(float(lh - lr) ** 2) / (2 * sigma**2))
      for k in range(n):
        sim = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
        if nh[k] != 0 and nr[k] != 0:
          sim /= nh[k] * nr[k]
        total[k] += sim * penalty
    scores.append(np.mean(total) / len(rs) * 10.0)
  return float(np.mean(scores))


@functools.lru_cache(maxsize=1)
def _spice_models_present() -> bool:
  return os.path.exists(os.path.join(ptb_tokenizer.pycocoevalcap_dir(), "spice", "lib",
                                     "stanford-corenlp-3.6.0.jar"))


def _java_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> Dict[str, float]:
  """METEOR and SPICE through the toolkit's own Java programs (same inputs it gives them)."""
  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.meteor.meteor import Meteor
  gts = {i: list(r) for i, r in enumerate(refs)}
  res = {i: [h] for i, h in enumerate(hyps)}
  meteor = Meteor()
  try:
    out = {"meteor": float(meteor.compute_score(gts, res)[0])}
  finally:
    del meteor
  if _spice_models_present():
    from pycocoevalcap.spice.spice import Spice
    out["spice"] = float(Spice().compute_score(gts, res)[0])
  else:
    logging.warning("SPICE left out: it needs the Stanford CoreNLP 3.6.0 jars; fetch them "
                    "once with `python -m pycocoevalcap.spice.get_stanford_models`.")
  return out
