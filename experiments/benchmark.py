"""mmjax benchmark: step time, throughput, MFU, compile time and memory, against baselines.

    python experiments/benchmark.py                       # every case, full sizes
    python experiments/benchmark.py --quick --json /tmp/b.json   # tiny sizes, seconds
    python experiments/benchmark.py --cases attention --attention-lengths 256,1024

Cases (`--cases`, comma-separated):
  attention  forward + backward of attention alone at each length, no mask / key-padding
             mask / causal: mmjax `dot_product_attention` vs `jax.nn.dot_product_attention`
             vs `flax.linen.dot_product_attention` (the kernel inside flax's
             MultiHeadDotProductAttention), and mmjax `MultiHeadAttention` vs
             `flax.linen.MultiHeadDotProductAttention` (projections included). From
             `--chunk-from-length` on, also the one of mmjax's "reference" / "chunked"
             backends that its default did not pick.
  vit        ViT-S/16 and ViT-B/16 train steps (mmjax ViT vs a stock-flax ViT of identical
             shape, `experiments/baselines.py`), both through the mmjax train step.
  clip       a CLIP B/16 two-tower train step.
  fusion     a train step of the multimodal model for every registered fusion strategy
             at one shared configuration.
  compile    compile time of a scanned encoder train step at 2 and 24 layers (and the
             unrolled stack for contrast).
  fsdp       per-device parameter + optimizer bytes of a ViT train state on an 8-device
             fsdp mesh (simulated CPU devices, in a child process).
  ring       the contrastive losses (CLIP softmax, SigLIP sigmoid), loss + gradients of
             a global batch on 8 simulated CPU devices (data 4 x fsdp 2, a child
             process): the ring (mmjax/ring_loss.py) against the dense loss, step time
             and XLA temp memory per device as ratios of the same run; and the temp
             memory of a two-tower train step whose batch is reached by exact
             accumulation against the same batch in one go.

How it measures (the machine may be shared and noisy, so every figure that matters is a
ratio inside one process):
  * each case's candidates and a large float32 matmul are run round-robin, step by step,
    after `--warmup` untimed steps; step time and examples/s use the median of `--steps`
    timings, and the speed ratios compare medians from the same rounds;
  * MFU = analytic matmul FLOPs per step / best step time / the best float32 matmul
    FLOP/s seen in the whole run (on an accelerator, pass `--peak-tflops` instead);
    least-disturbed against least-disturbed, and conservative (see `add_mfu`);
  * FLOPs are counted from the traced program (`mmjax.models.flops`: 2 x M x N x K per
    matmul, backward included), so mmjax and baselines are counted by the same rule;
  * compile time is lowering + XLA compilation of the jitted step;
  * memory is XLA's buffer assignment of the compiled step (`memory_analysis`): `temp` is
    the scratch the step needs besides its inputs and outputs, `peak` adds arguments and
    outputs (minus donated aliases).

`--json FILE` writes every record; `--markdown FILE` writes the table.
"""
import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Runs as a script from the repository root (python experiments/benchmark.py) or as a module.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from experiments import baselines  # noqa: E402
from mmjax.models import flops as flops_lib  # noqa: E402
from mmjax.nn import attention as attention_lib  # noqa: E402
from mmjax.train import config as config_lib  # noqa: E402
from mmjax.train import optim, trainer  # noqa: E402
from mmjax.train import sharding as sharding_lib  # noqa: E402
from mmjax.train import state as state_lib  # noqa: E402

CASES = ("attention", "vit", "clip", "fusion", "compile", "fsdp", "ring")
MASKS = ("none", "padding", "causal")


# ----------------------------------------------------------------------------------------
# Measuring.
# ----------------------------------------------------------------------------------------

