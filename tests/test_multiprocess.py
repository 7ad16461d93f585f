"""A real 2-process run on CPU (jax.distributed over gloo): trains, checkpoints, resumes.

Both processes run the user-facing command, `python -m mmjax.main`, exactly as on a
cluster (see mmjax/train/LAUNCH.md), with 2 CPU devices each.
"""
import os
import subprocess
import sys

import portpicker

from test_train_fixtures import read_metrics, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
from tests.test_train_fixtures import tiny_config

def get_config(arg=None):
  return tiny_config(batch_size=16, eval_batch_size=8, checkpoint_every=2,
                     **{"schedule.name": "constant"})
"""


def _launch(config_path: str, workdir: str, total_steps: int, cache_dir) -> None:
  port = portpicker.pick_unused_port()
  env = subprocess_env(2, cache_dir)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mmjax.main", f"--config={config_path}", f"--workdir={workdir}",
       f"--config.total_steps={total_steps}", f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  config_path = tmp_path / "config.py"
  config_path.write_text(CONFIG)
  workdir = str(tmp_path / "run")

  _launch(str(config_path), workdir, total_steps=4, cache_dir=tmp_path / "cache")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  data_files = os.listdir(os.path.join(workdir, "checkpoints", "4", "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_files)

  _launch(str(config_path), workdir, total_steps=6, cache_dir=tmp_path / "cache")
  steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]  # one writer; the second launch resumed at step 5
  eval_records = [r for r in read_metrics(workdir) if "eval/num_examples" in r]
  assert [r["eval/num_examples"] for r in eval_records] == [37, 37]  # exact over processes
