"""Caption tokenisation as the COCO caption evaluation does it, before any score is computed.

The COCO toolkit (`pycocoevalcap`) runs Stanford CoreNLP 3.4.1's `PTBTokenizer`
(`-preserveLines -lowerCase`) over every caption, then drops punctuation tokens. Scores
are only comparable to papers' numbers when captions are tokenised the same way, so:

- `tokenize(captions)` uses that exact Java program when `java` is on PATH and the jar
  shipped inside `pycocoevalcap` is installed (`apt-get install default-jre-headless`,
  `pip install pycocoevalcap`);
- otherwise it uses `python_tokenize`, a pure-Python equivalent written for caption text.

Where the two can differ (the Python version is checked token-for-token against the Java
one in tests/test_caption_metrics.py): abbreviations outside a short list keep or lose
their final period differently ("approx." at the end of a word), apostrophes inside
words other than English clitics ("y'all", "5'6"), and Unicode punctuation other than
dashes and curly quotes. All are rare in captions, and most affect only tokens the
toolkit drops anyway (every "." token is removed).

Two quirks of the toolkit are reproduced on purpose: "?!"-style runs stay one token and
are kept, and brackets become "-lrb-" / "-rrb-" ... tokens that survive the punctuation
filter (the filter lists them upper-case, the tokenizer lower-cases them first).
"""
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from typing import List, Optional, Sequence

# Tokens the toolkit removes after tokenising (pycocoevalcap/tokenizer/ptbtokenizer.py).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

_JAR = "stanford-corenlp-3.4.1.jar"


@functools.lru_cache(maxsize=1)
def java_tokenizer_jar() -> Optional[str]:
  """Path of the PTB tokenizer jar when both Java and pycocoevalcap are installed."""
  if shutil.which("java") is None:
    return None
  root = pycocoevalcap_dir()
  jar = root and os.path.join(root, "tokenizer", _JAR)
  return jar if jar and os.path.exists(jar) else None


def pycocoevalcap_dir() -> Optional[str]:
  """Folder of the installed `pycocoevalcap` package (it ships the Java jars), or None."""
  spec = importlib.util.find_spec("pycocoevalcap")
  return list(spec.submodule_search_locations)[0] if spec else None


def java_tokenize(captions: Sequence[str]) -> List[str]:
  """The toolkit's own tokenisation: CoreNLP's PTBTokenizer, then its punctuation filter."""
  jar = java_tokenizer_jar()
  if jar is None:
    raise RuntimeError("Java PTB tokenisation needs `java` on PATH (apt-get install "
                       "default-jre-headless) and `pip install pycocoevalcap`.")
  lines = [c.replace("\n", " ") for c in captions]
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
    f.write("\n".join(lines))
  try:
    out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                          "-preserveLines", "-lowerCase", f.name],
                         check=True, capture_output=True).stdout.decode("utf-8")
  finally:
    os.remove(f.name)
  tokenized = out.split("\n")
  return [_filter(line.rstrip().split(" ")) for line in tokenized[:len(lines)]]


def _filter(tokens: Sequence[str]) -> str:
  return " ".join(t for t in tokens if t not in PUNCTUATIONS)


# ---------------------------------------------------------------- pure-Python equivalent
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-",
             "}": "-rcb-"}
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr prof vs etc inc ltd co corp mt ft "
                           "no approx dept est fig".split())
_CLITICS = ("n't", "'s", "'ll", "'re", "'ve", "'m", "'d")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"),
                "gotta": ("got", "ta")}
_NUMBER = re.compile(r"^\d+([.,]\d+)*$")
_INITIALS = re.compile(r"^([a-z]\.){2,}$")  # u.s., p.m., d.c.
_DASHES = re.compile(r"--+|[\u2013\u2014]")
_INNER_PUNCT = re.compile(r"(?<!\d)([,;])|([,;])(?!\d)")


def python_tokenize(captions: Sequence[str]) -> List[str]:
  """Pure-Python PTB tokenisation + punctuation filter (see module docstring for limits)."""
  return [_filter(_tokenize_line(c)) for c in captions]


def _tokenize_line(text: str) -> List[str]:
  text = text.replace("\n", " ").lower()
  text = text.replace("\u201c", '"').replace("\u201d", '"')
  text = text.replace("\u2018", "'").replace("\u2019", "'")
  text = _DASHES.sub(" -- ", text)
  tokens = []
  for chunk in text.split():
    tokens.extend(_tokenize_chunk(chunk))
  return tokens


def _tokenize_chunk(chunk: str) -> List[str]:
  """Split one whitespace-free chunk: opening punctuation, word(s), closing punctuation."""
  if chunk == "--":
    return ["--"]
  front, back = [], []
  while chunk:  # opening quotes, brackets, currency and hash signs
    c = chunk[0]
    if c == '"':
      front.append("``")
    elif c in "'`":
      front.append("`")
    elif c in "([{":
      front.append(_BRACKETS[c])
    elif c == "$" or (c == "#" and chunk[1:2].isdigit()):  # "#1" splits, "#tag" does not
      front.append(c)
    else:
      break
    chunk = chunk[1:]
  while chunk:  # closing punctuation, peeled from the right
    if chunk.endswith("..."):
      back.insert(0, "...")
      chunk = chunk[:-3]
      continue
    m = re.search(r"[?!]+$", chunk)
    if m:
      back.insert(0, m.group(0))
      chunk = chunk[:m.start()]
      continue
    c = chunk[-1]
    if c == "." and not _keeps_period(chunk):
      back.insert(0, ".")
    elif c in ",;:%/":  # "w/" -> "w /"; inner slashes ("red/blue") stay
      back.insert(0, c)
    elif c == '"':
      back.insert(0, "''")
    elif c in "'`" and not chunk.endswith("n't"):
      back.insert(0, c)
    elif c in ")]}":
      back.insert(0, _BRACKETS[c])
    else:
      break
    chunk = chunk[:-1]
  return front + _split_word(chunk) + back


def _keeps_period(chunk: str) -> bool:
  return bool(_INITIALS.match(chunk)) or chunk[:-1] in _ABBREVIATIONS


def _split_word(word: str) -> List[str]:
  """Split inner commas / semicolons (not inside numbers), clitics and fused words."""
  if not word:
    return []
  if not _NUMBER.match(word) and _INNER_PUNCT.search(word):
    parts = [p for p in re.split(r"([,;])", word) if p]
    return [t for p in parts for t in (_split_word(p) if p not in ",;" else [p])]
  if word in _SPLIT_WORDS:
    return list(_SPLIT_WORDS[word])
  for clitic in _CLITICS:
    if word.endswith(clitic) and len(word) > len(clitic):
      return [word[:-len(clitic)], clitic]
  return [word]


def tokenize(captions: Sequence[str], backend: str = "auto") -> List[str]:
  """Tokenise captions as the COCO toolkit does: 'java', 'python', or 'auto' (Java if present)."""
  if backend == "auto":
    backend = "java" if java_tokenizer_jar() else "python"
  if backend == "java":
    return java_tokenize(captions)
  if backend == "python":
    return python_tokenize(captions)
  raise ValueError(f"PTB tokenizer backend must be 'auto', 'java' or 'python'; got {backend!r}.")
