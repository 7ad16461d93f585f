"""Analytic forward FLOPs of any model, counted from its traced program.

`forward_flops(fn, *args)` traces `fn` to a jaxpr (no compilation, no execution) and sums
  matmuls / convolutions   2 * (output elements) * (contracted elements per output)
  FFTs                     8 * N log2 N per length-N transform (the spectrogram)
  elementwise arithmetic   1 per output element (add, mul, max, select, ...)
  reductions               1 per input element
while transcendentals (exp, log, tanh, ...) are counted separately, as XLA does. Loops
multiply their body by the trip count (scan), `shard_map` bodies by the shards and Pallas
kernels by their grid; conditionals count their costliest branch.
Because it reads shapes off the program, it covers every configured model, every fusion
strategy and any fork without a per-model formula, and costs one trace. The matmul term
dominates at every realistic size; tests/test_flops.py checks the total against XLA's own
cost analysis (within 10%).

`python -m mmjax.models.flops` prints, for every registered fusion strategy, the
parameter count and forward GFLOPs per example of the multimodal model at one small
shared config (`FUSION_TABLE_MODEL`, `FUSION_TABLE_INPUTS`).
"""
import dataclasses
import math
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

_ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "select_n", "rem",
    "pow", "integer_pow", "square", "sqrt", "rsqrt", "floor", "ceil", "round", "clamp",
    "and", "or", "not", "xor", "eq", "ne", "lt", "le", "gt", "ge", "nextafter", "add_any",
}
_TRANSCENDENTAL = {"exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "erf",
                   "erfc", "erf_inv", "sin", "cos", "tan", "atan2", "cbrt"}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
               "reduce_and", "reduce_or", "cumsum", "cumlogsumexp", "cummax"}


@dataclasses.dataclass
class FlopCount:
  """Forward cost split by kind; `flops` = matmul (incl. conv, FFT) + elementwise + reduction."""
  matmul: float = 0.0
  elementwise: float = 0.0
  reduction: float = 0.0
  transcendental: float = 0.0

  @property
  def flops(self) -> float:
    return self.matmul + self.elementwise + self.reduction

  def add(self, other: "FlopCount", times: float = 1.0) -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + times * getattr(other, f.name))


def _size(aval) -> int:
  return int(math.prod(getattr(aval, "shape", ())))


def _sub_jaxprs(eqn):
  """(jaxpr, multiplier) pairs for the bodies of higher-order primitives."""
  params = eqn.params
  name = eqn.primitive.name
  if name == "scan":
    return [(params["jaxpr"].jaxpr, params["length"])]
  if name == "while":
    return [(params["body_jaxpr"].jaxpr, 1), (params["cond_jaxpr"].jaxpr, 1)]
  times = 1
  if name == "shard_map":  # the body sees one shard: it runs once per manual-axes position
    manual = params.get("newly_manual_axes", params["mesh"].axis_names)
    times = math.prod(params["mesh"].shape[axis] for axis in manual)
  elif name == "pallas_call":  # the kernel body sees one block: it runs once per grid point
    times = math.prod(params["grid_mapping"].grid)
  found = []
  for value in params.values():
    if isinstance(value, jex_core.ClosedJaxpr):
      found.append((value.jaxpr, times))
    elif isinstance(value, jex_core.Jaxpr):
      found.append((value, times))
  return found


def _count(jaxpr) -> FlopCount:
  total = FlopCount()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = eqn.outvars[0].aval if eqn.outvars else None
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total.matmul += 2.0 * _size(out) * math.prod(lhs[d] for d in lhs_contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total.matmul += 2.0 * _size(out) * math.prod(rhs) / rhs[out_feature_dim]
    elif name == "fft":  # XLA's count: 8 N log2 N per length-N complex transform
      length = math.prod(eqn.params["fft_lengths"])
      in_shape = eqn.invars[0].aval.shape
      transforms = math.prod(in_shape[:-len(eqn.params["fft_lengths"])])
      total.matmul += 8.0 * transforms * length * math.log2(max(length, 2))
    elif name in _ELEMENTWISE:
      total.elementwise += _size(out)
    elif name in _TRANSCENDENTAL:
      total.transcendental += _size(out)
    elif name in _REDUCTIONS:
      total.reduction += _size(eqn.invars[0].aval)
    elif name == "cond":
      branches = [_count(b.jaxpr) for b in eqn.params["branches"]]
      total.add(max(branches, key=lambda c: c.flops))
    else:
      for sub, times in _sub_jaxprs(eqn):
        total.add(_count(sub), times)
  return total


def count_flops(fn: Callable[..., Any], *args, **kwargs) -> FlopCount:
  """Traces fn(*args, **kwargs) and returns its FlopCount (arrays or ShapeDtypeStructs)."""
  return count_jaxpr(jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args))


