"""VQAv2 accuracy as the official evaluation computes it (https://visualqa.org/evaluation.html).

An answer is fully right when at least 3 of the 10 humans gave it. To smooth over the
choice of annotators, the official script leaves each of the 10 human answers out in
turn, scores min(1, matches among the other 9 / 3), and averages the 10 scores.

Normalisation follows the official script (GT-Vision-Lab/VQA `vqaEval.py`, the version
the VQA team links from its evaluation page), including its quirk: newlines / tabs are
always turned into spaces and the text stripped, but punctuation, number words, articles
and contractions are normalised only when the human answers disagree with one another.
"""
import re
from typing import Sequence

import numpy as np

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(["a", "an", "the"])
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, typo included
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def strip_space(answer: str) -> str:
  """The light clean-up applied to every answer: newlines / tabs to spaces, stripped."""
  return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
  """Official punctuation, then number-word / article / contraction normalisation."""
  out = answer
  for p in _PUNCT:
    # Punctuation next to a space (or any text with a digit comma) is deleted, otherwise
    # it becomes a space: "yes, sir" -> "yes sir", "black/white" -> "black white".
    if p + " " in answer or " " + p in answer or _DIGIT_COMMA.search(answer):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  out = _PERIOD.sub("", out)
  words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def answer_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """Leave-one-out VQA accuracy of one predicted answer against its human answers."""
  prediction = strip_space(prediction)
  answers = [strip_space(a) for a in answers]
  if len(set(answers)) > 1:
    prediction = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in answers]
  matches = np.array([a == prediction for a in answers], np.float64)
  others = matches.sum() - matches  # matches among the answers left in
  return float(np.mean(np.minimum(1.0, others / 3.0)))


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
  """Official VQAv2 accuracy in [0, 1], averaged over questions.

  Args:
    predictions: one predicted answer string per question.
    answers: the human answers of each question (10 in VQAv2; any number >= 2 works,
      each one left out in turn).
  """
  if len(predictions) != len(answers):
    raise ValueError(f"vqa_accuracy needs one prediction per question: got "
                     f"{len(predictions)} predictions and {len(answers)} answer lists.")
  if not predictions:
    raise ValueError("vqa_accuracy needs at least one question; got none.")
  for i, a in enumerate(answers):
    if isinstance(a, str) or len(a) < 2:
      raise ValueError(f"answers[{i}] must list the human answers (10 in VQAv2, at least 2 "
                       f"for leave-one-out); got {a!r}.")
  return float(np.mean([answer_accuracy(p, a) for p, a in zip(predictions, answers)]))
