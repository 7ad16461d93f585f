"""Test setup: 8 simulated CPU devices, so sharding tests see a real mesh.

Must run before the first JAX operation; single-device tests simply use jax.devices()[0].
"""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
