"""Chaos drill: kill a training run again and again, damage a checkpoint, and check nothing is lost.

  python experiments/chaos.py --cycles=5 --seed=0 --workdir=/tmp/chaos

Each cycle launches the user-facing command, `python -m mmjax.main --config=... --workdir=...`,
and stops it at a random moment with SIGKILL (a crash: no chance to save), SIGTERM (a
preemption notice) or SIGINT (Ctrl-C); on the last two the trainer should save the current
step and exit 0. The moments:

  startup   a random time before the first step (imports, restore, compilation);
  training  a random step between the first one of this launch and 60% of the way to the end;
  save      such a random step, then the first moment an asynchronous checkpoint save is in
            flight (its `*.orbax-checkpoint-tmp*` directory exists): where a crash is most
            likely to leave a half-written step.

In one cycle the newest checkpoint is then damaged (a truncated or zeroed array file, 64
flipped bytes inside the array data, an emptied step directory or a deleted data-iterator
file). The next launch must warn about that step, move it to `checkpoints.corrupt/` and
resume from the previous good one. A final launch runs to the end. Meanwhile a reference run
of the same command trains uninterrupted in its own workdir (in parallel, same device count,
so the same mesh); once it trains, a second launch on its workdir must be refused, naming
it (the workdir lock), and leave its results untouched.

Then the scenarios (`--scenarios`), each on a copy of the finished run, each judged:
  config_change   relaunch with --config.optimizer.name=sgd: refused (exit != 0) with the
                  config diff, every file of the workdir unchanged;
  all_corrupt     every step damaged: refused naming each step, every file unchanged; then
                  --start_over trains from step 0 to params bit-identical to the reference;
  disk_full       (where a user namespace may mount a tmpfs) a fresh run whose disk fills
                  after its first checkpoint: it stops with the save's error (exit != 0),
                  and a relaunch of a copy resumes from the newest step it kept.

Reported (printed, and written to WORKDIR/chaos.json):
  cycles_survived  cycles whose next launch resumed from the newest intact checkpoint the kill
                   left (naming and moving aside a damaged one), and after which SIGTERM had
                   exited 0 with the current step saved;
  steps_lost       per cycle, the newest step trained before the kill minus the step the next
                   launch resumed from (SIGTERM: 0; a damaged checkpoint's steps count too);
  bit_identical    whether the final params equal the reference run's, bit for bit;
  losses_identical whether every logged loss, re-run steps included, equals the reference's.

The default config is configs/vit_digits.py shrunk by `--override` to train in seconds; the
trainer settings chaos relies on (log every step, frequent checkpoints, no eval) are always
set. Any config file works (`--config=...`, with `--override=field=value` for its own fields).
From Python: `run_chaos(Options(workdir=..., cycles=...))` returns the same summary.
"""
import dataclasses
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python experiments/chaos.py` from anywhere imports this mmjax
  sys.path.insert(0, ROOT)
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
SAVING_SIGNALS = ("TERM", "INT")  # the trainer saves the current step and exits 0
MOMENTS = ("startup", "training", "save")
CORRUPTIONS = ("truncated_array", "zeroed_array", "bit_flip", "empty_step_dir",
               "missing_data_iterator")
SCENARIOS = ("config_change", "all_corrupt", "disk_full")

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "vit_digits.py")
# Shrink configs/vit_digits.py to a run of seconds.
DEFAULT_OVERRIDES = ("model.width=16", "model.depth=2", "model.num_heads=2", "model.mlp_dim=32",
                     "model.dropout_rate=0.1", "batch_size=16", "schedule.warmup_steps=5")


@dataclasses.dataclass
class Options:
  """What to torment and how (the command-line flags of the same names)."""
  workdir: str                       # runs, logs and chaos.json (emptied first)
  config: str = DEFAULT_CONFIG       # config file of the run
  overrides: Sequence[str] = DEFAULT_OVERRIDES  # "field=value" config overrides
  cycles: int = 5                    # kill / resume cycles before the final launch
  seed: int = 0                      # seed of the signal, moment and corruption choices
  total_steps: int = 300
  checkpoint_every: int = 5
  devices: int = 2                   # JAX_NUM_CPU_DEVICES of every launch: one mesh for all
  plan: Optional[Sequence[str]] = None  # "SIGNAL:MOMENT" per cycle instead of random ones
  corrupt_cycle: Optional[int] = None   # cycle whose kill is followed by damage; -1: none
  corruption: Optional[str] = None      # one of CORRUPTIONS (default: a random one)
  scenarios: Sequence[str] = SCENARIOS  # run after the drill (see the module docstring)
  timeout: float = 600.0             # seconds any one launch may take


# ---------------------------------------------------------------------------------------
# Launching and watching runs.


def _command(opts: Options, workdir: str) -> List[str]:
  fixed = [f"total_steps={opts.total_steps}", f"checkpoint_every={opts.checkpoint_every}",
           "keep_checkpoints=3", "log_every=1", "eval_every=0", "progress_bar=False"]
  return ([sys.executable, "-m", "mmjax.main", f"--config={opts.config}",
           f"--workdir={workdir}"]
          + [f"--config.{o}" for o in list(opts.overrides) + fixed])


def _env(opts: Options, cache_dir: str) -> Dict[str, str]:
  """One device count for every launch; a compilation cache shared by all of them."""
  return dict(os.environ, JAX_NUM_CPU_DEVICES=str(opts.devices),
              PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
              JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


class Launch:
  """One `python -m mmjax.main` process with its stdout / stderr in log files."""

  def __init__(self, command: List[str], workdir: str, log_prefix: str, env: Dict[str, str]):
    self.log_prefix = log_prefix
    self.started = time.time()
    self.first_step_at = None  # when its first step was seen (startup time for later cycles)
    self.metrics_offset = _metrics_size(workdir)  # records this launch appends start here
    with open(log_prefix + ".out", "w") as out, open(log_prefix + ".err", "w") as err:
      self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err,
                                   preexec_fn=default_sigint)

  def wait(self, timeout: float) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise RuntimeError(f"{self.log_prefix}: no exit within {timeout:.0f} s; see its logs.")

  def stdout(self) -> str:
    with open(self.log_prefix + ".out") as f:
      return f.read()

  def stderr(self) -> str:
    with open(self.log_prefix + ".err") as f:
      return f.read()

  def resumed_from(self) -> int:
    match = re.search(r"Resumed from step (\d+)", self.stdout())
    return int(match.group(1)) if match else 0


def default_sigint() -> None:
  """In a launched process: Ctrl-C as at a terminal (a drill started in the background
  would otherwise hand its launches an ignored SIGINT)."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _metrics_size(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.getsize(path) if os.path.exists(path) else 0


def _loss_records(workdir: str, offset: int = 0) -> List[Tuple[int, float]]:
  """(step, loss) of every train record from byte `offset` on; a line a kill cut short
  is skipped (it can only be the last one a launch wrote)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    f.seek(offset)
    lines = f.read().decode("utf-8", "replace").splitlines()
  records = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if "loss" in record:
      records.append((record["step"], record["loss"]))
  return records


def _newest_step(workdir: str, offset: int) -> Optional[int]:
  records = _loss_records(workdir, offset)
  return max(s for s, _ in records) if records else None


def _saved_steps(workdir: str) -> List[int]:
  """Steps with a complete checkpoint (a half-written one is still a `*-tmp*` directory)."""
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(
      directory) else []


def _save_in_flight(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


def _wait_for_moment(opts: Options, launch: Launch, workdir: str, moment: str,
                     rng: random.Random, startup_seconds: float) -> str:
  """Blocks until `moment` of `launch` (or its exit); returns what actually happened."""
  deadline = launch.started + opts.timeout
  if moment == "startup":
    wake = launch.started + rng.uniform(0.0, startup_seconds)
    while time.time() < wake and launch.proc.poll() is None:
      time.sleep(0.01)
    return "startup" if _newest_step(workdir, launch.metrics_offset) is None else "training"
  first = None
  while first is None and launch.proc.poll() is None and time.time() < deadline:
    first = _newest_step(workdir, launch.metrics_offset)
    time.sleep(0.01)
  if first is None:
    return "exited"
  launch.first_step_at = time.time()
  # A random step between the first one and 60% of the way to the end...
  target = first + rng.randint(0, max(0, int(0.6 * (opts.total_steps - first))))
  while (_newest_step(workdir, launch.metrics_offset) or 0) < target:
    if launch.proc.poll() is not None or time.time() > deadline:
      return "exited"
    time.sleep(0.002)
  if moment == "training":
    time.sleep(rng.uniform(0.0, 0.01))  # ...anywhere within that step
    return "training"
  while launch.proc.poll() is None and time.time() < deadline:  # ...then the next save
    if _save_in_flight(workdir):
      return "save"
    time.sleep(0.001)
  return "exited"


# ---------------------------------------------------------------------------------------
# Damage.


def corrupt_newest_step(checkpoint_dir: str, kind: str,
                        step: Optional[int] = None) -> Optional[int]:
  """Damages the newest step (or `step`) in `checkpoint_dir` as `kind` says; returns it
  (None if there is no step yet)."""
  steps = (sorted(int(d) for d in os.listdir(checkpoint_dir) if d.isdigit())
           if os.path.isdir(checkpoint_dir) else [])
  if not steps:
    return None
  step = steps[-1] if step is None else step
  step_dir = os.path.join(checkpoint_dir, str(step))
  if kind == "empty_step_dir":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  elif kind == "missing_data_iterator":
    for path in glob.glob(os.path.join(step_dir, "data", "process_*.json")):
      os.remove(path)
  elif kind == "bit_flip":
    _flip_array_bytes(step_dir)
  else:
    # The merged OCDBT store (state/d/) holds the array data that restore reads; the
    # per-process stores beside it are write-side leftovers, so damage the biggest file there.
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "d", "*")) if os.path.isfile(p)]
    files = files or [p for p in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
                      if os.path.isfile(p) and "METADATA" not in p and "commit" not in p]
    path = max(files, key=os.path.getsize)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      if kind == "truncated_array":
        f.truncate(size // 2)
      else:
        f.write(b"\0" * size)
  return step


def _flip_array_bytes(step_dir: str) -> None:
  """Inverts 64 bytes of the biggest parameter's data where the step stores them raw.
  Orbax also leaves unread per-process copies, and small arrays sit inside compressed
  b-tree nodes: if the restored value did not change, 64 bytes in the middle of the
  merged store's biggest file are inverted instead (which tensorstore's CRCs catch)."""
  name, needle = _middle_bytes_of_biggest_param(step_dir)
  for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    with open(path, "rb") as f:
      offset = f.read().find(needle)
    if offset >= 0:
      _invert(path, offset, len(needle))
  after = _middle_bytes_of_biggest_param(step_dir, name)
  if after is not None and after[1] == needle:
    merged = max(glob.glob(os.path.join(step_dir, "state", "d", "*")), key=os.path.getsize)
    _invert(merged, os.path.getsize(merged) // 2, 64)


def _middle_bytes_of_biggest_param(step_dir: str, name: str = ""):
  """(name, 64 bytes from the middle) of the biggest (or the named) parameter as a fresh
  process restores it (in this one, tensorstore's cache could answer), or None if the step
  no longer reads."""
  code = ("import json, sys\n"
          "import numpy as np\n"
          "from mmjax.train.checkpoint import load_params\n"
          "p = load_params(sys.argv[1])\n"
          "n = sys.argv[2] or max(p, key=lambda k: p[k].nbytes)\n"
          "a = np.ascontiguousarray(p[n]); m = (a.nbytes // 2) & ~3\n"
          "print(json.dumps([n, a.tobytes()[m:m + 64].hex()]))\n")
  run = subprocess.run([sys.executable, "-c", code, step_dir, name], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT,
                                                     JAX_PLATFORMS="cpu"))
  if run.returncode != 0:
    return None
  name, data = json.loads(run.stdout.strip().splitlines()[-1])
  return name, bytes.fromhex(data)


def _invert(path: str, offset: int, length: int) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    data = f.read(length)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


# ---------------------------------------------------------------------------------------
# The drill.


def _params_equal(reference_dir: str, chaos_dir: str) -> Tuple[bool, List[str]]:
  """(all equal, names that differ) for the params of the two runs' newest checkpoints."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmjax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  want, got = checkpoint_lib.load_params(reference_dir), checkpoint_lib.load_params(chaos_dir)
  differ = sorted(n for n in set(want) | set(got)
                  if n not in want or n not in got or not np.array_equal(want[n], got[n]))
  return not differ, differ


def _plan(opts: Options, rng: random.Random) -> List[Tuple[str, str]]:
  if opts.plan:
    plan = [tuple(item.split(":")) for item in opts.plan]
    for item in plan:
      if len(item) != 2 or item[0] not in SIGNALS or item[1] not in MOMENTS:
        raise ValueError(f"--plan item {':'.join(item)!r}: expected SIGNAL:MOMENT with "
                             f"SIGNAL in {sorted(SIGNALS)} and MOMENT in {MOMENTS}.")
    return [plan[i % len(plan)] for i in range(opts.cycles)]
  return [(rng.choice(sorted(SIGNALS)), rng.choice(MOMENTS)) for _ in range(opts.cycles)]


def run_chaos(opts: Options) -> Dict[str, Any]:
  """Runs the drill in `opts.workdir`; returns the summary also written to chaos.json."""
  if opts.corruption is not None and opts.corruption not in CORRUPTIONS:
    raise ValueError(f"corruption={opts.corruption!r}; expected one of {CORRUPTIONS}.")
  rng = random.Random(opts.seed)
  root = os.path.abspath(opts.workdir)
  if os.path.exists(root) and os.listdir(root) and not os.path.exists(os.path.join(root, "logs")):
    raise ValueError(f"workdir {root} is not empty and not a previous chaos workdir; "
                     "chaos empties its workdir, so give it a new or a chaos one.")
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(os.path.join(root, "logs"))
  reference_dir, chaos_dir = os.path.join(root, "reference"), os.path.join(root, "chaos")
  env = _env(opts, os.path.join(root, "jax_cache"))
  plan = _plan(opts, rng)
  corrupt_cycle = (rng.randrange(len(plan)) if opts.corrupt_cycle is None
                   else opts.corrupt_cycle) if plan else -1
  corruption = opts.corruption or rng.choice(CORRUPTIONS)
  launch_in = lambda workdir, name: Launch(_command(opts, workdir), workdir,
                                           os.path.join(root, "logs", name), env)

  reference = launch_in(reference_dir, "reference")
  intruder = _start_intruder(opts, reference, reference_dir, launch_in)
  cycles, launches, startup_seconds = [], [], 5.0
  for index, (signal_name, moment) in enumerate(plan):
    launch = launch_in(chaos_dir, f"cycle{index}")
    launches.append(launch)
    happened = _wait_for_moment(opts, launch, chaos_dir, moment, rng, startup_seconds)
    if launch.proc.poll() is None:
      launch.proc.send_signal(SIGNALS[signal_name])
    code = launch.wait(opts.timeout)
    cycle = {"cycle": index, "signal": signal_name, "moment": moment, "happened": happened,
             "resumed_from": launch.resumed_from(),
             "newest_step_trained": _newest_step(chaos_dir, launch.metrics_offset),
             "exit_code": code, "saved_steps": _saved_steps(chaos_dir)}
    if launch.first_step_at is not None:
      startup_seconds = launch.first_step_at - launch.started
    if index == corrupt_cycle:
      damaged = corrupt_newest_step(os.path.join(chaos_dir, "checkpoints"), corruption)
      if damaged is None:  # killed before its first checkpoint: damage after the next kill
        corrupt_cycle += 1
      else:
        cycle["corrupted"] = {"kind": corruption, "step": damaged}
    cycles.append(cycle)
    print(f"cycle {index}: {signal_name} at {happened} -> exit {code}, trained up to step "
          f"{cycle['newest_step_trained']}" + (f", then {corruption} on step "
                                               f"{cycle['corrupted']['step']}"
                                               if "corrupted" in cycle else ""), flush=True)
    if happened == "exited" or cycle["newest_step_trained"] == opts.total_steps:
      break  # the run finished before the kill: nothing left to interrupt

  final = launch_in(chaos_dir, "final")
  final_code = final.wait(opts.timeout)
  concurrent = _judge_intruder(intruder, reference, opts.timeout)
  reference_code = reference.wait(opts.timeout)
  if reference_code != 0:
    raise RuntimeError(f"The reference run failed (exit {reference_code}):\n"
                       + reference.stderr()[-3000:])

  # Each kill is judged by the launch after it. It must resume from the newest complete
  # checkpoint the kill left (the damaged one excepted: that one it must name in a warning
  # and move aside); after SIGTERM in training, that is the step the run was at (exit 0).
  corrupt_listing = (os.listdir(os.path.join(chaos_dir, "checkpoints.corrupt"))
                     if os.path.isdir(os.path.join(chaos_dir, "checkpoints.corrupt")) else [])
  survived = 0
  for cycle, later in zip(cycles, launches[1:] + [final]):
    trained = cycle["newest_step_trained"] or cycle["resumed_from"]
    resumed = later.resumed_from()
    bad = cycle.get("corrupted", {}).get("step")
    intact = [s for s in cycle["saved_steps"] if s != bad]
    cycle["next_resumed_from"] = resumed
    cycle["steps_lost"] = max(0, trained - resumed)
    ok = resumed == max(intact, default=0) and (later is not final or final_code == 0)
    if cycle["signal"] in SAVING_SIGNALS and cycle["newest_step_trained"] is not None:
      ok = ok and cycle["exit_code"] == 0 and trained in cycle["saved_steps"]
    if bad is not None:
      cycle["corrupted"]["warned"] = f"Checkpoint step {bad} in" in later.stderr()
      cycle["corrupted"]["moved_aside"] = any(d.startswith(f"{bad}-") for d in corrupt_listing)
      ok = ok and cycle["corrupted"]["warned"] and cycle["corrupted"]["moved_aside"]
    cycle["survived"] = ok
    survived += ok

  reference_losses = dict(_loss_records(reference_dir))
  chaos_losses = _loss_records(chaos_dir)
  final_step = _newest_step(chaos_dir, 0)
  bit_identical, differ = (_params_equal(reference_dir, chaos_dir)
                           if final_code == 0 else (False, ["final launch failed"]))
  summary = {
      "config": opts.config, "overrides": list(opts.overrides), "seed": opts.seed,
      "devices": opts.devices, "total_steps": opts.total_steps,
      "checkpoint_every": opts.checkpoint_every,
      "cycles_run": len(cycles), "cycles_survived": survived,
      "steps_lost": [c["steps_lost"] for c in cycles],
      "steps_lost_total": sum(c["steps_lost"] for c in cycles),
      "final_exit_code": final_code, "final_step": final_step,
      "bit_identical": bit_identical, "params_that_differ": differ,
      "losses_identical": bool(chaos_losses) and all(
          reference_losses.get(s) == loss for s, loss in chaos_losses),
      "cycles": cycles,
      "concurrent_start": concurrent,
      "command": " ".join(_command(opts, chaos_dir)),
  }
  if final_code != 0:
    summary["final_stderr_tail"] = final.stderr()[-3000:]
  scenarios = {}
  for name in opts.scenarios:
    scenarios[name] = SCENARIO_FUNCTIONS[name](opts, root, chaos_dir, reference_dir, env)
    print(f"scenario {name}: {'ok' if scenarios[name]['ok'] else 'FAILED'} "
          f"{ {k: v for k, v in scenarios[name].items() if k not in ('ok', 'stderr_tail')} }",
          flush=True)
  summary["scenarios"] = scenarios
  summary["scenarios_ok"] = sum(s["ok"] for s in scenarios.values())
  with open(os.path.join(root, "chaos.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


# ---------------------------------------------------------------------------------------
# Faults judged on their own: a second launch, a changed config, all steps damaged, disk full.


def workdir_listing(workdir: str) -> Dict[str, str]:
  """{relative path: sha256} of every file under `workdir` (what a refused launch must not
  touch); the lock's flock guard file is left out."""
  import hashlib  # pylint: disable=g-import-not-at-top
  listing = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      if name != ".lock.guard":
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
          listing[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return listing


def _start_intruder(opts: Options, running: Launch, workdir: str, launch_in) -> Optional[Launch]:
  """Once `running` (the reference run) trains, a second launch on its workdir."""
  deadline = running.started + opts.timeout
  while (_newest_step(workdir, running.metrics_offset) is None and running.proc.poll() is None
         and time.time() < deadline):
    time.sleep(0.01)
  return launch_in(workdir, "concurrent") if running.proc.poll() is None else None


def _judge_intruder(intruder: Optional[Launch], running: Launch, timeout: float
                    ) -> Dict[str, Any]:
  """It must have been refused (exit != 0) naming the running launch's pid; the running
  one's results are judged with the rest (its losses and params are the reference)."""
  if intruder is None:
    return {"ok": False, "why": "the reference run ended before a second launch started"}
  code = intruder.wait(timeout)
  message = intruder.stderr()
  return {"ok": code != 0 and "is in use by host" in message
                and f"pid {running.proc.pid}," in message,
          "exit_code": code,
          "message": next((l for l in message.splitlines() if "is in use by" in l), "")[:300]}


def _scenario_copy(root: str, chaos_dir: str, name: str) -> str:
  workdir = os.path.join(root, "scenarios", name)
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(chaos_dir, workdir)
  return workdir


def _launch_and_wait(opts, root, workdir, name, env, extra=()) -> Launch:
  launch = Launch(_command(opts, workdir) + list(extra), workdir,
                  os.path.join(root, "logs", name), env)
  launch.wait(opts.timeout)
  return launch


def _scenario_config_change(opts, root, chaos_dir, reference_dir, env) -> Dict[str, Any]:
  workdir = _scenario_copy(root, chaos_dir, "config_change")
  before = workdir_listing(workdir)
  launch = _launch_and_wait(opts, root, workdir, "config_change", env,
                            ["--config.optimizer.name=sgd"])
  message = launch.stderr()
  result = {"exit_code": launch.proc.returncode,
            "refused": "Refusing to resume" in message,
            "diff_shown": 'optimizer.name: "adamw" -> "sgd"' in message,
            "nothing_changed": workdir_listing(workdir) == before}
  result["ok"] = result["exit_code"] != 0 and all(result.values())
  return result


def _scenario_all_corrupt(opts, root, chaos_dir, reference_dir, env) -> Dict[str, Any]:
  workdir = _scenario_copy(root, chaos_dir, "all_corrupt")
  steps = _saved_steps(workdir)
  for step in steps:
    corrupt_newest_step(os.path.join(workdir, "checkpoints"), "zeroed_array", step)
  before = workdir_listing(workdir)
  refused = _launch_and_wait(opts, root, workdir, "all_corrupt", env)
  message = refused.stderr()
  result = {"steps": steps, "exit_code": refused.proc.returncode,
            "each_step_named": all(f"step {s}: " in message for s in steps),
            "nothing_changed": workdir_listing(workdir) == before}
  os.remove(os.path.join(workdir, "metrics.jsonl"))  # compare the fresh run's losses alone
  again = _launch_and_wait(opts, root, workdir, "all_corrupt_start_over", env, ["--start_over"])
  result["start_over_exit_code"] = again.proc.returncode
  result["start_over_bit_identical"] = (again.proc.returncode == 0
                                        and _params_equal(reference_dir, workdir)[0])
  result["ok"] = (result["exit_code"] != 0 and result["each_step_named"]
                  and result["nothing_changed"] and result["start_over_exit_code"] == 0
                  and result["start_over_bit_identical"])
  return result


def can_mount_tmpfs() -> bool:
  """Whether this machine lets an unprivileged user namespace mount a tmpfs."""
  try:
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
  except OSError:
    return False
  return probe.returncode == 0


def run_until_disk_full(command: Sequence[str], run_dir: str, first_save: int, log_prefix: str,
                        copy_to: str, env: Dict[str, str], timeout: float) -> int:
  """Runs `command` (its --workdir must be `run_dir`, under a fresh directory) on a 64 MiB
  tmpfs mounted in a user namespace; once checkpoint `first_save` exists, fills the disk but
  for half that checkpoint's size, so the next save (not a metrics line) runs out of space.
  Copies the run to `copy_to` afterwards; returns the run's exit status."""
  mount_point = os.path.dirname(run_dir)
  os.makedirs(mount_point, exist_ok=True)
  first = os.path.join(run_dir, "checkpoints", str(first_save))
  quoted = " ".join(f"'{c}'" for c in command)
  script = f"""
mount -t tmpfs -o size=64m tmpfs '{mount_point}' || exit 97
{quoted} > '{log_prefix}.out' 2> '{log_prefix}.err' &
pid=$!
while [ ! -d '{first}' ] && kill -0 $pid 2>/dev/null; do sleep 0.01; done
half=$(( $(du -sk '{first}' | cut -f1) / 2 ))
free=$(df -k --output=avail '{mount_point}' | tail -1)
dd if=/dev/zero of='{mount_point}/filler' bs=1k count=$(( free - half )) 2>/dev/null
wait $pid
code=$?
rm -f '{mount_point}/filler'
cp -a '{run_dir}' '{copy_to}'
exit $code
"""
  shutil.rmtree(copy_to, ignore_errors=True)
  return subprocess.run(["unshare", "-Urm", "sh", "-c", script], env=env, cwd=ROOT,
                        timeout=timeout).returncode


def _scenario_disk_full(opts, root, chaos_dir, reference_dir, env) -> Dict[str, Any]:
  """A fresh run whose disk fills up after its first checkpoint: it must stop with the
  save's error, and a relaunch of what it left must resume from the newest step kept."""
  if not can_mount_tmpfs():
    return {"ok": True, "skipped": "mounting a tmpfs in a user namespace is not permitted here"}
  scratch = os.path.join(root, "scenarios", "disk_full")
  run_dir, copy = os.path.join(scratch, "mnt", "run"), os.path.join(scratch, "copy")
  log = os.path.join(root, "logs", "disk_full")
  code = run_until_disk_full(_command(opts, run_dir), run_dir, opts.checkpoint_every, log,
                             copy, env, opts.timeout)
  with open(log + ".err") as f:
    message = f.read()
  kept = _saved_steps(copy)
  resumed = _launch_and_wait(opts, root, copy, "disk_full_resume", env)
  result = {"exit_code": code, "save_error_named": "Saving checkpoint step" in message
            and "No space left on device" in message,
            "steps_kept": kept, "resume_exit_code": resumed.proc.returncode,
            "resumed_from": resumed.resumed_from()}
  result["ok"] = (code not in (0, 97) and result["save_error_named"] and bool(kept)
                  and result["resume_exit_code"] == 0 and result["resumed_from"] == max(kept))
  if not result["ok"]:
    result["stderr_tail"] = message[-2000:]
  return result


SCENARIO_FUNCTIONS = {"config_change": _scenario_config_change,
                      "all_corrupt": _scenario_all_corrupt, "disk_full": _scenario_disk_full}


def _define_flags() -> None:
  """Flags named after the Options fields (`--override` once per field=value)."""
  d = Options(workdir="")
  flags.DEFINE_string("workdir", None, "Runs, logs and chaos.json (emptied first).")
  flags.DEFINE_string("config", d.config, "Config file of the run.")
  flags.DEFINE_multi_string("override", list(d.overrides), "field=value config override "
                            "(default: shrink configs/vit_digits.py to a run of seconds).")
  flags.DEFINE_integer("cycles", d.cycles, "Kill / resume cycles before the final launch.")
  flags.DEFINE_integer("seed", d.seed, "Seed of the signal, moment and corruption choices.")
  flags.DEFINE_integer("total_steps", d.total_steps, "Steps of the run.")
  flags.DEFINE_integer("checkpoint_every", d.checkpoint_every, "Steps between checkpoints.")
  flags.DEFINE_integer("devices", d.devices, "Simulated CPU devices of every launch.")
  flags.DEFINE_list("plan", None, "SIGNAL:MOMENT per cycle instead of random ones, e.g. "
                    "KILL:save,TERM:training (SIGNAL: KILL/TERM; MOMENT: " + "/".join(MOMENTS) + ").")
  flags.DEFINE_integer("corrupt_cycle", None, "Cycle whose kill is followed by damage to the "
                       "newest checkpoint (default: a random one; -1: none).")
  flags.DEFINE_enum("corruption", None, CORRUPTIONS, "Kind of damage (default: random).")
  flags.DEFINE_list("scenarios", list(d.scenarios), "Faults judged after the drill, each on a "
                    "copy of the run: " + ", ".join(SCENARIOS) + " (empty: none).")
  flags.DEFINE_float("timeout", d.timeout, "Seconds any one launch may take.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required.")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  summary = run_chaos(Options(
      workdir=f.workdir, config=f.config, overrides=tuple(f.override), cycles=f.cycles,
      seed=f.seed, total_steps=f.total_steps, checkpoint_every=f.checkpoint_every,
      devices=f.devices, plan=f.plan, corrupt_cycle=f.corrupt_cycle, corruption=f.corruption,
      scenarios=tuple(f.scenarios), timeout=f.timeout))
  print(f"=== chaos: {summary['cycles_survived']}/{summary['cycles_run']} cycles survived, "
        f"steps lost {summary['steps_lost']} (total {summary['steps_lost_total']}), final step "
        f"{summary['final_step']}/{summary['total_steps']}, params bit-identical to the "
        f"uninterrupted run: {summary['bit_identical']}, losses identical: "
        f"{summary['losses_identical']}; second launch refused: "
        f"{summary['concurrent_start'].get('ok')}; scenarios ok: {summary['scenarios_ok']}/"
        f"{len(summary['scenarios'])}")
  print(f"details: {os.path.join(os.path.abspath(f.workdir), 'chaos.json')}")
  ok = (summary["cycles_survived"] == summary["cycles_run"] and summary["bit_identical"]
        and summary["final_exit_code"] == 0 and summary["concurrent_start"].get("ok")
        and summary["scenarios_ok"] == len(summary["scenarios"]))
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
