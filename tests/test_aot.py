"""Deviceless TPU compilation (`mmjax.aot`) and the path a TPU host runs.

The compiles use libtpu's TPU compiler on this CPU-only machine for a v5e:2x4 slice
(8 chips). Paper configs keep their width, heads, patching and sequence lengths but run
1 layer per tower (2 for MBT's fusion) at a global batch of one example per chip:
compile time grows with depth, and the full-depth, full-batch answers are the README's
"Will it fit?" table (regenerated with `python -m mmjax.aot`). SigLIP runs at 256 px, so its 256 image tokens
take the Pallas splash kernel, which must compile under `shard_map` on 8 chips.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmjax import aot
from mmjax import sweep as sweep_lib
from mmjax.nn import attention
from mmjax.train.config import load_config_file
from mmjax.train.trainer import train_and_evaluate

from test_configs import TINY, _tiny  # pylint: disable=wrong-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x4"
SMALL = {"batch_size": 8, "eval_batch_size": 8, "model.dtype": "bfloat16"}
ONE_LAYER_TOWERS = {"model.image_depth": 1, "model.text_depth": 1}
# The demo compiles (and fits) for v5e:2x4 in test_every_config_compiles_at_tensor_4; its
# own width and depth add compile time (140 s here), not coverage.
PAPER = {
    "vit_b16_imagenet.py": {**SMALL, "model.depth": 1},
    "clip_b16.py": {**SMALL, **ONE_LAYER_TOWERS},
    "siglip_b16.py": {**SMALL, **ONE_LAYER_TOWERS, "data.image_size": 256},
    "mbt_audiovisual.py": {**SMALL, "model.num_layers": 2, "model.fusion_layer": 1},
}


@pytest.fixture(scope="module")
def devices():
  return aot.topology_devices(TOPOLOGY)


def _with(config, overrides):
  config = sweep_lib.apply_overrides(config, {k: v for k, v in overrides.items()
                                              if k.split(".")[-1] in _flat_keys(config, k)})
  for key, value in overrides.items():  # model fields the config leaves at their defaults
    section, _, field = key.partition(".")
    if field and field not in config[section]:
      config[section][field] = value
  return config


def _flat_keys(config, key):
  section, _, field = key.partition(".")
  node = config if not field else config[section]
  return node.keys()


def test_usable_hbm_is_where_the_tpu_compiler_starts_refusing(devices):
  """`fits` is judged against what the compiler accepts (v5e: 15.75 of 16 GiB), which
  counts arguments and temporaries together."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  usable = aot.hbm_bytes_per_device(devices)
  assert usable == aot.compiler_usable_hbm(devices[0]) == 15.75 * 2**30
  on_device = jax.sharding.SingleDeviceSharding(devices[0])
  # Sorting an (n, 1024) float32 product holds two copies of it.
  step = jax.jit(lambda held, x: held[0] + jnp.sort(jnp.outer(x, jnp.ones(1024)), axis=0)[0])

  def compiles(argument_bytes, temporary_bytes) -> bool:
    held = jax.ShapeDtypeStruct((argument_bytes // 4,), jnp.float32, sharding=on_device)
    x = jax.ShapeDtypeStruct((temporary_bytes // 8 // 1024,), jnp.float32, sharding=on_device)
    try:
      step.trace(held, x).lower().compile()
      return True
    except Exception as e:  # pylint: disable=broad-except
      assert "exceeds available HBM" in str(e), e
      return False

  margin = 2**27  # 128 MiB
  assert compiles(8 * 2**30, int(usable) - 8 * 2**30 - margin)
  assert not compiles(8 * 2**30, int(usable) - 8 * 2**30 + margin)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_compiles_and_fits_on_8_chips(name, devices, monkeypatch):
  taken = []
  original = attention.ATTENTION_BACKENDS.get
  monkeypatch.setattr(attention.ATTENTION_BACKENDS, "get",
                      lambda n: taken.append(n) or original(n))
  config = _with(load_config_file(os.path.join(ROOT, "configs", name)), PAPER[name])
  report = aot.compile_config(config, TOPOLOGY, devices, name)
  assert report.compiled, report.error
  assert report.eval_compiled, report.error
  assert report.fits and 0 < report.peak_bytes <= report.hbm_bytes == 15.75 * 2**30
  assert report.param_bytes > 0 and report.xla_flops_per_device > 0
  if name == "siglip_b16.py":  # the TPU default for 256 unmasked image tokens
    assert "splash" in taken and report.kernels["pallas (mosaic)"] > 0
  else:
    assert "splash" not in taken and not report.kernels


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_config_compiles_at_tensor_4(name, devices, tmp_path_factory):
  config = load_config_file(os.path.join(ROOT, "configs", name))
  # No data is read (mbt compiles from VGGSound's declared shapes; nothing is prepared).
  overrides = {**TINY[name], "mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 4}
  config = _tiny(config, overrides, str(tmp_path_factory.mktemp("data")))
  report = aot.compile_config(config, TOPOLOGY, devices, name)
  assert report.compiled and report.eval_compiled, report.error
  assert report.mesh == {"data": 2, "fsdp": 1, "tensor": 4}
  assert report.fits


def test_splash_in_shard_map_matches_reference_in_train_step(tmp_path, monkeypatch):
  """On the 8-device CPU mesh data=2 x fsdp=2 x tensor=2, SigLIP's 256 image tokens
  through splash (interpret mode, under shard_map) give the reference backend's loss."""
  config = load_config_file(os.path.join(ROOT, "configs", "siglip_b16.py"))
  config = _tiny(config, {**TINY["siglip_b16.py"], "data.image_size": 64,
                          "model.patch_size": 4, "total_steps": 2, "log_every": 1},
                 str(tmp_path / "data"))
  reference = train_and_evaluate(config, str(tmp_path / "reference"))

  original = attention.default_backend
  taken = []

  def splash_where_it_fits(**kw):
    fits = kw["q_length"] % 128 == 0 and kw["kv_length"] % 128 == 0
    choice = "splash" if fits and not kw["has_mask"] and not kw["has_bias"] else original(**kw)
    taken.append(choice)
    return choice

  monkeypatch.setattr(attention, "default_backend", splash_where_it_fits)
  splash = train_and_evaluate(config, str(tmp_path / "splash"))
  assert "splash" in taken
  for key in ("train/loss", "train/grad_norm"):
    np.testing.assert_allclose(splash[key], reference[key], rtol=1e-5)


def test_cli_reports_json_and_refuses_a_bad_topology(tmp_path):
  out = tmp_path / "report.json"
  base = [sys.executable, "-m", "mmjax.aot", "--config", "configs/vit_digits.py",
          "--config.model.depth=1", "--config.batch_size=8", "--config.eval_batch_size=8"]
  ok = subprocess.run(base + ["--topology", TOPOLOGY, "--json", str(out)], cwd=ROOT,
                      capture_output=True, text=True, timeout=600)
  assert ok.returncode == 0, ok.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["compiled"] and report["fits"] and report["devices"] == 8
  assert "fits" in ok.stdout
  bad = subprocess.run(base + ["--topology", "v5e:banana"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --topology='v5e:banana'")
  stray = subprocess.run(base + ["--topology", TOPOLOGY, "[--find-max-batch]"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
  assert stray.returncode == 1
  assert "unexpected arguments ['[--find-max-batch]']" in stray.stderr.strip().splitlines()[-1]


def test_gpu_topology_without_the_cuda_plugin_is_one_line(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top

  def find_spec(name, *args):  # as on a machine without the `gpu` extra
    raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  with pytest.raises(aot.AotError, match=r"pip install -e \".\[gpu\]\""):
    aot.topology_devices("h100:8")


HBM, STATE, FIXED, PER_EXAMPLE, STEP = 16 * 2**30, 2**30, 3 * 2**30, 7_777_777, 8


def _fake_compiler(monkeypatch, says_needed=True, wobble=0.0):
  """A compiler whose peak is linear in the batch (plus a deterministic wobble of up to
  `wobble` GiB, as small programs have) and which refuses above the HBM, saying what it
  needed or not, as the TPU compiler does. Returns the batches it compiled."""
  compiled = []

  def fake_compile(config, topology, devices, config_name="", train_only=False):
    del topology, devices
    assert train_only or not compiled, "the search compiles the train step alone"
    peak = FIXED + PER_EXAMPLE * config.batch_size + int(
        wobble * 2**30 * np.sin(config.batch_size * 0.37))
    compiled.append(config.batch_size)
    return aot.Report(config=config_name, topology=TOPOLOGY, devices=8, device_kind="TPU v5 lite",
                      mesh={"data": 8, "fsdp": 1, "tensor": 1}, global_batch=config.batch_size,
                      batch_step=STEP, compiled=peak <= HBM, out_of_memory=peak > HBM, fits=peak <= HBM,
                      hbm_bytes=HBM, peak_bytes=peak if peak <= HBM else 0, param_bytes=STATE,
                      needed_bytes=peak if peak > HBM and says_needed else 0)

  monkeypatch.setattr(aot, "compile_config", fake_compile)
  return compiled


def _search(first_batch, max_compiles=10):
  config = load_config_file(os.path.join(ROOT, "configs", "vit_digits.py"))
  config.batch_size = first_batch
  first = aot.compile_config(config, TOPOLOGY, None, "vit_digits")
  return first, aot.find_max_batch(config, TOPOLOGY, None, "vit_digits", first,
                                   max_compiles=max_compiles)


@pytest.mark.parametrize("says_needed", [True, False])
@pytest.mark.parametrize("first_batch", [64, 4096])
def test_find_max_batch_brackets_the_largest_fitting_batch(monkeypatch, first_batch,
                                                           says_needed):
  """The search alone (the real compile is tested above), from a batch that fits and from
  one that does not: 3-5 compiles when the peak is linear."""
  compiled = _fake_compiler(monkeypatch, says_needed)
  first, (best, bound) = _search(first_batch)
  exact = (HBM - FIXED) // PER_EXAMPLE // STEP * STEP
  assert best % STEP == 0 and exact * 0.98 <= best <= exact < bound <= best * 1.02 + STEP
  assert len(compiled) - 1 <= (3 if says_needed or first.fits else 5), compiled


def test_find_max_batch_narrows_the_bracket_when_the_peak_is_not_linear(monkeypatch):
  compiled = _fake_compiler(monkeypatch, wobble=0.4)
  _, (best, bound) = _search(64)
  assert best in compiled and bound in compiled and best < bound <= best * 1.02 + STEP
  assert len(compiled) - 1 <= 10


def test_find_max_batch_says_when_its_compile_limit_stopped_it(monkeypatch):
  _fake_compiler(monkeypatch, says_needed=False)
  first, (first.max_global_batch, first.max_batch_bound) = _search(4096, max_compiles=2)
  assert first.max_global_batch == 1024 and first.max_batch_bound == 2048
  assert "stopped at its compile limit" in first.summary()
  assert json.loads(json.dumps(first.to_json()))["xla_flops_per_device"] is None  # no NaN
  # One step of data x fsdp x grad_accum (8 x 1 x 4) apart is a finished search.
  first.batch_step, first.max_global_batch, first.max_batch_bound = 32, 1024, 1056
  assert first.summary().endswith("; 1056 does not")


def test_multi_slice_mesh_spans_the_slices_with_the_data_axis():
  from mmjax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train.config import ConfigError  # pylint: disable=g-import-not-at-top
  devices = aot.topology_devices("2xv5e:2x2")
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 1}, devices)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slices[:2] == 0).all() and (slices[2:] == 1).all()  # fsdp stays within a slice
  with pytest.raises(ConfigError, match="multiple of the 2 slices"):
    sharding_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, devices)
