"""SIGTERM (what TPU and cluster schedulers send) and Ctrl-C save the current step and exit 0.

Runs the user-facing command, `python -m mmjax.main`, in a subprocess.
"""
import os
import signal
import subprocess
import sys
import time

from test_train_fixtures import read_metrics, subprocess_env

from experiments import chaos
from mmjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ("from tests.test_train_fixtures import tiny_config\n"
          "def get_config(arg=None):\n"
          "  return tiny_config(total_steps=100000, **{'schedule.name': 'constant'})\n")


def _command(config_file, workdir, *extra):
  return [sys.executable, "-m", "mmjax.main", f"--config={config_file}",
          f"--workdir={workdir}", *extra]


def _start_training(config_file, workdir, env):
  """A `python -m mmjax.main` process, returned once it has logged a few steps."""
  proc = subprocess.Popen(_command(config_file, workdir), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          preexec_fn=chaos.default_sigint)  # Ctrl-C as at a terminal
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if (workdir / "metrics.jsonl").exists() and len(read_metrics(str(workdir))) > 3:
      break
    time.sleep(0.2)
  return proc


def test_sigterm_saves_current_step_and_rerun_continues(tmp_path):
  config_file = tmp_path / "c.py"
  config_file.write_text(CONFIG)
  workdir = tmp_path / "run"
  env = subprocess_env(1, tmp_path / "cache")
  proc = _start_training(config_file, workdir, env)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]

  saved = [int(s) for s in os.listdir(workdir / "checkpoints")]
  last_logged = max(r["step"] for r in read_metrics(str(workdir)) if "loss" in r)
  assert saved == [last_logged]  # the step it was at, not a periodic one

  rerun = subprocess.run(
      _command(config_file, workdir, f"--config.total_steps={last_logged + 2}"),
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Resumed from step {last_logged}" in rerun.stdout
  assert "mmjax run summary" in rerun.stdout
  steps = [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]
  assert steps == list(range(1, last_logged + 3))
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_ctrl_c_saves_current_step_and_exits_0(tmp_path):
  config_file = tmp_path / "c.py"
  config_file.write_text(CONFIG)
  workdir = tmp_path / "run"
  proc = _start_training(config_file, workdir, subprocess_env(1, tmp_path / "cache"))
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "Ctrl-C: saving the current step" in stderr
  last_logged = max(r["step"] for r in read_metrics(str(workdir)) if "loss" in r)
  assert os.listdir(workdir / "checkpoints") == [str(last_logged)]
  assert not (workdir / "lock.json").exists()  # released on the way out


def test_second_ctrl_c_exits_at_once(monkeypatch):
  """In-process: the first SIGINT asks for a save; the second calls os._exit(130) at once."""
  exits = []
  monkeypatch.setattr(os, "_exit", exits.append)
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal
  watcher = trainer.PreemptionWatcher()
  try:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
    assert watcher.should_stop(2) and exits == []
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert exits == [130]
  finally:
    watcher.close()
    restored = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, outer)
  assert restored is signal.default_int_handler
