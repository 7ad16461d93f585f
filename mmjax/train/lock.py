"""The workdir lock: one run per workdir at a time.

Two runs on one workdir would interleave metrics.jsonl, delete each other's half-written
checkpoints and hang at Orbax's barriers. So a run first writes `WORKDIR/lock.json`
(host, pid, process start, start time, lease) and a second run is refused at once with
the holder's name. The holder renews its lease every `RENEW_SECONDS`; a lock is taken
over when its holder is gone:
  * same host: the pid no longer exists (or is now another process: its start differs);
  * another host (a shared filesystem): the lease was not renewed for `LEASE_SECONDS`.
Multi-host runs hold one lock, taken by process 0; every process learns the outcome.

Every change of the lock file is a compare-and-swap: it happens only if the file is still
the version this run read, so two launches at the same moment cannot both win, and a
holder whose lock was taken over learns it at its next renewal.
  * local workdir: the version is the file's content; comparing and replacing happen under
    an flock on `.lock.guard` (atomic on one machine and on filesystems with working flock);
  * gs:// workdir: the version is the object's generation, and GCS itself checks it
    (`if_generation_match`; 0 means "only if absent"). Each create, renewal, takeover and
    release is one atomic request. A holder can only be judged gone by its lease there
    (another machine's pids cannot be checked), unless it ran on this host.
"""
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mmjax.train import paths

LOCK_FILE = "lock.json"
GUARD_FILE = ".lock.guard"  # flock'ed while the lock is read, judged and replaced
LEASE_SECONDS = 120.0
RENEW_SECONDS = 15.0


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir; the message names its host, pid and start time."""


def _process_start(pid: int) -> Optional[str]:
  """The kernel's start time of `pid` (Linux /proc), to tell a reused pid apart; else None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class _LocalLockFile:
  """lock.json on a local (or mounted) filesystem; its version is its content."""

  def __init__(self, path: str):
    self.path = path
    self._guard = os.path.join(os.path.dirname(path), GUARD_FILE)

  def read(self) -> Tuple[Optional[bytes], Optional[bytes]]:
    """(content, version), (None, None) if there is no lock file."""
    try:
      with open(self.path, "rb") as f:
        content = f.read()
    except FileNotFoundError:
      return None, None
    return content, content

  def swap(self, content: Optional[bytes], expected: Optional[bytes]) -> Optional[bytes]:
    """Writes `content` (None: deletes the file) if the file is still version `expected`
    (None: absent); returns the new version, or None if the file had changed."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    with open(self._guard, "a") as guard:
      fcntl.flock(guard, fcntl.LOCK_EX)
      if self.read()[1] != expected:
        return None
      if content is None:
        os.remove(self.path)
        return None
      temporary = f"{self.path}.{os.getpid()}.tmp"
      with open(temporary, "wb") as f:
        f.write(content)
      os.replace(temporary, self.path)
      return content


class _GcsLockFile:
  """lock.json in a GCS bucket; its version is the object's generation, checked by GCS."""

  def __init__(self, url: str):
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    self.path = url
    bucket, name = url[len("gs://"):].split("/", 1)
    bucket = storage.Client(project=None).bucket(bucket)  # objects need no project
    self._blob = lambda: bucket.blob(name)
    self._conflict = (exceptions.PreconditionFailed, exceptions.NotFound)

  def read(self) -> Tuple[Optional[bytes], Optional[int]]:
    while True:
      blob = self._blob()
      try:
        blob.reload()
        return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
      except self._conflict:  # absent, or replaced between the two requests
        if not self._blob().exists():
          return None, None

  def swap(self, content: Optional[bytes], expected: Optional[int]) -> Optional[int]:
    blob = self._blob()
    try:
      if content is None:
        blob.delete(if_generation_match=expected)
        return None
      blob.upload_from_string(content, content_type="application/json",
                              if_generation_match=expected or 0)
    except self._conflict:
      return None
    return blob.generation


