"""The same training on a 2x2x2 mesh and on 1 device, and resuming onto a different mesh.

The 1-device runs happen in a subprocess (JAX_NUM_CPU_DEVICES=1): this process already
has 8 devices. The subprocess is this file run as a script.
"""
import os
import shutil
import subprocess
import sys

import numpy as np

from test_train_fixtures import losses, subprocess_env, tiny_config

from mmjax.train import trainer

MESH_222 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
CONSTANT_LR = {"schedule.name": "constant"}  # so 5-step and 7-step runs share a schedule
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_on_one_device(cache_dir, *args: str) -> None:
  env = subprocess_env(1, cache_dir)
  subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True, env=env,
                 cwd=ROOT, timeout=300)


def test_2x2x2_mesh_matches_one_device_and_resumes_onto_one_device(tmp_path):
  sharded, single, moved = tmp_path / "sharded", tmp_path / "single", tmp_path / "moved"
  trainer.train_and_evaluate(tiny_config(**MESH_222, **CONSTANT_LR), str(sharded))
  shutil.copytree(sharded, moved)  # holds the 8-device run's step-5 checkpoint

  # On 1 device: 7 fresh steps, and the 8-device checkpoint continued to step 7.
  _run_on_one_device(tmp_path / "cache", str(single), str(moved))

  eight, one, resumed_on_one = losses(sharded), losses(single), losses(moved)
  np.testing.assert_allclose([eight[s] for s in range(1, 6)], [one[s] for s in range(1, 6)],
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose([resumed_on_one[s] for s in (6, 7)], [one[s] for s in (6, 7)],
                             rtol=0, atol=1e-5)

if __name__ == "__main__":
  import jax  # noqa: E402
  jax.config.update("jax_num_cpu_devices", 1)
  fresh_dir, moved_dir = sys.argv[1:3]
  one_device = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
  trainer.train_and_evaluate(tiny_config(total_steps=7, **one_device, **CONSTANT_LR), fresh_dir)
  trainer.train_and_evaluate(tiny_config(total_steps=7, **one_device, **CONSTANT_LR), moved_dir)
