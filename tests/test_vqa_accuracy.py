"""vqa_accuracy against a direct transcription of the official VQAv2 evaluation loop."""
import re

import pytest

from mmjax import metrics
from mmjax.metrics import vqa


def _official(pred, answers):
  """The official vqaEval.py loop for one question, kept as literal as possible."""
  punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
           "@", "`", ",", "?", "!"]
  comma_strip = re.compile(r"(\d)(,)(\d)")
  period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)")

  def process_punctuation(in_text):
    out_text = in_text
    for p in punct:
      if (p + " " in in_text or " " + p in in_text) or (re.search(comma_strip, in_text) is not None):
        out_text = out_text.replace(p, "")
      else:
        out_text = out_text.replace(p, " ")
    return period_strip.sub("", out_text, re.UNICODE)

  def process_digit_article(in_text):
    manual_map = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                  "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    contractions = {"dont": "don't", "isnt": "isn't", "cant": "can't", "whats": "what's"}
    out = [manual_map.get(w, w) for w in in_text.lower().split()]
    out = [w for w in out if w not in ("a", "an", "the")]
    return " ".join(contractions.get(w, w) for w in out)

  gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
  for d in gts:
    d["answer"] = d["answer"].replace("\n", " ").replace("\t", " ").strip()
  res = pred.replace("\n", " ").replace("\t", " ").strip()
  if len(set(d["answer"] for d in gts)) > 1:
    for d in gts:
      d["answer"] = process_digit_article(process_punctuation(d["answer"]))
    res = process_digit_article(process_punctuation(res))
  acc = []
  for gt in gts:
    others = [item for item in gts if item != gt]
    matching = [item for item in others if item["answer"] == res]
    acc.append(min(1, float(len(matching)) / 3))
  return sum(acc) / len(acc)


CASES = [  # (prediction, the 10 human answers)
    ("Two", ["2"] * 6 + ["two"] * 2 + ["3", "4"]),        # number word vs digit
    ("2", ["two"] * 2 + ["3"] * 8),                        # 2 matches of 9 -> 2/3 or 1/3
    ("the dog", ["dog"] * 4 + ["a dog"] + ["cat"] * 5),    # articles
    ("yes.", ["yes"] * 9 + ["no"]),                        # trailing period
    ("dont", ["don't"] * 2 + ["do not"] * 8),              # contraction
    ("Yes", ["yes"] * 10),                                 # unanimous: no normalisation ...
    ("the dog", ["dog"] * 10),                             # ... so articles are not dropped
    ("black and white", ["black/white"] * 2 + ["black and white"] * 8),
    ("1,000", ["1000"] * 5 + ["1,000"] * 5),               # digit comma
    (" red\n", ["red"] * 3 + ["blue"] * 7),                # whitespace clean-up always
    ("no", ["yes"] * 10),
]


@pytest.mark.parametrize("pred,answers", CASES)
def test_each_case_equals_official_formula(pred, answers):
  assert vqa.answer_accuracy(pred, answers) == pytest.approx(_official(pred, answers), abs=1e-12)


def test_normalisation_cases_score_as_specified():
  assert vqa.answer_accuracy("Two", CASES[0][1]) == 1.0
  assert vqa.answer_accuracy("the dog", CASES[2][1]) == 1.0
  assert vqa.answer_accuracy("yes.", CASES[3][1]) == 1.0
  assert vqa.answer_accuracy("dont", CASES[4][1]) == pytest.approx(0.6)  # 2 of 10 said it
  assert vqa.answer_accuracy("the dog", CASES[6][1]) == 0.0  # the official quirk
  assert vqa.normalize_answer("Two dogs, the cats.") == "2 dogs cats"


def test_vqa_accuracy_averages_questions_and_rejects_bad_inputs():
  preds, answers = zip(*CASES)
  want = sum(_official(p, a) for p, a in CASES) / len(CASES)
  assert metrics.vqa_accuracy(list(preds), list(answers)) == pytest.approx(want, abs=1e-12)
  with pytest.raises(ValueError, match="one prediction per question"):
    metrics.vqa_accuracy(["yes"], [])
  with pytest.raises(ValueError, match="human answers"):
    metrics.vqa_accuracy(["yes"], ["yes"])
