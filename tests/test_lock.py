"""The workdir lock: a live holder is named and refused; a dead or silent one is taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mmjax.train import lock as lock_lib


def _write_holder(workdir, **fields):
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": None,
            "started": "2026-01-01 00:00:00 UTC", "renewed": time.time(), "lease_seconds": 60,
            "token": "other"}
  holder.update(fields)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, lock_lib.LOCK_FILE), "w") as f:
    json.dump(holder, f)


def test_second_acquire_is_refused_naming_the_holder_and_release_frees_it(tmp_path):
  first = lock_lib.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(lock_lib.WorkdirLockedError) as error:
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  message = str(error.value)
  assert f"host {socket.gethostname()}, pid {os.getpid()}, started 20" in message
  first.release()
  assert not (tmp_path / lock_lib.LOCK_FILE).exists()
  lock_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_lock_of_a_process_that_is_gone_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  _write_holder(str(tmp_path), pid=int(dead.stdout))
  lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
  assert json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()


def test_reused_pid_is_told_apart_by_its_start_time(tmp_path):
  _write_holder(str(tmp_path), process_start="1")  # this pid, but started at another time
  lock_lib.WorkdirLock(str(tmp_path)).acquire().release()


@pytest.mark.parametrize("age,taken_over", [(10, False), (600, True)])
def test_lock_of_another_host_is_taken_over_only_when_its_lease_expired(tmp_path, age,
                                                                         taken_over):
  _write_holder(str(tmp_path), host="some-other-host", pid=1, renewed=time.time() - age)
  if taken_over:
    lock_lib.WorkdirLock(str(tmp_path)).acquire().release()
  else:
    with pytest.raises(lock_lib.WorkdirLockedError, match="host some-other-host, pid 1"):
      lock_lib.WorkdirLock(str(tmp_path)).acquire()


def test_holder_renews_its_lease(tmp_path):
  lock = lock_lib.WorkdirLock(str(tmp_path), renew_seconds=0.05).acquire()
  first = json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())["renewed"]
  time.sleep(0.3)
  assert json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())["renewed"] > first
  lock.release()
