"""Shared test fixtures: a small multimodal model and a random batch for it."""
import jax.numpy as jnp
import numpy as np

from mmjax.models.flops import fusion_table_fields
from mmjax.models.multimodal import MultimodalModel


def example_model_and_batch(fusion: str = "hybrid", batch_size: int = 4, **overrides):
  """The fusion table's demo-sized model (mmjax/models/flops.py), `overrides` applied, and
  a random batch of image (32x32), question, audio (0.5 s at 16 kHz), sensor (32 steps),
  caption `text` (half padding), `answer` and `label`."""
  fields = fusion_table_fields(fusion, **overrides)
  model = MultimodalModel(**fields)
  rng = np.random.default_rng(0)
  length = fields["max_text_len"]
  batch = {
      "image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
      "audio": rng.normal(size=(batch_size, 8000)).astype(np.float32),
      "sensor": rng.normal(size=(batch_size, 32, 6)).astype(np.float32),
      "text": rng.integers(1, fields["vocab_size"], (batch_size, length)).astype(np.int32),
      "question": rng.integers(1, fields["vocab_size"], (batch_size, length)).astype(np.int32),
      "answer": rng.integers(0, max(fields["num_answers"], 1), (batch_size,)).astype(np.int32),
      "label": rng.integers(0, 10, (batch_size,)).astype(np.int32),
  }
  batch["text"][:, length // 2:] = 0  # some padding
  return model, {k: jnp.asarray(v) for k, v in batch.items()}