def interleaved_times(fns: Dict[str, Callable[[], Any]], steps: int,
                      warmup: int) -> Dict[str, List[float]]:
  """Seconds of each call of each fn, run round-robin so load spikes hit all alike."""
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(steps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def matmul_peak(size: int) -> Dict[str, Any]:
  """A jitted float32 [size, size] @ [size, size] and its FLOPs: the peak of this machine."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  fn = jax.jit(jnp.matmul).lower(a, b).compile()
  return {"fn": lambda: fn(a, b), "flops": 2.0 * size ** 3}


def compile_with_stats(jitted, *args) -> Dict[str, Any]:
  """Compiles `jitted` for `args`; returns the executable, compile seconds and memory."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  return dict(compiled=compiled, compile_s=seconds, **memory_of(compiled))


def memory_of(compiled) -> Dict[str, Optional[int]]:
  """XLA's buffer sizes for one executable (None where the backend does not report them)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    m = None
  if m is None:
    return {"temp_bytes": None, "peak_bytes": None}
  peak = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)
  return {"temp_bytes": int(m.temp_size_in_bytes), "peak_bytes": int(peak)}


def matmul_flops(fn: Callable, *args) -> float:
  """Matmul FLOPs of one call of fn(*args), counted from its traced program."""
  return float(flops_lib.count_flops(fn, *args).matmul)


@dataclasses.dataclass
class Context:
  """What every case needs: sizes, the timing protocol, the peak, the results list."""
  args: argparse.Namespace
  peak: Dict[str, Any]
  records: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

  def time_group(self, group: str, candidates: Dict[str, Dict[str, Any]],
                 subject: Optional[str] = None, examples: Optional[int] = None) -> None:
    """Times candidates {name: {fn, flops, compile_s, temp_bytes, ...}} with the peak.

    Adds one record per candidate: median step time, throughput, MFU against the matmul
    timed in the same rounds; the `subject` (mmjax) also gets its speed and memory ratio
    to every other candidate (>1 speed = mmjax faster, <1 memory = mmjax smaller).
    """
    fns = {name: c["fn"] for name, c in candidates.items()}
    # The matmul runs three times per round: the first call after a big step is often
    # slowed by cold caches, and the peak is the best the machine can do.
    peak_names = [f"_peak{i}" for i in range(3)]
    fns.update({name: self.peak["fn"] for name in peak_names})
    times = interleaved_times(fns, self.args.steps, self.args.warmup)
    times["_peak"] = sum((times.pop(name) for name in peak_names), [])
    medians = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    peak_flops_per_s = (self.args.peak_tflops * 1e12 if self.args.peak_tflops
                        else self.peak["flops"] / best["_peak"])
    for name, c in candidates.items():
      step_s = medians[name]
      record = {"group": group, "name": name, "step_s": step_s, "best_step_s": best[name],
                "times_s": times[name], "peak_times_s": times["_peak"],
                "flops_per_step": c.get("flops"),
                "compile_s": c.get("compile_s"), "temp_bytes": c.get("temp_bytes"),
                "peak_bytes": c.get("peak_bytes"),
                "peak_flops_per_s_same_rounds": peak_flops_per_s}
      record.update(c.get("extra", {}))
      if examples:
        record["examples_per_s"] = examples / step_s
      if c.get("flops"):
        record["flops_per_s"] = c["flops"] / best[name]
        record["mfu_same_rounds"] = record["flops_per_s"] / peak_flops_per_s
      if name == subject:
        others = [n for n in candidates if n != subject]
        record["speedup_vs"] = {n: medians[n] / step_s for n in others}
        record["temp_bytes_vs"] = {
            n: c["temp_bytes"] / candidates[n]["temp_bytes"] for n in others
            if c.get("temp_bytes") is not None and candidates[n].get("temp_bytes")}
      self.records.append(record)
      _print_record(record)


def _print_record(r: Dict[str, Any]) -> None:
  parts = [f"{r['group']:<28} {r['name']:<22} {r['step_s'] * 1e3:10.2f} ms"]
  if r.get("mfu_same_rounds") is not None:
    parts.append(f"MFU(same rounds) {100 * r['mfu_same_rounds']:5.1f}%")
  for other, ratio in r.get("speedup_vs", {}).items():
    parts.append(f"x{ratio:.2f} vs {other}")
  print("  ".join(parts), flush=True)


# ----------------------------------------------------------------------------------------
# Train steps (through the mmjax trainer's own step, optimizer and sharding helpers).
# ----------------------------------------------------------------------------------------

def _train_config():
  config = config_lib.default_config()
  config.schedule.warmup_steps = 0  # so every timed step really updates the parameters
  return config


def train_step_candidate(model: nn.Module, batch: Dict[str, Any],
                         mesh: Optional[jax.sharding.Mesh] = None,
                         grad_accum_steps: int = 1) -> Dict[str, Any]:
  """The mmjax trainer's jitted, donating train step for `model` on `batch`, compiled.

  Returns {fn, flops, compile_s, temp_bytes, peak_bytes, extra}; `fn()` runs one step.
  """
  config = _train_config()
  mesh = mesh or sharding_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  rules = sharding_lib.axis_rules(config.axis_rules)
  example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # as the trainer traces it
    boxed = state_lib.abstract_params(model, example, jax.random.PRNGKey(0))
    tx, schedule = optim.make_optimizer(config, state_lib.unbox_abstract(boxed))
    init, abstract, shardings = state_lib.create_train_state(model, tx, example, 0, mesh, rules)
    step = trainer.make_train_step(model, tx, schedule, grad_accum_steps=grad_accum_steps)
    batch_shardings = {k: sharding_lib.batch_sharding(mesh) for k in batch}
    jitted = jax.jit(step, in_shardings=(shardings, batch_shardings),
                     out_shardings=(shardings, sharding_lib.replicated(mesh)),
                     donate_argnums=0)
    stats = compile_with_stats(jitted, abstract, example)
    flops = matmul_flops(step, abstract, example)
    holder = {"state": init()}
    batch = jax.device_put(batch, batch_shardings)

  def run():
    holder["state"], metrics = stats["compiled"](holder["state"], batch)
    return metrics["loss"]

  params = state_lib.param_counts(holder["state"].params)["total"]
  return dict(fn=run, flops=flops, compile_s=stats["compile_s"],
              temp_bytes=stats["temp_bytes"], peak_bytes=stats["peak_bytes"],
              extra={"params": params})


def _image_batch(batch_size: int, image_size: int, num_classes: int) -> Dict[str, Any]:
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.normal(size=(batch_size, image_size, image_size, 3)),
                               jnp.float32),
          "label": jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32)}


# ----------------------------------------------------------------------------------------
# Cases.
# ----------------------------------------------------------------------------------------

def _attention_mask(kind: str, batch: int, length: int):
  """(bool mask [B, 1, 1|L, L] or None, is_causal) for a mask kind."""
  if kind == "none":
    return None, False
  if kind == "padding":  # the last quarter of every sequence is padding
    valid = jnp.arange(length) < length - length // 4
    return jnp.broadcast_to(valid[None, None, None, :], (batch, 1, 1, length)), False
  if kind == "causal":
    return None, True
  raise ValueError(f"Unknown mask kind {kind!r}; expected one of {MASKS}.")


def _fwd_bwd(attend: Callable, ct):
  """Jitted (q, k, v) -> grads of <attend(q, k, v), ct>: one training use of attention."""
  loss = lambda q, k, v: jnp.vdot(attend(q, k, v), ct)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def case_attention(ctx: Context) -> None:
  a = ctx.args
  heads, head_dim = a.attention_heads, a.attention_head_dim
  for length in a.attention_lengths:
    batch = max(1, a.attention_tokens // length)
    q, k, v, ct = (jax.random.normal(jax.random.key(i), (batch, length, heads, head_dim),
                                     jnp.float32) for i in range(4))
    flops = 4.0 * batch * heads * length * length * head_dim  # QK^T and PV forward
    for kind in a.attention_masks:
      mask, causal = _attention_mask(kind, batch, length)
      full_mask = mask
      if causal:  # flax's kernel has no is_causal: give it the equivalent mask
        full_mask = nn.make_causal_mask(jnp.ones((batch, length)))
      fns = {
          "mmjax": lambda q, k, v: attention_lib.dot_product_attention(
              q, k, v, mask=mask, is_causal=causal),
          "jax.nn": lambda q, k, v: jax.nn.dot_product_attention(
              q, k, v, mask=mask, is_causal=causal),
          "flax.linen": lambda q, k, v: nn.dot_product_attention(q, k, v, mask=full_mask),
      }
      if length >= a.chunk_from_length:
        # Long sequences: also time whichever of "reference" / "chunked" mmjax's default
        # did not pick, to check the choice.
        picked = attention_lib.default_backend(has_mask=mask is not None, q_length=length,
                                               kv_length=length, head_dim=head_dim)
        other = "reference" if picked == "chunked" else "chunked"
        fns[f"mmjax {other}"] = functools.partial(
            attention_lib.dot_product_attention, mask=mask, is_causal=causal,
            implementation=other)
      candidates = {}
      for name, attend in fns.items():
        stats = compile_with_stats(_fwd_bwd(attend, ct), q, k, v)
        compiled = stats.pop("compiled")
        candidates[name] = dict(stats, fn=functools.partial(compiled, q, k, v),
                                flops=3.0 * flops,  # backward = 2x the forward matmuls
                                extra={"length": length, "batch": batch, "mask": kind})
        # How many float32 [L, L] blocks per (example, head) the step's scratch could hold.
        candidates[name]["extra"]["lxl_blocks_per_head"] = (
            stats["temp_bytes"] / (4.0 * batch * heads * length * length)
            if stats["temp_bytes"] is not None else None)
      ctx.time_group(f"attention L={length} {kind}", candidates, subject="mmjax",
                     examples=batch)
    _attention_modules(ctx, batch, length, heads, head_dim)


def _attention_modules(ctx: Context, batch: int, length: int, heads: int, head_dim: int):
  """mmjax MultiHeadAttention vs flax MultiHeadDotProductAttention, self-attention fwd+bwd."""
  x = jax.random.normal(jax.random.key(0), (batch, length, heads * head_dim), jnp.float32)
  modules = {"mmjax MHA": attention_lib.MultiHeadAttention(num_heads=heads),
             "flax MHDPA": nn.MultiHeadDotProductAttention(num_heads=heads)}
  candidates = {}
  for name, module in modules.items():
    params = module.init(jax.random.key(1), x)
    loss = lambda p, x, m=module: jnp.mean(m.apply(p, x) ** 2)
    grad = jax.grad(loss, argnums=(0, 1))
    stats = compile_with_stats(jax.jit(grad), params, x)
    compiled = stats.pop("compiled")
    candidates[name] = dict(stats, fn=functools.partial(compiled, params, x),
                            flops=matmul_flops(grad, params, x),
                            extra={"length": length, "batch": batch, "mask": "none"})
  ctx.time_group(f"MHA module L={length}", candidates, subject="mmjax MHA", examples=batch)


def _vit_pair(variant: str, a: argparse.Namespace):
  """(mmjax ViT, stock-flax ViT classifier) of identical shape; both take the same batch."""
  from mmjax.models import vit as vit_lib
  sizes = vit_lib.decode_variant(variant)
  if a.vit_depth:
    sizes["depth"] = a.vit_depth
  dtype = jnp.dtype(a.dtype)
  options = {k: v for k, v in (("scan_layers", a.scan_layers), ("remat_policy", a.remat_policy))
             if v is not None}
  ours = vit_lib.ViT(variant=variant, depth=sizes["depth"], num_classes=a.num_classes,
                     dtype=dtype, **options)
  stock = baselines.StockViT(num_classes=a.num_classes, patch_size=sizes["patch_size"],
                             width=sizes["width"], depth=sizes["depth"],
                             num_heads=sizes["num_heads"], mlp_dim=sizes["mlp_dim"], dtype=dtype)
  return ours, baselines.ImageClassifier(stock)


def case_vit(ctx: Context) -> None:
  a = ctx.args
  for variant in a.vit_variants:
    ours, stock = _vit_pair(variant, a)
    batch = _image_batch(a.vit_batch, a.image_size, a.num_classes)
    candidates = {f"mmjax ViT-{variant}": train_step_candidate(ours, batch),
                  f"flax ViT-{variant}": train_step_candidate(stock, batch)}
    for c in candidates.values():
      c["extra"].update(image_size=a.image_size, batch=a.vit_batch, dtype=a.dtype)
    ctx.time_group(f"ViT-{variant} train step", candidates, subject=f"mmjax ViT-{variant}",
                   examples=a.vit_batch)


def case_clip(ctx: Context) -> None:
  from mmjax.models import two_tower
  a = ctx.args
  model = two_tower.TwoTower(
      vocab_size=a.clip_vocab, embed_dim=512, patch_size=16, image_width=768,
      image_depth=a.clip_depth or 12, image_heads=12, image_mlp_dim=3072,
      text_width=512, text_depth=a.clip_depth or 12, text_heads=8, text_mlp_dim=2048,
      max_text_len=77, dtype=a.dtype)
  rng = np.random.default_rng(0)
  batch = _image_batch(a.clip_batch, a.image_size, 2)
  del batch["label"]
  batch["text"] = jnp.asarray(rng.integers(1, a.clip_vocab, (a.clip_batch, 77)), jnp.int32)
  candidate = train_step_candidate(model, batch)
  candidate["extra"].update(image_size=a.image_size, batch=a.clip_batch, dtype=a.dtype)
  ctx.time_group("CLIP B/16 train step", {"mmjax CLIP B/16": candidate},
                 examples=a.clip_batch)


def case_fusion(ctx: Context) -> None:
  from mmjax.models import multimodal
  a = ctx.args
  candidates = {}
  for fusion in multimodal.fusion_names():
    model, spec = flops_lib.fusion_table_model(fusion, batch_size=a.fusion_batch)
    batch = {k: jnp.ones(s.shape, s.dtype) for k, s in spec.items()}  # timing needs no values
    candidates[fusion] = train_step_candidate(model, batch)
    candidates[fusion]["extra"].update(batch=a.fusion_batch)
  ctx.time_group("fusion train step", candidates, examples=a.fusion_batch)


def case_compile(ctx: Context) -> None:
  """Compile seconds of an encoder train step at each depth, scanned and unrolled."""
  from mmjax.nn import transformer
  a = ctx.args
  depths = sorted(a.compile_depths)
  x = jax.random.normal(jax.random.key(0), (2, 64, a.compile_width), jnp.float32)
  for scan in (True, False):
    seconds = {}
    for layers in depths:
      block = transformer.BlockConfig(num_heads=4, mlp_dim=4 * a.compile_width)
      encoder = transformer.Encoder(num_layers=layers, block=block, scan_layers=scan)
      params = jax.eval_shape(encoder.init, jax.random.key(0), x)
      loss = lambda p, x, m=encoder: jnp.mean(m.apply(p, x) ** 2)
      start = time.perf_counter()
      jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
      seconds[layers] = time.perf_counter() - start
      record = {"group": "compile time", "name": f"{'scan' if scan else 'unrolled'} {layers} layers",
                "compile_s": seconds[layers], "layers": layers, "scan_layers": scan,
                "width": a.compile_width,
                "ratio_vs_shallowest": seconds[layers] / seconds[depths[0]]}
      ctx.records.append(record)
      print(f"compile time  {record['name']:<20} {record['compile_s']:8.2f} s  "
            f"x{record['ratio_vs_shallowest']:.2f} vs {depths[0]} layers", flush=True)


def case_fsdp(ctx: Context) -> None:
  """Runs `fsdp_bytes` in a child process with 8 simulated devices (set before jax starts)."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8")
  cmd = [sys.executable, os.path.abspath(__file__), "--fsdp-child",
         "--fsdp-variant", ctx.args.fsdp_variant, "--image-size", str(ctx.args.image_size)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=_ROOT)
  if out.returncode:
    raise RuntimeError(f"fsdp child failed:\n{out.stderr[-4000:]}")
  record = json.loads(out.stdout.strip().splitlines()[-1])
  ctx.records.append(record)
  print(f"fsdp {record['devices']} devices  per-device {record['per_device_bytes'] / 2**20:.1f} "
        f"MiB of {record['total_bytes'] / 2**20:.1f} MiB (bound "
        f"{record['bound_bytes'] / 2**20:.1f} MiB)  ok={record['within_bound']}", flush=True)