def count_jaxpr(closed_jaxpr) -> FlopCount:
  """The FlopCount of a program already traced (e.g. `jax.jit(f).trace(...).jaxpr`)."""
  return _count(closed_jaxpr.jaxpr)


def forward_flops(fn: Callable[..., Any], *args, **kwargs) -> float:
  """Forward FLOPs of fn(*args, **kwargs): matmul + elementwise + reduction."""
  return count_flops(fn, *args, **kwargs).flops


def model_flops(model, variables, batch, method: str = "evaluate", **kwargs) -> float:
  """Forward FLOPs of `model.apply(variables, batch, method=method)` (per call)."""
  return forward_flops(lambda v, b: model.apply(v, b, method=method, **kwargs), variables, batch)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


# The fusion table's model: demo-sized (width 64, 4 layers), every modality of the demo,
# ITC + VQA; and its inputs {batch key: (shape without the batch axis, dtype)}: 32x32
# images, 0.5 s of 16 kHz audio, 32-step sensors (and `max_text_len` text tokens).
FUSION_TABLE_MODEL = dict(
    fusion="hybrid", modalities=("image", "question", "audio", "sensor"), width=64,
    num_layers=4, num_heads=4, mlp_dim=256, vocab_size=100, max_text_len=16, num_answers=10,
    loss_weights={"itc": 1.0, "vqa": 1.0})
# Mid fusion through 4 bottleneck tokens (MBT), for the strategies that have these fields.
FUSION_TABLE_MID_FUSION = dict(fusion_layer=2, num_bottlenecks=4)
FUSION_TABLE_INPUTS = {"image": ((32, 32, 3), jnp.float32), "audio": ((8000,), jnp.float32),
                       "sensor": ((32, 6), jnp.float32), "answer": ((), jnp.int32)}


def fusion_table_fields(fusion: str = "hybrid", **overrides) -> Dict[str, Any]:
  """The fusion table's model fields for `fusion`, `overrides` applied."""
  from mmjax.models import fusion as fusion_lib  # pylint: disable=g-import-not-at-top
  from mmjax.registry import FUSIONS  # pylint: disable=g-import-not-at-top
  fields = dict(FUSION_TABLE_MODEL, fusion=fusion)
  if fusion in FUSIONS:  # (an unknown one is the model's error, raised at init)
    fields.update(fusion_lib.fields_for(fusion, FUSION_TABLE_MID_FUSION))
  return {**fields, **overrides}


def fusion_table_model(fusion: str = "hybrid", batch_size: int = 4, **overrides):
  """The fusion table's model with `overrides`, and an abstract batch of its inputs
  (shapes only: parameter counts and FLOPs need no values)."""
  from mmjax.models import multimodal  # multimodal imports this package, not the reverse
  model = multimodal.MultimodalModel(**fusion_table_fields(fusion, **overrides))
  text = ((model.max_text_len,), jnp.int32)
  inputs = dict(FUSION_TABLE_INPUTS, text=text, question=text)
  batch: Dict[str, Any] = {k: jax.ShapeDtypeStruct((batch_size,) + shape, dtype)
                           for k, (shape, dtype) in inputs.items()}
  return model, batch


def fusion_table(**overrides):
  """Rows (fusion, params, VQA GFLOPs/example, ITC + VQA GFLOPs/example) for every
  registered fusion at the shared demo-sized config `FUSION_TABLE_MODEL` (keyword
  overrides change it, e.g. width=128)."""
  from mmjax.models import multimodal  # multimodal imports this package, not the reverse
  rows = []
  for fusion in multimodal.fusion_names():
    model, batch = fusion_table_model(fusion, **overrides)
    variables = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False,
                                                    method="loss"), batch)
    per_example = lambda method: model_flops(model, variables, batch, method) / batch[
        "image"].shape[0] / 1e9
    rows.append((fusion, count_params(variables["params"]), per_example("fused_logits"),
                 per_example("evaluate")))
  return rows


def main():
  model, batch = fusion_table_model()
  print(f"multimodal, modalities {model.modalities}, width {model.width}, "
        f"{model.num_layers} layers, {model.num_heads} heads, mlp {model.mlp_dim}, "
        f"fusion_layer {model.fusion_layer} and {model.num_bottlenecks} bottlenecks where a "
        "strategy has them; inputs "
        + ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in batch.items()
                    if k in model.used_modalities()))
  print(f"{'fusion':<24}{'params':>10}{'VQA GFLOPs':>14}{'ITC+VQA GFLOPs':>18}  (per example)")
  for fusion, params, vqa, both in fusion_table():
    print(f"{fusion:<24}{params:>10,}{vqa:>14.4f}{both:>18.4f}")


if __name__ == "__main__":
  main()
