"""Reliability (issues 8, 15): crashes, preemption, damaged checkpoints, config changes and
concurrent runs lose nothing: each case survives or stops with a named cause, nothing moved.

Already covered elsewhere, not repeated here: SIGTERM to one process -> exit 0 with the
current step saved and the rerun continuing (test_train_preemption), damaged steps at the Checkpointer level and
non-finite states refused (test_checkpoint), divergence (test_train_divergence), bad records
(test_data_bad_records). Here: the same failures through the trainer, end to end, judged by
the strictest measure there is: the final params equal an uninterrupted run's, bit for bit.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from jax._src import compilation_cache

from test_train_fixtures import losses, read_metrics, subprocess_env, tiny_config

from experiments import chaos
from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import lock as lock_lib
from mmjax.train import trainer
from mmjax.train import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache(tmp_path_factory):
  """Every test here trains the same tiny programs several times: compile them once (a
  persistent cache for this module only, as relaunched subprocesses get in the others)."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)):
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # jax decides once whether to use the cache; ask again
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


CONFIG = tiny_config(total_steps=6, checkpoint_every=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """(workdir, final params) of one uninterrupted run with checkpoints at steps 3 and 6;
  each test damages its own copy."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  trainer.train_and_evaluate(CONFIG, str(workdir))
  return workdir, checkpoint_lib.load_params(str(workdir))


def _copy(uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted[0], workdir)
  return workdir


def _assert_same_params(workdir, want):
  got = checkpoint_lib.load_params(str(workdir))
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("damage", chaos.CORRUPTIONS)
def test_damaged_newest_checkpoint_is_moved_aside_resaved_and_run_ends_bit_identical(
    uninterrupted, tmp_path, caplog, damage):
  workdir = _copy(uninterrupted, tmp_path)
  assert chaos.corrupt_newest_step(str(workdir / "checkpoints"), damage) == 6
  with caplog.at_level(logging.WARNING):
    results = trainer.train_and_evaluate(CONFIG, str(workdir))

  assert "Checkpoint step 6 in" in caplog.text  # the warning names the bad step
  assert [d[:2] for d in os.listdir(workdir / "checkpoints.corrupt")] == ["6-"]
  assert results["step"] == 6
  records = [(r["step"], r["loss"]) for r in read_metrics(str(workdir)) if "loss" in r]
  assert [s for s, _ in records] == [1, 2, 3, 4, 5, 6, 4, 5, 6]  # resumed from step 3
  assert records[3:6] == records[6:]
  # Step 6 was saved again (orbax would silently skip it had the bad one stayed), and it
  # holds what the uninterrupted run had.
  assert 6 in checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), keep=3).steps()
  _assert_same_params(workdir, uninterrupted[1])


def test_every_checkpoint_damaged_is_refused_naming_each_step_and_moving_nothing(
    uninterrupted, tmp_path):
  workdir = _copy(uninterrupted, tmp_path)
  chaos.corrupt_newest_step(str(workdir / "checkpoints"), "zeroed_array")
  (workdir / "checkpoints" / "3" / "data" / "process_0-of-1.json").unlink()
  before = chaos.workdir_listing(str(workdir))
  with pytest.raises(checkpoint_lib.NoReadableCheckpointError) as error:
    trainer.train_and_evaluate(CONFIG, str(workdir))
  message = str(error.value)
  assert "step 6: " in message and "step 3: " in message and "--start_over" in message
  assert chaos.workdir_listing(str(workdir)) == before  # nothing moved, written or overwritten


def test_start_over_trains_from_scratch_with_the_same_data_order(uninterrupted, tmp_path):
  workdir = _copy(uninterrupted, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "3")
  # The state is unreadable but the iterator file is fine: a failed restore must not leave
  # the data iterator rewound to the damaged step's position.
  chaos.corrupt_newest_step(str(workdir / "checkpoints"), "zeroed_array")
  os.remove(workdir / "metrics.jsonl")
  trainer.train_and_evaluate(CONFIG, str(workdir), start_over=True)
  assert sorted(losses(workdir)) == [1, 2, 3, 4, 5, 6]
  assert [d[:2] for d in os.listdir(workdir / "checkpoints.corrupt")] == ["6-"]
  _assert_same_params(workdir, uninterrupted[1])


@pytest.mark.parametrize("override,diff", [
    ({"optimizer.name": "sgd"}, 'optimizer.name: "adamw" -> "sgd"'),
    ({"optimizer.clip_grad_norm": 0.0}, "optimizer.clip_grad_norm: 1.0 -> 0.0"),
])
def test_config_change_the_checkpoint_cannot_hold_is_refused_with_a_diff(
    uninterrupted, tmp_path, override, diff):
  workdir = _copy(uninterrupted, tmp_path)
  before = chaos.workdir_listing(str(workdir))
  with pytest.raises(workdir_lib.ResumeMismatchError) as error:
    trainer.train_and_evaluate(tiny_config(total_steps=6, checkpoint_every=3, **override),
                               str(workdir))
  message = str(error.value)
  assert diff in message and "opt_state/" in message
  assert "new --workdir" in message and "init_from" in message and "revert" in message
  assert chaos.workdir_listing(str(workdir)) == before  # config.json included: written only once validated


def test_raising_total_steps_resumes_and_keeps_the_old_config_as_history(
    uninterrupted, tmp_path):
  workdir = _copy(uninterrupted, tmp_path)
  old_config = (workdir / "config.json").read_text()
  longer = tiny_config(total_steps=8, checkpoint_every=3)
  results = trainer.train_and_evaluate(longer, str(workdir))
  assert results["step"] == 8
  assert sorted(losses(workdir)) == list(range(1, 9))
  assert (workdir / "config_history" / "0.json").read_text() == old_config
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 8


def test_flipped_bytes_in_array_data_fail_the_checksum_and_the_previous_step_is_used(
    tmp_path, caplog):
  """64 inverted bytes in the middle of the biggest array file (data that tensorstore does
  not checksum): the step is damaged, named, moved aside; the previous one restores."""
  config = tiny_config(total_steps=4, checkpoint_every=2, **{"model.width": 128})
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir))
  # The biggest file holds chunk data of the big arrays (tensorstore checks CRCs of its
  # b-tree nodes, not of the chunks they point to).
  biggest = max((p for p in (workdir / "checkpoints" / "4" / "state").rglob("*")
                 if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  biggest.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING):
    results = trainer.train_and_evaluate(config, str(workdir))
  assert "Checkpoint step 4 in" in caplog.text and "checksum mismatch" in caplog.text
  assert [d[:2] for d in os.listdir(workdir / "checkpoints.corrupt")] == ["4-"]
  assert results["step"] == 4
  assert sorted(r["step"] for r in read_metrics(str(workdir)) if "loss" in r) == [1, 2, 3, 3,
                                                                                 4, 4]


def test_workdir_in_use_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  holder = lock_lib.WorkdirLock(str(workdir)).acquire()
  try:
    with pytest.raises(lock_lib.WorkdirLockedError, match=r"in use by host .*, pid \d+, started"):
      trainer.train_and_evaluate(CONFIG, str(workdir))
  finally:
    holder.release()
  assert sorted(os.listdir(workdir)) == [".lock.guard"]


def test_url_workdir_other_than_gs_is_refused_without_creating_a_local_folder(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # gs:// workdirs: tests/test_gcs_workdir.py
  with pytest.raises(workdir_lib.UnsupportedWorkdirError, match="s3:// workdirs are not"):
    trainer.train_and_evaluate(CONFIG, "s3://bucket/run")
  assert os.listdir(tmp_path) == []


def test_checkpoint_of_another_model_size_is_an_error_listing_parameters(
    uninterrupted, tmp_path):
  workdir = _copy(uninterrupted, tmp_path)
  wider = tiny_config(total_steps=6, **{"model.width": 24})
  with pytest.raises(checkpoint_lib.CheckpointShapeError) as error:
    trainer.train_and_evaluate(wider, str(workdir))
  message = str(error.value)
  for name in ("params/embed/kernel", "params/hidden/kernel", "params/pos_embedding"):
    assert name in message
  assert "(1, 16, 16)" in message and "(1, 16, 24)" in message
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]  # nothing moved aside


def test_chaos_drill_kill9_mid_save_sigterm_and_damage_end_bit_identical(tmp_path):
  """The drill with a fixed plan: SIGTERM mid-training, then that checkpoint zeroed; then
  SIGKILL while an async save is in flight; then a final launch to the end."""
  config_file = tmp_path / "tiny.py"
  config_file.write_text("from tests.test_train_fixtures import tiny_config\n"
                         "def get_config(arg=None):\n"
                         "  return tiny_config(**{'schedule.name': 'constant'})\n")
  workdir = tmp_path / "chaos"
  run = subprocess.run(
      [sys.executable, os.path.join("experiments", "chaos.py"), f"--config={config_file}",
       "--override=seed=0", "--devices=1", "--cycles=2", "--total_steps=120",
       "--plan=TERM:training,KILL:save", "--corrupt_cycle=0", "--corruption=zeroed_array",
       "--scenarios=", f"--workdir={workdir}"],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=400)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  assert "2/2 cycles survived" in run.stdout
  summary = json.loads((workdir / "chaos.json").read_text())
  assert summary["bit_identical"] and summary["losses_identical"]
  assert summary["final_step"] == 120
  assert summary["concurrent_start"]["ok"]  # a second launch on the reference was refused
  term, kill = summary["cycles"]
  # SIGTERM: exit 0 with the step it was at saved; that step was then damaged, so the next
  # launch warned, moved it aside and went back to the previous checkpoint.
  assert term["happened"] == "training" and term["exit_code"] == 0
  assert term["newest_step_trained"] in term["saved_steps"]
  assert term["corrupted"] == {"kind": "zeroed_array", "step": term["newest_step_trained"],
                               "warned": True, "moved_aside": True}
  assert term["next_resumed_from"] == max(term["saved_steps"][:-1], default=0)
  # SIGKILL mid-save: the half-written step is ignored; the newest complete one is resumed.
  assert kill["happened"] == "save" and kill["exit_code"] == -9
  assert kill["next_resumed_from"] == max(kill["saved_steps"])


def test_sigterm_to_one_host_of_two_saves_the_same_step_on_both_and_both_exit_0(tmp_path):
  """JAX's preemption sync point: the host that got the signal tells the others, and all
  save the same step (a TPU pod slice gets SIGTERM on one worker at a time)."""
  config_file = tmp_path / "c.py"
  config_file.write_text("from tests.test_train_fixtures import tiny_config\n"
                         "def get_config(arg=None):\n"
                         "  return tiny_config(total_steps=100000, **{'schedule.name': 'constant'})\n")
  workdir = tmp_path / "run"
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mmjax.main", f"--config={config_file}", f"--workdir={workdir}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=subprocess_env(2, tmp_path / "cache"), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  deadline = time.time() + 240
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if (workdir / "metrics.jsonl").exists() and len(read_metrics(str(workdir))) > 3:
      break
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  errors = [p.communicate(timeout=120)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
  last_logged = max(r["step"] for r in read_metrics(str(workdir)) if "loss" in r)
  assert os.listdir(workdir / "checkpoints") == [str(last_logged)]
  data_files = os.listdir(workdir / "checkpoints" / str(last_logged) / "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_files)
  for error in errors:
    assert f"Preemption requested: saved step {last_logged}" in error


@pytest.mark.skipif(not chaos.can_mount_tmpfs(), reason="cannot mount a tmpfs here")
def test_disk_full_stops_the_run_with_the_save_error_and_keeps_the_previous_step(tmp_path):
  config_file = tmp_path / "c.py"
  config_file.write_text("from tests.test_train_fixtures import tiny_config\n"
                         "def get_config(arg=None):\n"
                         "  return tiny_config(total_steps=100000, checkpoint_every=4, "
                         "**{'schedule.name': 'constant'})\n")
  run_dir, copy = tmp_path / "mnt" / "run", tmp_path / "copy"
  command = [sys.executable, "-m", "mmjax.main", f"--config={config_file}",
             f"--workdir={run_dir}"]
  code = chaos.run_until_disk_full(command, str(run_dir), 4, str(tmp_path / "log"), str(copy),
                                   subprocess_env(1, tmp_path / "cache"), timeout=240)
  stderr = (tmp_path / "log.err").read_text()
  assert code == 1, stderr[-3000:]
  assert "error: Saving checkpoint step " in stderr and "No space left on device" in stderr
  assert "Steps kept: [4" in stderr
  saved = sorted(int(d) for d in os.listdir(copy / "checkpoints") if d.isdigit())
  failed = int(stderr.split("error: Saving checkpoint step ")[1].split()[0])
  assert saved and max(saved) < failed
  last_logged = max(r["step"] for r in read_metrics(str(copy)) if "loss" in r)
  assert last_logged <= failed + 4  # stopped at the latest before the next save
  checkpoint_lib.load_params(str(copy))  # the newest step it kept reads back


def test_gs_workdir_without_credentials_is_one_line_error_before_anything_runs(
    tmp_path, monkeypatch):
  for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("NO_GCE_CHECK", "True")  # no metadata server probe
  monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no_gcloud"))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(workdir_lib.UnsupportedWorkdirError, match="no Google Cloud credentials"):
    trainer.train_and_evaluate(CONFIG, "gs://bucket/run")
  assert os.listdir(tmp_path) == []
