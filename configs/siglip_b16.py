"""SigLIP ViT-B/16 image-text pre-training (Zhai et al. 2023, "Sigmoid Loss for Language
Image Pre-Training"), as released in big_vision (B/16, 224px, 64 text tokens).

  python -m mmjax.main --config configs/siglip_b16.py --workdir gs://BUCKET/siglip_b16

The CLIP architecture (configs/clip_b16.py) with SigLIP's changes: the pairwise sigmoid
loss with a learned temperature (init t' = log 10; exp(t') not capped, as big_vision)
and bias (init -10), attention-pooled (MAP) image tower, a bidirectional B-sized text
tower (768 wide, 12 layers, 12 heads) pooled at the last token, 768-d embeddings, 32k
SentencePiece vocabulary. Optimiser: Adam with b2 = 0.95 (the paper's fix for
large-batch instability), peak lr 1e-3, weight decay 1e-4 not scaled by the lr (so 0.1
in optax's AdamW), batch 32,768, cosine decay; 9B examples seen (the paper's B/16
ablation length).

Data: WebLI is not public; the config reads `coco_captions` (prepare it once, see
configs/clip_b16.py) or any TFDS image-text set via `--config.data.name=tfds`. Point
`--config.data.tokenizer` at a 32k SentencePiece model (e.g. a T5 / c4 vocabulary);
the default byte-level tokenizer also fits in the 32k vocabulary.
"""
import ml_collections

from mmjax.data import pipeline
from mmjax.train.config import default_config

TEXT_LENGTH = 64


def get_config(arg=None):
  del arg
  config = default_config()
  config.seed = 0
  config.batch_size = 32_768
  config.total_steps = 9_000_000_000 // config.batch_size
  config.eval_batch_size = 1024
  config.log_every = 50
  config.eval_every = 5000
  config.checkpoint_every = 2000

  config.data = pipeline.default_config(
      "coco_captions", image_size=224, max_text_len=TEXT_LENGTH, tokenizer="bytes")

  config.model = ml_collections.ConfigDict(dict(
      name="two_tower",
      loss_type="sigmoid",
      scale_init=10.0,           # t' = log 10
      max_logit_scale=None,      # SigLIP does not cap exp(t') (CLIP caps it at 100)
      bias_init=-10.0,
      embed_dim=768,
      vocab_size=32_000,
      patch_size=16, image_width=768, image_depth=12, image_heads=12, image_mlp_dim=3072,
      image_pool="map",
      text_width=768, text_depth=12, text_heads=12, text_mlp_dim=3072,
      max_text_len=TEXT_LENGTH, text_pool="last", text_causal=False,
      contrastive_impl="dense",  # "ring": same loss, no [batch, batch] logits
      dtype="float32",           # bfloat16 on accelerators
  ))

  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95
  config.optimizer.weight_decay = 0.1     # = big_vision wd 1e-4 / lr 1e-3
  config.optimizer.clip_grad_norm = 1.0
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = 5000
  return config
