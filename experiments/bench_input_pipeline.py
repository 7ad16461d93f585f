"""Input-pipeline throughput (examples/s) for a demo-like batch, vs the train step's needs.

    python experiments/bench_input_pipeline.py                       # shapes, batch 64
    python experiments/bench_input_pipeline.py --dataset=digits --num_workers=2
    python experiments/bench_input_pipeline.py --train_step_ms=120   # compare to a step

Prepares the dataset first (not timed), then times `--batches` batches of
`create_train_iterator` after `--warmup` batches, and prints one JSON line. With
`--train_step_ms` (measured by the trainer for the same batch) it also prints the
examples/s the step consumes and whether the pipeline keeps up with margin.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax.data import pipeline  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="shapes")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_workers", type=int, default=0)
  parser.add_argument("--read_threads", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--train_step_ms", type=float, default=None)
  args = parser.parse_args()

  config = pipeline.default_config(args.dataset, data_dir=args.data_dir,
                                   num_workers=args.num_workers,
                                   read_threads=args.read_threads)
  info = pipeline.dataset_info(config)  # prepares the dataset (not timed)
  start = time.perf_counter()
  iterator = pipeline.create_train_iterator(config, global_batch_size=args.batch_size, seed=0)
  for _ in range(args.warmup):
    batch = next(iterator)
  first = time.perf_counter() - start
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(args.batches):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  cpu_seconds = time.process_time() - cpu_start  # this process only (not workers)
  result = {
      "dataset": args.dataset, "batch_size": args.batch_size,
      "num_workers": args.num_workers, "read_threads": args.read_threads,
      "cpus": os.cpu_count(), "startup_and_warmup_s": round(first, 2),
      "pipeline_examples_per_s": round(args.batches * args.batch_size / seconds, 1),
      "pipeline_ms_per_batch": round(1000 * seconds / args.batches, 2),
      # On a shared machine wall time depends on the others' load; CPU time less so.
      "examples_per_cpu_s": (round(args.batches * args.batch_size / cpu_seconds, 1)
                             if args.num_workers == 0 else None),
      "load_average_1min": round(os.getloadavg()[0], 2),
      "batch": {k: [list(v.shape), str(v.dtype)] for k, v in batch.items()},
      "splits": info["splits"],
  }
  if args.train_step_ms:
    step_rate = 1000 * args.batch_size / args.train_step_ms
    result.update(train_step_examples_per_s=round(step_rate, 1),
                  pipeline_over_step=round(result["pipeline_examples_per_s"] / step_rate, 2))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
