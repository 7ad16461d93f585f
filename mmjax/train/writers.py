"""Where metrics go: `WORKDIR/metrics.jsonl`, TensorBoard event files, the console.

Only process 0 writes (`MetricWriter(active=False)` on the others is a no-op), so a
multi-host run produces one log. In a gs:// workdir, where objects cannot be appended to,
metrics.jsonl and the TensorBoard event file are uploaded whole, at most every
`OBJECT_FLUSH_SECONDS` and at close. Also here: the device peak-FLOP/s table behind MFU
and the console progress bar.
"""
import json
import os
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mmjax.train import paths

OBJECT_FLUSH_SECONDS = 30.0

# Dense bfloat16 peak FLOP/s per device (per chip for TPUs), from vendor datasheets.
# Matched as substrings of `device.device_kind`, most specific first.
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 45e12),
    ("B200", 2250e12), ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
    ("V100", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("T4", 65e12),
)

_measured_cpu_peak: Optional[float] = None


def measure_matmul_peak(size: int = 512, repeats: int = 5) -> float:
  """FLOP/s of a float32 matmul on this device: the 'peak' for CPUs, which have no table."""
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(x).block_until_ready()
  return 2 * size**3 * repeats / (time.perf_counter() - start)


def device_peak_flops(device: Any = None) -> float:
  """Peak FLOP/s of one device: the datasheet value, or a measured matmul rate on CPU."""
  global _measured_cpu_peak
  device = device or jax.local_devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  if device.platform == "cpu":
    if _measured_cpu_peak is None:
      _measured_cpu_peak = measure_matmul_peak()
    return _measured_cpu_peak
  logging.warning("No peak FLOP/s known for device kind %r; MFU will not be reported.", kind)
  return float("nan")


class MetricWriter:
  """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, active: bool = True):
    self.active = active
    self._json = self._tb = None
    if not active:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    if paths.is_url(workdir):
      self._json, self._flush_every = _ObjectAppender(path), OBJECT_FLUSH_SECONDS
    else:
      os.makedirs(workdir, exist_ok=True)
      self._json, self._flush_every = open(path, "a"), 0.0
    self._last_flush = time.monotonic()
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      logging.warning("tensorboardX is not installed; metrics go to metrics.jsonl only.")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends one record. A write that fails for lack of space is logged as an error and
    training goes on: the checkpointer then stops the run at its next save, naming the
    save error and the steps kept (a metrics line is not worth losing the training)."""
    if not self.active:
      return
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    try:
      self._json.write(json.dumps(record) + "\n")
      if self._tb is not None:
        for key, value in record.items():
          if key != "step" and isinstance(value, (int, float)):
            self._tb.add_scalar(key, value, step)
      if time.monotonic() - self._last_flush >= self._flush_every:
        self._last_flush = time.monotonic()
        self._json.flush()
        if self._tb is not None:
          self._tb.flush()
    except OSError as e:
      logging.error("Could not write the metrics of step %d: %s", step, e)

  def close(self) -> None:
    """Flushes and closes; a failing flush (e.g. a full disk) is logged, not raised, so it
    never masks the error that is already stopping the run."""
    for name, handle in (("metrics.jsonl", self._json), ("TensorBoard", self._tb)):
      if handle is None:
        continue
      try:
        handle.close()
      except OSError as e:
        logging.error("Could not flush %s: %s; its last records may be missing.", name, e)


class _ObjectAppender:
  """An append-only text file in a bucket: GCS objects cannot be appended to, so `flush`
  uploads the whole text (what the object held when opened, then every line since)."""

  def __init__(self, url: str):
    self._url = url
    self._parts = [paths.read_text(url) or ""]
    self._flushed = True

  def write(self, text: str) -> None:
    self._parts.append(text)
    self._flushed = False

  def flush(self) -> None:
    if not self._flushed:
      self._parts = ["".join(self._parts)]
      paths.write_text(self._url, self._parts[0])
      self._flushed = True

  def close(self) -> None:
    self.flush()


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()
  return value


class ProgressBar:
  """tqdm bar over the steps with steps/s and ETA, and the latest loss in its postfix."""

  def __init__(self, total: int, initial: int, active: bool):
    self._bar = None
    if active:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            smoothing=0.1)

  def update(self, steps: int = 1, **postfix: float) -> None:
    if self._bar is not None:
      self._bar.update(steps)
      if postfix:
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
