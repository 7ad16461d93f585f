"""CLIP ViT-B/16 image-text pre-training (Radford et al. 2021, Table 19/20 recipe).

  python -m mmjax.main --config configs/clip_b16.py --workdir /gcs/BUCKET/clip_b16

A two-tower model: ViT-B/16 image tower (class-token pooling, a LayerNorm before the
encoder), a 12-layer, 512-wide, 8-head causal text Transformer over 77 tokens pooled at
the last token, quick GELU and LayerNorm epsilon 1e-5 in both (OpenAI's CLIP, and what
`python -m mmjax.convert --from hf` writes for a CLIP checkpoint), both projected
to 512-d and trained with the softmax (InfoNCE) loss over the global batch, temperature
learned from 0.07 (logit scale 1 / 0.07, capped at 100 as in OpenAI's training).
Optimiser as in the paper: AdamW (b2 0.98, eps 1e-6, decoupled weight decay 0.2), peak
lr 5e-4, 2k warmup steps, cosine decay, batch 32,768, 32 epochs of 400M pairs =
390,625 steps.

Data: CLIP's 400M-pair WIT set is not public; the config reads `coco_captions` (prepare
it once: `tfds build coco_captions --data_dir=$MMJAX_DATA_DIR --file_format=array_record`)
or any TFDS image-text set through `--config.data.name=tfds
--config.data.tfds.tfds_name=NAME`. Text is tokenised with mmjax's byte-level
tokenizer unless `--config.data.tokenizer=/path/to/spm.model` names a SentencePiece
model; `vocab_size` stays CLIP's 49,408 so the parameter count matches the paper.

From converted CLIP weights (`python -m mmjax.convert --from hf --src openai-clip-vit-base-patch16
--dst DST`): `--config.init_from.checkpoint=DST --config.data.tokenizer=openai-clip-vit-base-patch16/`
(CLIP's own vocabulary); DST/model_config.json brings the text pooling and padding and
CLIP's pixel mean / std.
"""
import ml_collections

from mmjax.data import pipeline
from mmjax.train.config import default_config

CONTEXT_LENGTH = 77


def get_config(arg=None):
  del arg
  config = default_config()
  config.seed = 0
  config.batch_size = 32_768
  config.total_steps = 32 * 400_000_000 // config.batch_size
  config.eval_batch_size = 1024
  config.log_every = 50
  config.eval_every = 5000
  config.checkpoint_every = 2000

  config.data = pipeline.default_config(
      "coco_captions", image_size=224, max_text_len=CONTEXT_LENGTH, tokenizer="bytes")

  config.model = ml_collections.ConfigDict(dict(
      name="two_tower",
      loss_type="softmax",
      embed_dim=512,
      vocab_size=49_408,
      patch_size=16, image_width=768, image_depth=12, image_heads=12, image_mlp_dim=3072,
      image_pool="cls",
      image_pre_norm=True,       # CLIP's ln_pre before the image encoder
      activation="quick_gelu",   # x * sigmoid(1.702 x), both towers
      layer_norm_epsilon=1e-5,
      text_width=512, text_depth=12, text_heads=8, text_mlp_dim=2048,
      # text_pool: the default "last" (the last non-padding token, CLIP's end token);
      # converted CLIP weights bring "argmax", the same token under CLIP's tokenizer.
      max_text_len=CONTEXT_LENGTH, text_causal=True,
      contrastive_impl="dense",  # "ring": same loss, no [batch, batch] logits
      dtype="float32",           # bfloat16 on accelerators
  ))

  config.optimizer.name = "adamw"
  config.optimizer.lr = 5e-4
  config.optimizer.b1, config.optimizer.b2, config.optimizer.eps = 0.9, 0.98, 1e-6
  config.optimizer.weight_decay = 0.2
  config.optimizer.clip_grad_norm = 0.0   # CLIP clips the logit scale at 100, not gradients
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = 2000
  return config