def case_ring(ctx: Context) -> None:
  """Runs `ring_records` in a child process with 8 simulated devices."""
  a = ctx.args
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8")
  cmd = [sys.executable, os.path.abspath(__file__), "--ring-child",
         "--ring-batch", str(a.ring_batch), "--ring-dim", str(a.ring_dim),
         "--accum-batch", str(a.accum_batch), "--accum-steps", str(a.accum_steps),
         "--steps", str(a.steps), "--warmup", str(a.warmup), "--peak-size", str(a.peak_size)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=_ROOT)
  if out.returncode:
    raise RuntimeError(f"ring child failed:\n{out.stderr[-4000:]}")
  print("\n".join(l for l in out.stdout.splitlines()[:-1]), flush=True)
  ctx.records.extend(json.loads(out.stdout.strip().splitlines()[-1]))


def ring_records(args: argparse.Namespace) -> List[Dict[str, Any]]:
  """Dense vs ring contrastive loss + gradients, and accumulated vs one-go train steps."""
  from mmjax import losses, ring_loss
  from mmjax.models import two_tower
  devices = jax.devices()
  mesh = sharding_lib.make_mesh(dict(data=len(devices) // 2, fsdp=2, tensor=1), devices)
  ctx = Context(args, peak=matmul_peak(args.peak_size))
  n, d = args.ring_batch, args.ring_dim
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, n, d)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  dense = {"softmax": lambda x, y, s, b: losses.clip_loss(x, y, s)[0],
           "sigmoid": lambda x, y, s, b: losses.siglip_loss(x, y, s, b)[0]}
  ring = {"softmax": lambda x, y, s, b: ring_loss.ring_contrastive_loss(
              x, y, s, kind="softmax")[0],
          "sigmoid": lambda x, y, s, b: ring_loss.ring_contrastive_loss(
              x, y, s, b, kind="sigmoid")[0]}
  with jax.set_mesh(mesh):
    x, y = (jax.device_put(v, sharding_lib.batch_sharding(mesh)) for v in z)
    inputs = (x, y, jnp.float32(np.log(10.0)), jnp.float32(-10.0))
    for kind in ("softmax", "sigmoid"):
      candidates = {}
      for impl, fns in (("dense", dense), ("ring", ring)):
        grad = jax.jit(jax.value_and_grad(fns[kind], argnums=(0, 1, 2, 3)))
        stats = compile_with_stats(grad, *inputs)
        compiled = stats.pop("compiled")
        candidates[impl] = dict(stats, fn=functools.partial(compiled, *inputs), extra=dict(
            batch=n, dim=d, devices=len(devices), loss=kind))
      ctx.time_group(f"{kind} loss+grads N={n} on {len(devices)} devices", candidates,
                     subject="ring", examples=n)
      ratio = ctx.records[-1]["temp_bytes_vs"].get("dense")
      print(f"  ring / dense XLA temp memory per device: "
            + (f"{ratio:.4f}" if ratio is not None else "n/a"), flush=True)
  # Exact accumulation keeps about one micro-batch of activations: temp memory of a
  # small two-tower train step at batch B in one go, accumulated K x B / K, and at B / K.
  model = two_tower.TwoTower(vocab_size=1000, embed_dim=64, patch_size=8, image_width=128,
                             image_depth=2, image_heads=4, text_width=128, text_depth=2,
                             text_heads=4, max_text_len=32)
  b, k = args.accum_batch, args.accum_steps
  for rows, steps in ((b, 1), (b, k), (b // k, 1)):
    batch = {"image": jnp.zeros((rows, 32, 32, 3), jnp.float32),
             "text": jnp.ones((rows, 32), jnp.int32)}
    c = train_step_candidate(model, batch, mesh, grad_accum_steps=steps)
    record = {"group": "accumulation memory", "name": f"batch {rows}"
              + (f" = {steps} x {rows // steps}" if steps > 1 else ""),
              "batch": rows, "grad_accum_steps": steps, "devices": len(devices),
              "temp_bytes": c["temp_bytes"], "compile_s": c["compile_s"]}
    ctx.records.append(record)
    print(f"accumulation memory  {record['name']:<20} temp "
          f"{record['temp_bytes'] / 2**20:8.1f} MiB per device", flush=True)
  return ctx.records


def fsdp_bytes(variant: str, image_size: int) -> Dict[str, Any]:
  """Per-device bytes of a sharded ViT train state (params + adam) on an fsdp=N mesh."""
  devices = jax.devices()
  mesh = sharding_lib.make_mesh(dict(data=1, fsdp=len(devices), tensor=1), devices)
  config = _train_config()
  rules = sharding_lib.axis_rules(config.axis_rules)
  from mmjax.models import vit as vit_lib
  model = vit_lib.ViT(variant=variant, num_classes=1000)
  example = {"image": jax.ShapeDtypeStruct((len(devices), image_size, image_size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((len(devices),), jnp.int32)}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = state_lib.abstract_params(model, example, jax.random.PRNGKey(0))
    tx, _ = optim.make_optimizer(config, state_lib.unbox_abstract(boxed))
    init, _, _ = state_lib.create_train_state(model, tx, example, 0, mesh, rules)
    state = init()
  per_device = {d: 0 for d in devices}
  total = replicated = 0
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    total += leaf.nbytes
    if leaf.sharding.is_fully_replicated:
      replicated += leaf.nbytes
    for shard in leaf.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  worst = max(per_device.values())
  bound = (total - replicated) / len(devices) + replicated
  return {"group": "fsdp", "name": f"ViT-{variant} adamw state", "devices": len(devices),
          "total_bytes": int(total), "replicated_bytes": int(replicated),
          "per_device_bytes": int(worst), "bound_bytes": int(bound),
          "per_device_fraction": worst / total, "within_bound": bool(worst <= bound)}


# ----------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------

def _fmt(value, kind: str) -> str:
  if value is None:
    return ""
  if kind == "ms":
    return f"{value * 1e3:.1f}"
  if kind == "pct":
    return f"{100 * value:.1f}%"
  if kind == "x":
    return ", ".join(f"x{v:.2f} {k}" for k, v in value.items())
  if kind == "mib":
    return f"{value / 2**20:.1f}"
  if kind == "f2":
    return f"{value:.2f}"
  if kind == "s":
    return f"{value:.2f}"
  return f"{value:.1f}" if isinstance(value, float) else str(value)


COLUMNS = (("group", "case", "str"), ("name", "candidate", "str"), ("step_s", "step ms", "ms"),
           ("examples_per_s", "examples/s", "num"), ("mfu", "MFU", "pct"),
           ("speedup_vs", "mmjax speed vs", "x"),
           ("compile_s", "compile s", "s"), ("temp_bytes", "temp MiB", "mib"),
           ("peak_bytes", "peak MiB", "mib"), ("lxl_blocks_per_head", "LxL blocks/head", "f2"))


def markdown_table(records: Sequence[Dict[str, Any]]) -> str:
  timed = [r for r in records if "step_s" in r]
  lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
  for r in timed:
    lines.append("| " + " | ".join(_fmt(r.get(key), kind) for key, _, kind in COLUMNS) + " |")
  other = [r for r in records if "step_s" not in r]
  if other:
    lines.append("")
  for r in other:
    if r["group"] == "compile time":
      lines.append(f"- compile {r['name']}: {r['compile_s']:.2f} s "
                   f"({r['ratio_vs_shallowest']:.2f}x the shallowest)")
    elif r["group"] == "accumulation memory":
      lines.append(f"- accumulation memory, two-tower train step, {r['name']} on "
                   f"{r['devices']} devices: temp {r['temp_bytes'] / 2**20:.1f} MiB per device")
    elif r["group"] == "fsdp":
      lines.append(f"- fsdp {r['name']} on {r['devices']} devices: per device "
                   f"{r['per_device_bytes'] / 2**20:.1f} MiB of {r['total_bytes'] / 2**20:.1f} "
                   f"MiB total ({100 * r['per_device_fraction']:.1f}%; bound 1/{r['devices']} + "
                   f"replicated = {r['bound_bytes'] / 2**20:.1f} MiB; within bound: "
                   f"{r['within_bound']})")
  return "\n".join(lines) + "\n"


def markdown_report(results: Dict[str, Any]) -> str:
  """The table with a header saying where, when and how it was measured."""
  env = results["environment"]
  peak = results.get("peak_flops_per_s")
  lines = [f"Measured {env['time_utc']} on {env['cpu_count']} {env['backend']} cores "
           f"({env['device']}), jax {env['jax']}: "
           f"`python experiments/benchmark.py {' '.join(env['argv'])}`.",
           f"MFU is against {peak / 1e9:.1f} GFLOP/s, "
           + ("the given accelerator peak. " if results.get("peak_tflops_given")
              else "the best float32 matmul seen in the run. ")
           + "Step time: median after warm-up; speed ratios: medians of the same "
           "interleaved rounds (> 1 = mmjax faster).", "", ""]
  return "\n".join(lines) + markdown_table(results["records"])


def _environment(ctx: Context) -> Dict[str, Any]:
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
          "python": platform.python_version(), "argv": sys.argv[1:],
          "peak_matmul_size": ctx.args.peak_size,
          "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------

QUICK = dict(attention_lengths=[64], chunk_from_length=64, attention_masks=["none", "padding"], attention_tokens=128,
             attention_heads=2, attention_head_dim=16, vit_variants=["Ti/16"], image_size=32,
             vit_batch=2, vit_depth=1, clip_batch=2, clip_depth=1, clip_vocab=100, fusion_batch=2,
             compile_width=32, compile_depths=[1, 2], fsdp_variant="Ti/16", steps=2, warmup=1, peak_size=256,
             ring_batch=256, ring_dim=32, accum_batch=64, accum_steps=4)


def _ints(text: str) -> List[int]:
  return [int(t) for t in text.split(",") if t]


def _strs(text: str) -> List[str]:
  return [t for t in text.split(",") if t]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", type=_strs, default=list(CASES), help=f"subset of {CASES}")
  p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
  p.add_argument("--steps", type=int, default=5, help="timed steps per candidate (median)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--peak-size", type=int, default=2048, help="matmul size for the CPU peak")
  p.add_argument("--peak-tflops", type=float, default=0.0,
                 help="device peak TFLOP/s (accelerators); 0 = measure a matmul")
  p.add_argument("--dtype", default="float32", help="compute dtype of the models")
  p.add_argument("--attention-lengths", type=_ints, default=[256, 1024, 4096])
  p.add_argument("--attention-masks", type=_strs, default=list(MASKS))
  p.add_argument("--attention-tokens", type=int, default=2048,
                 help="batch = max(1, tokens // length) for each attention length")
  p.add_argument("--attention-heads", type=int, default=8)
  p.add_argument("--chunk-from-length", type=int, default=1024,
                 help="from this length on, also time the one of mmjax's 'reference' / "
                      "'chunked' backends that the default did not pick")
  p.add_argument("--attention-head-dim", type=int, default=64)
  p.add_argument("--vit-variants", type=_strs, default=["S/16", "B/16"])
  p.add_argument("--vit-batch", type=int, default=8)
  p.add_argument("--vit-depth", type=int, default=0, help="0 = the variant's depth")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--scan-layers", type=lambda s: s.lower() in ("1", "true", "yes"),
                 default=None, help="ViT scan_layers (default: the model's default)")
  p.add_argument("--remat-policy", default=None, help="ViT remat_policy (default: the model's)")
  p.add_argument("--clip-batch", type=int, default=8)
  p.add_argument("--clip-depth", type=int, default=0, help="0 = 12 layers per tower")
  p.add_argument("--clip-vocab", type=int, default=49408)
  p.add_argument("--fusion-batch", type=int, default=32)
  p.add_argument("--compile-width", type=int, default=256)
  p.add_argument("--compile-depths", type=_ints, default=[2, 24])
  p.add_argument("--fsdp-variant", default="S/16")
  p.add_argument("--json", default="", help="write every record to this file")
  p.add_argument("--markdown", default="", help="write the table to this file")
  p.add_argument("--ring-batch", type=int, default=4096, help="global batch of the ring case")
  p.add_argument("--ring-dim", type=int, default=256, help="embedding size of the ring case")
  p.add_argument("--accum-batch", type=int, default=256,
                 help="global batch of the ring case's accumulation-memory train steps")
  p.add_argument("--accum-steps", type=int, default=16, help="micro-batches for that batch")
  p.add_argument("--fsdp-child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--ring-child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:])}
    for key, value in QUICK.items():
      if key not in given:
        setattr(args, key, value)
  unknown = sorted(set(args.cases) - set(CASES))
  if unknown:
    p.error(f"unknown --cases {unknown}; expected a subset of {list(CASES)}")
  unknown = sorted(set(args.attention_masks) - set(MASKS))
  if unknown:
    p.error(f"unknown --attention-masks {unknown}; expected a subset of {list(MASKS)}")
  return args


def run(args: argparse.Namespace) -> Dict[str, Any]:
  """Runs the selected cases; returns {environment, peak, records}."""
  ctx = Context(args, peak=matmul_peak(args.peak_size))
  best = min(interleaved_times({"peak": ctx.peak["fn"]}, 3, 1)["peak"])
  print(f"matmul peak ({args.peak_size}^2 float32): {ctx.peak['flops'] / best / 1e9:.1f} GFLOP/s "
        f"on {jax.devices()[0].device_kind}", flush=True)
  case_fns = {"attention": case_attention, "vit": case_vit, "clip": case_clip,
              "fusion": case_fusion, "compile": case_compile, "fsdp": case_fsdp,
              "ring": case_ring}
  for name in args.cases:
    case_fns[name](ctx)
  return add_mfu({"environment": _environment(ctx),
                  "peak_flops_per_s_at_start": ctx.peak["flops"] / best,
                  "peak_tflops_given": args.peak_tflops, "records": ctx.records})


def add_mfu(results: Dict[str, Any]) -> Dict[str, Any]:
  """Sets every record's `mfu` against the run's peak: the given accelerator peak, or the
  best matmul FLOP/s seen anywhere in the run (at the start or in any case's rounds).

  On a shared CPU, a matmul timed next to a big model step is sometimes slowed far more
  than the step (`mfu_same_rounds` then exceeds 100%); the run-wide best is the machine's
  peak, so this MFU errs low, never high.
  """
  records = results["records"]
  if results.get("peak_tflops_given"):
    peak = results["peak_tflops_given"] * 1e12
  else:
    peak = max([results["peak_flops_per_s_at_start"]]
               + [r["peak_flops_per_s_same_rounds"] for r in records
                  if "peak_flops_per_s_same_rounds" in r])
  results["peak_flops_per_s"] = peak
  for r in records:
    if "flops_per_s" in r:
      r["mfu"] = r["flops_per_s"] / peak
  return results


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = parse_args(argv)
  if args.fsdp_child:
    print(json.dumps(fsdp_bytes(args.fsdp_variant, args.image_size)))
    return {}
  if args.ring_child:
    print(json.dumps(ring_records(args)))
    return {}
  results = run(args)
  table = markdown_report(results)
  print("\n" + table)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table)
  return results


if __name__ == "__main__":
  main()
