"""Training: `trainer.train_and_evaluate(config, workdir)` and what it is built from.

  config.py      the config schema (defaults, validation, override checks)
  sharding.py    the (data, fsdp, tensor) mesh, logical axis rules, batch layout
  optim.py       Optax optimizer + lr schedule from the config, regexes on param names
  state.py       TrainState, created already sharded
  checkpoint.py  Orbax checkpoints with the data iterator, robust restore, init_from
  evaluate.py    exact evaluation over a whole split
  writers.py     metrics.jsonl, TensorBoard, progress bar, device peak FLOP/s for MFU
  trainer.py     the train step and the loop
  LAUNCH.md      launching on TPU pod slices and GPU clusters
"""
