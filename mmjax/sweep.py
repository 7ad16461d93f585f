"""One-command ablations: a list of config overrides x seeds, trained and tabulated.

    python -m mmjax.sweep --config configs/ablations/fusion.py --workdir DIR

A sweep config (see configs/ablations/) is a ConfigDict with

  base       the experiment config every point starts from (a full trainer config, so
             `--config.base.total_steps=100` overrides it from the command line);
  points     a list of dicts, one per point: dotted overrides of `base`
             (`{"model.fusion": "bottleneck", "model.num_bottlenecks": 4}`) and an
             optional "label" for tables and plots;
  num_seeds  each point trains with seeds base.seed, base.seed + 1, ...;
  plot       `x` (a column, e.g. "gflops") and `y` (metrics), one panel per metric;
  table      optional: the metrics results.md shows (results.csv always has them all).

Each (point, seed) is a run. Its resolved config is hashed; the run lives in
DIR/runs/<label>-s<seed>-<hash>/ (the trainer's workdir) and is finished once
`result.json` is there, so running the sweep again trains only what is missing or
changed, and an interrupted run resumes from its own checkpoints. The runs train one
after another in this process through `mmjax.train.trainer.train_and_evaluate`;
`--mode=launch_list` instead writes DIR/launch.txt, one shell command per unfinished run,
for a cluster scheduler (e.g. a SLURM array: `sed -n "${SLURM_ARRAY_TASK_ID}p"
launch.txt | bash`), and `--mode=report` only aggregates the finished runs.

Outputs: DIR/results.csv and DIR/results.md (mean and standard deviation over seeds of
every final metric, with parameter count and forward GFLOPs per example) and
DIR/results.png (each plotted metric against `plot.x`).
"""
import csv
import dataclasses
import hashlib
import json
import os
import re
import shlex
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import ml_collections
import numpy as np

TrainFn = Callable[[ml_collections.ConfigDict, str], Mapping[str, Any]]
CostFn = Callable[[ml_collections.ConfigDict], Mapping[str, float]]

