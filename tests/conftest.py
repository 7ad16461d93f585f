"""Test setup: 8 simulated CPU devices, so sharding tests see a real mesh.

Must run before the first JAX operation; single-device tests simply use jax.devices()[0].
Tests are compile-bound with tiny shapes, so XLA's backend optimisations are switched off:
it halves the suite's CPU time and does not change results beyond float rounding
(subprocesses started by tests inherit both settings).
"""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# libtpu (the `tpu` extra, for the deviceless TPU compiles) would otherwise look for a TPU
# VM's metadata, and refuse to load in two test workers at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# Many tests train the same tiny programs (resume, relaunch, subprocess hosts): one
# persistent compilation cache for the whole run, shared by the test workers and the
# processes they start, compiles each once. Made by the first process (pytest's
# controller), which removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmjax_test_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
