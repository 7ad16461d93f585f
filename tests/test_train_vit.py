"""The registered ViT trains under the trainer on a 2x2x2 mesh (tensor-parallel attention):
the model <-> trainer integration (logical axis names and constraints of real transformer
layers under jax.set_mesh).
"""
import ml_collections
import numpy as np

from test_train_fixtures import losses, tiny_config

from mmjax.train import trainer


def test_vit_trains_on_a_2x2x2_mesh(tmp_path):
  config = tiny_config(total_steps=3, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  config.model = ml_collections.ConfigDict(dict(
      name="vit", variant=None, num_classes=4, patch_size=2, width=16, depth=1, num_heads=2,
      mlp_dim=32, pool_type="gap"))
  results = trainer.train_and_evaluate(config, str(tmp_path))
  assert results["step"] == 3
  assert all(np.isfinite(v) for v in losses(str(tmp_path)).values())