RESULT_FILE = "result.json"
# Columns every run reports besides the trainer's metrics.
COST_COLUMNS = ("params", "gflops")


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-path overrides (model fields and dataset options the
  config leaves at their defaults included); unknown paths name the valid keys."""
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())  # copy, FieldReferences resolved
  config_lib.apply_overrides(config, overrides)
  return config


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short stable hash of a resolved config: the identity of a run."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Run:
  label: str
  overrides: Dict[str, Any]
  seed: int
  config: ml_collections.ConfigDict
  key: str

  @property
  def name(self) -> str:
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', self.label).strip('_')}-s{self.seed}-{self.key}"


def _label(overrides: Mapping[str, Any]) -> str:
  return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "base"


def expand(sweep: ml_collections.ConfigDict) -> List[Run]:
  """Every (point, seed) of a sweep config as a Run with its resolved config."""
  for field in ("base", "points", "num_seeds"):
    if field not in sweep:
      raise ValueError(f"A sweep config needs `{field}`; it has {sorted(sweep.keys())}.")
  if not sweep.points:
    raise ValueError("The sweep config's `points` is empty; expected at least one dict "
                     "of overrides (an empty dict trains `base` as it is).")
  if sweep.num_seeds < 1:
    raise ValueError(f"num_seeds must be >= 1, got {sweep.num_seeds}.")
  runs, labels = [], set()
  for point in sweep.points:
    if not isinstance(point, Mapping):
      raise ValueError(f"Each point is a dict of dotted overrides; got {point!r}.")
    overrides = {k: v for k, v in point.items() if k != "label"}
    label = point.get("label") or _label(overrides)
    if label in labels:
      raise ValueError(f"Two points share the label {label!r}; labels must be unique.")
    labels.add(label)
    config = apply_overrides(sweep.base, overrides)
    for i in range(sweep.num_seeds):
      seeded = apply_overrides(config, {"seed": config.seed + i})
      runs.append(Run(label, overrides, seeded.seed, seeded, config_hash(seeded)))
  return runs


def model_cost(config: ml_collections.ConfigDict) -> Dict[str, float]:
  """Parameter count and analytic forward GFLOPs per example (the model's `evaluate`).

  Shapes only: the model is initialised with `jax.eval_shape` on one example's shapes
  from the data pipeline and its forward pass traced, never compiled or run.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmjax.models import flops  # pylint: disable=g-import-not-at-top
  from mmjax.models.base import build_model  # pylint: disable=g-import-not-at-top
  from mmjax.train.trainer import import_models  # pylint: disable=g-import-not-at-top
  import_models(config.get("imports", ()))
  model = build_model(config.model)
  shapes = pipeline.dataset_info(config.data)["shapes"]
  batch = {k: jax.ShapeDtypeStruct((1,) + tuple(shape), dtype)
           for k, (shape, dtype) in shapes.items()}
  variables = jax.eval_shape(
      lambda b: model.init(jax.random.key(0), b, train=False, method="loss"), batch)
  return {"params": flops.count_params(variables["params"]),
          "gflops": flops.model_flops(model, variables, batch, method="evaluate") / 1e9}


def run_sweep(sweep: ml_collections.ConfigDict, workdir: str, *,
              train_fn: Optional[TrainFn] = None, cost_fn: Optional[CostFn] = None,
              only: Optional[str] = None, log: Callable[[str], None] = print) -> List[Run]:
  """Trains every unfinished run (or just the run named `only`), then writes the report."""
  if train_fn is None:
    from mmjax.train.trainer import train_and_evaluate as train_fn  # pylint: disable=g-import-not-at-top
  cost_fn = cost_fn or model_cost
  workdir = os.path.abspath(workdir)
  runs = expand(sweep)
  if only is not None:
    selected = [r for r in runs if only in (r.name, r.key)]
    if not selected:
      raise ValueError(f"--only={only!r} names no run; runs: {[r.name for r in runs]}.")
    runs = selected
  for i, run in enumerate(runs, 1):
    rundir = os.path.join(workdir, "runs", run.name)
    if os.path.exists(os.path.join(rundir, RESULT_FILE)):
      log(f"[{i}/{len(runs)}] {run.name}: finished earlier, skipped.")
      continue
    log(f"[{i}/{len(runs)}] {run.name}: training ({_label(run.overrides)}, seed {run.seed}).")
    os.makedirs(rundir, exist_ok=True)
    with open(os.path.join(rundir, "config.json"), "w") as f:
      f.write(run.config.to_json(indent=2, sort_keys=True))
    start = time.time()
    metrics = dict(train_fn(run.config, rundir))
    wall = time.time() - start
    cost = {k: v for k, v in cost_fn(run.config).items() if k in COST_COLUMNS}
    result = dict(label=run.label, seed=run.seed, key=run.key, overrides=run.overrides,
                  wall_s=wall, metrics=_scalars(metrics), **cost)
    tmp = os.path.join(rundir, RESULT_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2, default=repr)
    os.replace(tmp, os.path.join(rundir, RESULT_FILE))  # atomic: a crash leaves no result
    log(f"[{i}/{len(runs)}] {run.name}: done in {wall:.0f}s.")
  if only is None:
    write_report(sweep, workdir, log=log)
  return runs


def _scalars(metrics: Mapping[str, Any]) -> Dict[str, float]:
  out = {}
  for k, v in metrics.items():
    try:
      out[k] = float(np.asarray(v))
    except (TypeError, ValueError):
      continue  # e.g. paths or strings in the trainer's summary
  return out


def collect(sweep: ml_collections.ConfigDict, workdir: str) -> List[Dict[str, Any]]:
  """One row per point: mean and std over its finished seeds of every metric and cost."""
  runs = expand(sweep)
  rows = []
  for label in dict.fromkeys(r.label for r in runs):  # points in config order
    results = []
    for run in (r for r in runs if r.label == label):
      path = os.path.join(workdir, "runs", run.name, RESULT_FILE)
      if os.path.exists(path):
        with open(path) as f:
          results.append(json.load(f))
    if not results:
      continue
    values: Dict[str, List[float]] = {}
    for result in results:
      for k, v in {**result["metrics"], "wall_s": result["wall_s"],
                   **{c: result[c] for c in COST_COLUMNS if c in result}}.items():
        values.setdefault(k, []).append(v)
    row = dict(label=label, overrides=_label(results[0]["overrides"]), seeds=len(results))
    # Numeric overrides (e.g. batch_size) can be a plot axis too.
    row["config"] = {k: (float(v), 0.0) for k, v in results[0]["overrides"].items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k, v in values.items():
      row[k] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    rows.append(row)
  return rows


def _columns(rows: Sequence[Mapping[str, Any]],
             shown: Optional[Sequence[str]] = None) -> List[str]:
  """Table columns: cost, then metrics (all, or those `shown`), then seconds per run."""
  metrics = sorted({k for r in rows for k in r}
                   - {"label", "overrides", "config", "seeds", "wall_s", *COST_COLUMNS})
  if shown:
    metrics = [m for m in shown if m in metrics]
  return [c for c in COST_COLUMNS if any(c in r for r in rows)] + metrics + ["wall_s"]


def _fmt(mean: float, std: float, seeds: int, column: str) -> str:
  if column == "params":
    return f"{mean / 1e6:.3g}M" if mean >= 1e5 else f"{mean:,.0f}"
  if column == "gflops":  # the same for every seed
    return f"{mean:.3g}"
  if column == "wall_s":
    return f"{mean:.0f}"
  text = f"{mean:.3f}" if abs(mean) < 10 else f"{mean:.4g}"
  return text + (f" ± {std:.3f}" if seeds > 1 and abs(mean) < 10 else
                 f" ± {std:.3g}" if seeds > 1 else "")


def write_report(sweep: ml_collections.ConfigDict, workdir: str,
                 log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
  """Writes results.csv, results.md and results.png in `workdir` from finished runs."""
  rows = collect(sweep, workdir)
  if not rows:
    log(f"No finished runs under {workdir}/runs yet; nothing to report.")
    return rows
  columns = _columns(rows)
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["label", "overrides", "seeds"] +
                    [f"{c}_{s}" for c in columns for s in ("mean", "std")])
    for r in rows:
      writer.writerow([r["label"], r["overrides"], r["seeds"]] +
                      [x for c in columns for x in r.get(c, ("", ""))])
  shown = _columns(rows, sweep.get("table"))
  lines = ["| point | seeds | " + " | ".join(shown) + " |",
           "|---|---:|" + "---:|" * len(shown)]
  for r in rows:
    cells = [_fmt(*r[c], r["seeds"], c) if c in r else "" for c in shown]
    lines.append(f"| {r['label']} | {r['seeds']} | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(f"{table}\n\nMean ± standard deviation over seeds; params = parameter "
            "count, gflops = analytic forward GFLOPs per example, wall_s = seconds per run.\n")
  plot = sweep.get("plot", {})
  if plot:
    write_plot(rows, os.path.join(workdir, "results.png"), plot["x"], plot["y"],
               title=plot.get("title", ""))
  log(table)
  log(f"Wrote {workdir}/results.md, results.csv" + (", results.png." if plot else "."))
  return rows


def write_plot(rows: Sequence[Mapping[str, Any]], path: str, x: str, ys: Sequence[str],
               title: str = "") -> None:
  """One panel per metric in `ys`: mean ± std over seeds against `x`, a column or an
  overridden numeric config field (e.g. "batch_size")."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [{**r.get("config", {}), **r} for r in rows]
  missing = [c for c in [x, *ys] if not any(c in r for r in rows)]
  if missing:
    raise ValueError(f"Plot columns {missing} are not in the results; available: "
                     f"{_columns(rows)} and overridden fields {sorted(rows[0]['config'])}.")
  fig, axes = plt.subplots(1, len(ys), figsize=(4.5 * len(ys) + 1.8, 4), squeeze=False)
  for ax, y in zip(axes[0], ys):
    for i, r in enumerate(rows):
      if x in r and y in r:  # the colour cycle has 10 colours: the marker changes after
        ax.errorbar(r[x][0], r[y][0], xerr=r[x][1], yerr=r[y][1], capsize=3,
                    fmt="osD^v"[i // 10 % 5], label=r["label"])
    xs = [r[x][0] for r in rows if x in r]
    if min(xs) > 0 and max(xs) / min(xs) > 10:
      ax.set_xscale("log")
      values = sorted(set(xs))
      if len(values) <= 8:  # few values (e.g. batch sizes): label them, not powers of 10
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
  # A legend, not labels at the points: close points' labels would overlap.
  axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _relaunch_args(argv: Sequence[str]) -> List[str]:
  """The sweep's own flags minus --mode/--only/--workdir, with an absolute --config path,
  so each launch line reproduces the sweep's resolved config from any directory."""
  args, skip = [], False
  for i, arg in enumerate(argv):
    if skip:
      skip = False
      continue
    name, has_value, value = arg.partition("=")
    if name in ("--mode", "--only", "--workdir"):
      skip = not has_value
      continue
    if name == "--config":
      if not has_value and i + 1 < len(argv):
        value, skip = argv[i + 1], True
      path, colon, config_arg = value.partition(":")
      arg = f"--config={os.path.abspath(path)}{colon}{config_arg}"
    args.append(arg)
  return args


def write_launch_list(sweep: ml_collections.ConfigDict, workdir: str,
                      argv: Sequence[str]) -> str:
  """Writes workdir/launch.txt: one `python -m mmjax.sweep ... --only=RUN` per unfinished run.

  `argv` are the sweep's command-line flags (sys.argv[1:]); the lines must run where
  `mmjax` (and any fork module in the config's `imports`) is importable.
  """
  workdir = os.path.abspath(workdir)
  keep = _relaunch_args(argv)
  lines = []
  for run in expand(sweep):
    if not os.path.exists(os.path.join(workdir, "runs", run.name, RESULT_FILE)):
      lines.append(shlex.join([sys.executable, "-m", "mmjax.sweep", *keep,
                               f"--workdir={workdir}", f"--only={run.name}"]))
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "launch.txt")
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))
  return path


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  sweep, workdir = FLAGS.config, FLAGS.workdir
  if FLAGS.mode == "launch_list":
    path = write_launch_list(sweep, workdir, sys.argv[1:])
    with open(path) as f:
      count = sum(1 for _ in f)
    print(f"Wrote {count} commands to {path}; after they finish, aggregate with "
          f"--mode=report.")
  elif FLAGS.mode == "report":
    write_report(sweep, os.path.abspath(workdir))
  else:
    # Seeds of one point compile the same programs: a persistent cache skips the repeats.
    import jax  # pylint: disable=g-import-not-at-top
    if not jax.config.jax_compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir",
                        os.path.join(os.path.abspath(workdir), "jax_cache"))
    run_sweep(sweep, workdir, only=FLAGS.only)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/ablations/).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for the runs and the results.")
  flags.DEFINE_enum("mode", "run", ["run", "launch_list", "report"],
                    "run: train unfinished runs here, then report; launch_list: write "
                    "one command per unfinished run to WORKDIR/launch.txt; report: only "
                    "aggregate finished runs.")
  flags.DEFINE_string("only", None, "Train only this run (its directory name or hash).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
