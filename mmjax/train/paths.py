"""Run directories that are local paths or gs:// URLs, read and written the same way.

`etils.epath` (orbax's path library; fsspec + gcsfs for gs://) does the I/O. Where a local
disk and GCS differ, these helpers say what each one guarantees:
  * replacing a file: locally it is written under a temporary name and renamed over the
    old one; GCS has no rename, but an object upload is atomic (a reader sees the whole
    old or the whole new object), so the object is written in place;
  * moving a directory: locally an atomic rename; on GCS a copy followed by a delete, so
    an interruption leaves both copies, never none;
  * listings are not cached: gcsfs caches them by default, and tensorstore writes the
    checkpoint files behind its back.
"""
import os
import re
from typing import Optional

import fsspec
from etils import epath

SUPPORTED_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

for _protocol in ("gs", "gcs"):  # applied by fsspec whenever it creates a GCS filesystem
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def scheme(path: str) -> Optional[str]:
  """'gs' for gs://bucket/x, None for a local path."""
  match = _SCHEME.match(os.fspath(path))
  return match.group(1) if match else None


def is_url(path: str) -> bool:
  return scheme(path) is not None


def absolute(path: str) -> str:
  """A URL without its trailing slash, or the absolute local path."""
  path = os.fspath(path)
  return path.rstrip("/") if is_url(path) else os.path.abspath(os.path.expanduser(path))


def read_text(path: str) -> Optional[str]:
  """The file's text, or None if it does not exist."""
  try:
    return epath.Path(path).read_text()
  except FileNotFoundError:
    return None


def write_text(path: str, text: str) -> None:
  """Replaces the file at `path` by `text` atomically (see the module docstring)."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_url(path):
    target.write_text(text)
    return
  temporary = epath.Path(f"{path}.{os.getpid()}.tmp")
  temporary.write_text(text)
  os.replace(temporary, target)


def move_tree(source: str, destination: str) -> None:
  """Moves a directory; `destination` must not exist (see the module docstring)."""
  if not is_url(source):
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    os.rename(source, destination)
    return
  fs, source_path = fsspec.core.url_to_fs(source)
  destination_path = fs._strip_protocol(destination)  # pylint: disable=protected-access
  for name in fs.find(source_path):
    fs.copy(name, destination_path + name[len(source_path):])
  fs.rm(source_path, recursive=True)
