"""A tiny model and data pipeline for the trainer tests (no test functions here).

`TokenClassifier` follows mmjax.models.base: every pixel of an [S, S, 1] image is a token
with a learned position embedding (so init_from can resample it), mean-pooled into an
MLP head, with logical axis names on every kernel. The pipeline module interface is
the one `config.data_pipeline` names: `create_train_iterator` / `create_eval_iterator`.
Configs pick both with `config.imports` / `config.data_pipeline` = this module.
"""
import flax.linen as nn
import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax.models.base import Model
from mmjax.nn.embed import PositionGrid
from mmjax.registry import MODELS
from mmjax.train.config import default_config

MODULE = "tests.test_train_fixtures"


@MODELS.register("test_token_classifier", override=True)
class TokenClassifier(Model):
  num_classes: int = 4
  width: int = 16
  dropout: float = 0.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, batch, train: bool):
    image = batch["image"].astype(self.dtype)
    tokens = image.reshape(image.shape[0], -1, image.shape[-1])
    x = nn.Dense(self.width, dtype=self.dtype, name="embed",
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ("patch", "embed")))(tokens)
    posemb = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "length", "embed")), (1,) + x.shape[1:])
    x = nn.with_logical_constraint(x + posemb.astype(self.dtype), ("batch", "length", "embed"))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = jnp.mean(x, axis=1)
    x = nn.gelu(nn.Dense(2 * self.width, dtype=self.dtype, name="hidden",
                         kernel_init=nn.with_logical_partitioning(
                             nn.initializers.lecun_normal(), ("embed", "mlp")))(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), ("mlp", "classes")))(x)

  @nn.nowrap
  def position_grids(self, batch):
    """Its table: one row per pixel of the [S, S, 1] image, row-major, no class token."""
    return {"pos_embedding": PositionGrid(0, *batch["image"].shape[1:3])}

  def loss(self, batch, train: bool):
    logits = self(batch, train).astype(jnp.float32)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return jnp.mean(per_example), {"accuracy": accuracy.astype(jnp.float32)}

  def evaluate(self, batch):
    logits = self(batch, train=False)
    return {"accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)}


def _example(index: int, size: int, num_classes: int, seed: int):
  """A noisy image whose class sets a brighter quadrant-like stripe: learnable, not trivial."""
  rng = np.random.default_rng(seed * 1_000_003 + index)
  label = index % num_classes
  image = rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32)
  image[label % size] += 1.5
  return {"image": image, "label": np.int32(label)}


def create_train_iterator(data, *, global_batch_size: int, seed: int):
  import jax  # pylint: disable=g-import-not-at-top
  per_process = global_batch_size // jax.process_count()
  dataset = (grain.MapDataset.range(data.num_train).shuffle(seed=seed)
             [jax.process_index()::jax.process_count()]
             .repeat()
             .map(lambda i: _example(int(i), data.size, data.num_classes, 0))
             .batch(per_process, drop_remainder=True))
  poisoned = tuple(data.get("nan_at_steps", ()))
  if poisoned:  # NaN images in the batches of these (1-based) steps: a divergence drill
    dataset = dataset.map_with_index(
        lambda i, b: dict(b, image=b["image"] * np.nan) if i + 1 in poisoned else b)
  return iter(dataset.to_iter_dataset())


def create_eval_iterator(data, *, global_batch_size: int):
  import jax  # pylint: disable=g-import-not-at-top
  padded = -(-data.num_eval // global_batch_size) * global_batch_size

  def example(i):
    out = _example(int(i) % data.num_eval, data.size, data.num_classes, 1)
    out["valid"] = np.bool_(i < data.num_eval)
    return out

  per_process = global_batch_size // jax.process_count()
  dataset = (grain.MapDataset.range(padded)[jax.process_index()::jax.process_count()]
             .map(example).batch(per_process))
  return iter(dataset)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """A config that trains TokenClassifier for a few steps in a second or two."""
  config = default_config()
  config.imports = (MODULE,)
  config.data_pipeline = MODULE
  config.model = ml_collections.ConfigDict(dict(name="test_token_classifier", num_classes=4,
                                                width=16, dropout=0.1))
  config.data = ml_collections.ConfigDict(dict(name="synthetic", size=4, num_classes=4,
                                               num_train=256, num_eval=37))
  config.total_steps = 5
  config.batch_size = 16
  config.eval_batch_size = 16
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 0
  config.progress_bar = False
  config.optimizer.lr = 1e-2
  config.schedule.warmup_steps = 2
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def subprocess_env(num_devices: int, cache_dir) -> dict:
  """Environment for a trainer subprocess: its device count, the repo importable, and a
  compilation cache shared by the launches of one test (a relaunch compiles nothing)."""
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices), PYTHONPATH=root,
              JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def read_metrics(workdir: str):
  """The records of WORKDIR/metrics.jsonl."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def losses(workdir: str):
  """step -> train loss from metrics.jsonl (the last record of each step wins)."""
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
