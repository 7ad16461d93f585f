"""The workdir lock: one run per workdir at a time.

Two runs on one workdir would interleave metrics.jsonl, delete each other's half-written
checkpoints and hang at Orbax's barriers. So a run first writes `WORKDIR/lock.json`
(host, pid, process start, start time, lease) and a second run is refused at once with
the holder's name. The holder renews its lease every `RENEW_SECONDS`; a lock is taken
over when its holder is gone:
  * same host: the pid no longer exists (or is now another process: its start differs);
  * another host (a shared filesystem): the lease was not renewed for `LEASE_SECONDS`.
Multi-host runs hold one lock, taken by process 0; every process learns the outcome.
Reading, judging and replacing the lock happen under an flock on `.lock.guard`, so
two launches at the same moment cannot both win.
"""
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

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


class WorkdirLock:
  """Holds `WORKDIR/lock.json` from `acquire()` until `release()`."""

  def __init__(self, workdir: str, *, lease_seconds: float = LEASE_SECONDS,
               renew_seconds: float = RENEW_SECONDS):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
    self._record: Optional[Dict[str, Any]] = None
    self._stop = threading.Event()
    self._renewer: Optional[threading.Thread] = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (or a stale one over); raises WorkdirLockedError naming a live holder."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    now = time.time()
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "process_start": _process_start(os.getpid()),
              "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
                         .strftime("%Y-%m-%d %H:%M:%S UTC"),
              "renewed": now, "lease_seconds": self.lease_seconds, "token": uuid.uuid4().hex}
    with open(os.path.join(os.path.dirname(self.path), GUARD_FILE), "a") as guard:
      fcntl.flock(guard, fcntl.LOCK_EX)
      holder = self._read()
      if holder is not None:
        stale = self.stale_reason(holder)
        if stale is None:
          raise WorkdirLockedError(
              f"Workdir {os.path.dirname(self.path)} is in use by host {holder.get('host')}, "
              f"pid {holder.get('pid')}, started {holder.get('started')} (lease renewed "
              f"{time.time() - float(holder.get('renewed', 0)):.0f} s ago). Wait for that run, "
              "stop it, or use another --workdir; if it is really gone, delete "
              f"{self.path}.")
        logging.warning("Taking over the lock of %s: its holder (host %s, pid %s, started %s) "
                        "is gone: %s.", os.path.dirname(self.path), holder.get("host"),
                        holder.get("pid"), holder.get("started"), stale)
      self._write(record)
    self._record = record
    self._renewer = threading.Thread(target=self._renew, name="mmjax-workdir-lock",
                                     daemon=True)
    self._renewer.start()
    return self

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

  def _read(self) -> Optional[Dict[str, Any]]:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _write(self, record: Dict[str, Any]) -> None:
    temporary = f"{self.path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
      json.dump(record, f, indent=2)
    os.replace(temporary, self.path)

  def _renew(self) -> None:
    while not self._stop.wait(self.renew_seconds):
      current = self._read()
      if not current or current.get("token") != self._record["token"]:
        logging.error("The lock %s was taken by another run (%s); this run no longer holds "
                      "it.", self.path, current)
        return
      self._record["renewed"] = time.time()
      try:
        self._write(self._record)
      except OSError as e:  # keep training; the lease will tell others if this persists
        logging.warning("Could not renew the workdir lock %s: %s", self.path, e)

  def release(self) -> None:
    """Removes the lock file if this run still holds it."""
    if self._record is None:
      return
    self._stop.set()
    if self._renewer is not None:
      self._renewer.join()
    current = self._read()
    if current and current.get("token") == self._record["token"]:
      os.remove(self.path)
    self._record = None


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