class WorkdirLock:
  """Holds `WORKDIR/lock.json` from `acquire()` until `release()`."""

  def __init__(self, workdir: str, *, lease_seconds: float = LEASE_SECONDS,
               renew_seconds: float = RENEW_SECONDS):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = (_GcsLockFile if paths.scheme(workdir) == "gs" else _LocalLockFile)(self.path)
    self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
    self._record: Optional[Dict[str, Any]] = None
    self._version: Any = None
    self._stop = threading.Event()
    self._renewer: Optional[threading.Thread] = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (or a stale one over); raises WorkdirLockedError naming a live holder."""
    now = time.time()
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "process_start": _process_start(os.getpid()),
              "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
                         .strftime("%Y-%m-%d %H:%M:%S UTC"),
              "renewed": now, "lease_seconds": self.lease_seconds, "token": uuid.uuid4().hex}
    holder, version = self._read()
    if holder is not None:
      stale = self.stale_reason(holder)
      if stale is None:
        raise self._in_use(holder)
      logging.warning("Taking over the lock of %s: its holder (host %s, pid %s, started %s) "
                      "is gone: %s.", os.path.dirname(self.path), holder.get("host"),
                      holder.get("pid"), holder.get("started"), stale)
    self._version = self._file.swap(_encode(record), version)
    if self._version is None:  # another launch changed the lock since it was read: it won
      raise self._in_use(self._read()[0] or {})
    self._record = record
    self._renewer = threading.Thread(target=self._renew, name="mmjax-workdir-lock",
                                     daemon=True)
    self._renewer.start()
    return self

  def _in_use(self, holder: Dict[str, Any]) -> WorkdirLockedError:
    return WorkdirLockedError(
        f"Workdir {os.path.dirname(self.path)} is in use by host {holder.get('host')}, "
        f"pid {holder.get('pid')}, started {holder.get('started')} (lease renewed "
        f"{time.time() - float(holder.get('renewed', 0)):.0f} s ago). Wait for that run, "
        f"stop it, or use another --workdir; if it is really gone, delete {self.path}.")
  def stale_reason(self, holder: Dict[str, Any]) -> Optional[str]:
    """Why `holder` no longer holds the lock, or None if it may still be running."""
    try:
      pid, renewed = int(holder["pid"]), float(holder["renewed"])
      lease = float(holder.get("lease_seconds", self.lease_seconds))
    except (KeyError, TypeError, ValueError):
      return "the lock file is unreadable"
    if holder.get("host") == socket.gethostname():
      if not _pid_alive(pid):
        return f"pid {pid} no longer exists"
      start = _process_start(pid)
      if holder.get("process_start") and start and start != holder["process_start"]:
        return f"pid {pid} is now another process"
      return None
    age = time.time() - renewed
    if age > lease:
      return f"its lease was last renewed {age:.0f} s ago (lease {lease:.0f} s)"
    return None

  def _read(self) -> Tuple[Optional[Dict[str, Any]], Any]:
    """(holder record, version); the record is {} if unreadable, None if there is none."""
    content, version = self._file.read()
    if content is None:
      return None, None
    try:
      return json.loads(content), version
    except ValueError:
      return {}, version

  def _renew(self) -> None:
    while not self._stop.wait(self.renew_seconds):
      self._record["renewed"] = time.time()
      try:
        version = self._file.swap(_encode(self._record), self._version)
      except OSError as e:  # keep training; the lease will tell others if this persists
        logging.warning("Could not renew the workdir lock %s: %s", self.path, e)
        continue
      if version is None:
        logging.error("The lock %s was taken by another run (%s); this run no longer holds "
                      "it.", self.path, self._read()[0])
        self._version = None
        return
      self._version = version

  def release(self) -> None:
    """Removes the lock file if this run still holds it."""
    if self._record is None:
      return
    self._stop.set()
    if self._renewer is not None:
      self._renewer.join()
    if self._version is not None:
      self._file.swap(None, self._version)
    self._record = None


def _encode(record: Dict[str, Any]) -> bytes:
  return json.dumps(record, indent=2).encode()


class _NotHeld:
  """What processes other than 0 hold: nothing to release."""

  def release(self) -> None:
    pass


def acquire(workdir: str) -> Any:
  """Locks `workdir` for this run (process 0 holds the lock); raises WorkdirLockedError on
  every process if it is in use. Returns an object with `release()`."""
  lock, error = _NotHeld(), None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      raise WorkdirLockedError(f"Workdir {workdir} is in use (see process 0's error).")
  if error is not None:
    raise error
  return lock
