"""caption_scores against the COCO caption evaluation toolkit (pycocoevalcap) on the same inputs."""
import shutil

import numpy as np
import pytest

from mmjax import metrics
from mmjax.metrics import captions, ptb_tokenizer

pycocoevalcap = pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402

needs_java = pytest.mark.skipif(ptb_tokenizer.java_tokenizer_jar() is None,
                                reason="the COCO toolkit's Java programs need `java`")

_WORDS = ("a man woman dog cat two red small riding sitting on the of with in near "
          "table street grass ball plate pizza bus holding white black").split()
_STYLE = ["{}.", "{}", "{}!", "A {}.", "{} , next to a tree.", "The {} (outside).",
          "{}; it's sunny.", "Two \"{}\" -- really?"]


def _captions(rng, n_images=24, n_refs=5):
  """Random captions that share words with their references, with toolkit-relevant punctuation."""
  def sentence(base=None):
    words = list(base) if base is not None else list(rng.choice(_WORDS, rng.integers(3, 10)))
    for _ in range(rng.integers(0, 3)):  # perturb: substitute / drop words
      if len(words) > 1:
        words[rng.integers(len(words))] = str(rng.choice(_WORDS))
    text = " ".join(words)
    return str(rng.choice(_STYLE)).format(text[0].upper() + text[1:]), words
  preds, refs = [], []
  for i in range(n_images):
    _, base = sentence()
    refs.append([sentence(base)[0] for _ in range(n_refs)])
    preds.append(sentence(base)[0] if i % 6 else "")  # some empty / unrelated predictions
  preds[1] = "zzz qqq"
  refs[2] = refs[2][:1]  # a single reference
  return preds, refs


def _reference_scores(hyps, refs):
  gts = {i: list(r) for i, r in enumerate(refs)}
  res = {i: [h] for i, h in enumerate(hyps)}
  b = Bleu(4).compute_score(gts, res, verbose=0)[0]
  return {"bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3],
          "rouge_l": Rouge().compute_score(gts, res)[0],
          "cider": Cider().compute_score(gts, res)[0]}


@pytest.mark.parametrize("seed", [0, 1])
def test_bleu_rouge_cider_equal_toolkit_on_tokenised_captions(seed):
  preds, refs = _captions(np.random.default_rng(seed))
  hyps = ptb_tokenizer.python_tokenize(preds)
  tok_refs = [ptb_tokenizer.python_tokenize(r) for r in refs]
  want = _reference_scores(hyps, tok_refs)
  got = dict(zip(("bleu1", "bleu2", "bleu3", "bleu4"), captions.bleu(hyps, tok_refs)))
  got["rouge_l"] = captions.rouge_l(hyps, tok_refs)
  got["cider"] = captions.cider_d(hyps, tok_refs)
  assert 0.05 < want["bleu4"] < 0.9 and 0.1 < want["cider"] < 9  # a non-trivial case
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


def test_caption_scores_python_tokenizer_equals_toolkit_scorers():
  preds, refs = _captions(np.random.default_rng(2))
  got = metrics.caption_scores(preds, refs, tokenizer="python", java_metrics=False)
  want = _reference_scores(ptb_tokenizer.python_tokenize(preds),
                           [ptb_tokenizer.python_tokenize(r) for r in refs])
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
  assert set(got) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
  perfect = metrics.caption_scores([r[0] for r in refs], refs, tokenizer="python",
                                   java_metrics=False)
  assert perfect["bleu4"] > got["bleu4"] and perfect["cider"] > got["cider"]


def test_python_tokenizer_matches_java_on_caption_text():
  """Token-for-token agreement of the two tokenisation backends (the documented limits aside)."""
  caps = ["A man riding a wave on top of a surfboard.", "Two dogs playing in the snow, one w/ a ball.",
          "The cat's toy is on the table .", "It's a red fire hydrant!", 'Is this a "real" dog?',
          "A close-up of a pizza (with cheese) on a plate.", "People at the U.K. station at 5 p.m.",
          "A 3-year-old girl eating a hot-dog.", "two zebras; one is eating grass",
          "A man holding a 12.5 lb fish and $5.", "Dr. Smith's office", "the dogs' bowls are empty",
          "He can't, won't, and shouldn't go...", "Train tracks -- going nowhere?!",
          "A sign that reads 'STOP'.", "Bananas,apples and oranges", "A 1,200-pound cow",
          "We're here; they're there.", "I'd say it's 50% done.", "#1 fan, #tag", "",
          "A woman wearing a t-shirt and jeans/shorts", "cannot wanna gonna", "Black & white \u2014 photo"]
  if ptb_tokenizer.java_tokenizer_jar() is None:
    pytest.skip("needs java for the reference tokenizer")
  assert ptb_tokenizer.python_tokenize(caps) == ptb_tokenizer.java_tokenize(caps)


@needs_java
def test_caption_scores_equal_coco_eval_pipeline_with_java():
  """The whole toolkit pipeline: PTB tokenizer (Java), BLEU, ROUGE-L, CIDEr-D, METEOR."""
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  preds, refs = _captions(np.random.default_rng(3), n_images=12)
  # The toolkit's tokenizer writes a temporary file next to its jar; skip if read-only.
  tok = PTBTokenizer()
  try:
    gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
  except OSError as e:
    pytest.skip(f"pycocoevalcap cannot write next to its jar: {e}")
  want = _reference_scores([res[i][0] for i in range(len(preds))],
                           [gts[i] for i in range(len(preds))])
  meteor = Meteor()
  want["meteor"] = meteor.compute_score(gts, res)[0]
  got = metrics.caption_scores(preds, refs, tokenizer="java")
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


def test_caption_scores_reject_bad_inputs():
  with pytest.raises(ValueError, match="one prediction per image"):
    metrics.caption_scores(["a"], [["a"], ["b"]])
  with pytest.raises(ValueError, match="non-empty list"):
    metrics.caption_scores(["a"], ["a dog"])
  with pytest.raises(ValueError, match="backend"):
    metrics.caption_scores(["a"], [["a"]], tokenizer="nltk")
