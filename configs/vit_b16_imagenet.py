"""ViT-B/16 on ImageNet-1k from scratch, big_vision's recipe (Steiner et al. 2021, "How to
train your ViT?", as in big_vision/configs/vit_i1k.py).

  python -m mmjax.main --config configs/vit_b16_imagenet.py --workdir /gcs/BUCKET/vit_b16

Needs `imagenet2012` prepared once as TFDS array_record (mmjax never downloads; see
mmjax/data/builders/public.py):

  tfds build imagenet2012 --data_dir=$MMJAX_DATA_DIR --file_format=array_record

Recipe: batch 4096, 300 epochs, Adam (b1 0.9, b2 0.999), peak lr 1e-3 with 10k warmup
steps and cosine decay, global-norm clipping at 1.0, class-token pooling, 224x224 crops
with random flips. No pre-logits layer: the paper's released (AugReg) ViTs have none, so
converted ones (`mmjax.convert --from timm` / `--from hf`) fine-tune with
`--config.init_from.checkpoint=DST` alone, their GELU and LayerNorm epsilon coming from
DST/model_config.json; big_vision's vit_i1k.py adds one (rep_size=True):
`--config.model.representation_size=768`. big_vision's weight decay 1e-4 is not
scaled by the learning rate; optax's AdamW scales it, so the same decay reads 0.1 here.
Expect about 79% top-1 with big_vision's RandAugment + Mixup ("medium2"); the ops named
in `config.data.preprocess` here are crop and flip only (a fork can register more ops
in mmjax.data.preprocess.PP_OPS), which lands nearer the paper's "light1" numbers.
On accelerators set `--config.model.dtype=bfloat16` and a mesh, e.g. `--config.mesh.fsdp=8`.
"""
import ml_collections

from mmjax.data import pipeline
from mmjax.train.config import default_config

IMAGENET_TRAIN_EXAMPLES = 1_281_167
EPOCHS = 300


def get_config(arg=None):
  del arg
  config = default_config()
  config.seed = 0
  config.batch_size = 4096
  config.total_steps = EPOCHS * IMAGENET_TRAIN_EXAMPLES // config.batch_size
  config.eval_batch_size = 1024
  config.log_every = 50
  config.eval_every = 2500
  config.checkpoint_every = 1000

  config.data = pipeline.default_config(
      "imagenet2012", image_size=224,
      preprocess="decode|resize(256)|random_crop(224)|flip_lr|normalize|"
                 "keep('image', 'label')",
      eval_preprocess="decode|resize(256)|central_crop(224)|normalize|"
                      "keep('image', 'label')")

  config.model = ml_collections.ConfigDict(dict(
      name="vit",
      variant="B/16",            # width 768, depth 12, mlp 3072, 12 heads, 16x16 patches
      num_classes=1000,
      pool_type="cls",
      posemb="learn",
      dropout_rate=0.0,
      droppath_rate=0.0,
      dtype="float32",
  ))

  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.weight_decay = 0.1     # = big_vision wd 1e-4 / lr 1e-3 (see above)
  config.optimizer.clip_grad_norm = 1.0
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = 10_000
  return config
