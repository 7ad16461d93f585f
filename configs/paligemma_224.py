"""PaliGemma's transfer recipe (SigLIP So400m/14 + Gemma 2B, 224 px): fine-tuning on
COCO captions with the hyper-parameters of big_vision's best COCO transfer
(`proj/paligemma/transfers/coco35l.py`, English only: Adam b2 0.999, lr 1e-5, weight
decay 1e-6 per step, cosine with 5% warmup, gradient clipping 1, batch 256, 5 epochs of
COCO's 566,435 image-caption pairs, captions of 32 tokens, prompt "caption en").

  # 1. the pretrained weights and tokenizer (a Hugging Face PaliGemma directory)
  python -m mmjax.convert --from hf --src ./paligemma-3b-pt-224 --dst /ckpt/paligemma_224
  # 2. fine-tune (COCO 2017 files under /data/coco, see mmjax/data/builders/coco_files.py)
  python -m mmjax.main --config configs/paligemma_224.py --workdir /runs/pg224_coco \
      --config.init_from.checkpoint=/ckpt/paligemma_224 \
      --config.data.tokenizer=./paligemma-3b-pt-224/tokenizer.model \
      --config.data.coco_files.root=/data/coco \
      --config.mesh.data=1 --config.mesh.fsdp=16       # e.g. a v5e-16: params sharded

Sequence: [256 image tokens | <bos> "caption en" "\\n" | caption <eos>], full attention
over the prefix, loss on the caption; greedy decoding at evaluation, scored with
CIDEr-D etc. (config.generation). Everything is trained (PaliGemma transfers do not
freeze the encoder); `--config.optimizer.frozen='("image_encoder/.*",)'` freezes it.
Runs in bfloat16 compute with float32 parameters. The vocabulary is PaliGemma's 257,216
(Gemma's 256,000 + 1,024 location + 128 segmentation tokens).
"""
import ml_collections

from mmjax.data import pipeline
from mmjax.train.config import default_config

IMAGE_SIZE = 224
PREFIX_LEN, SUFFIX_LEN = 16, 32
BOS, EOS = 2, 1                     # Gemma's SentencePiece ids (pad is 0)


def preprocess(train: bool, image_size: int = IMAGE_SIZE, caption_key: str = "captions") -> str:
  """Decode, resize, [-1, 1] pixels, and the PaliGemma prompt layout."""
  keys = ("image", "prefix", "suffix") + (() if train else ("prompt_caption",))
  return (f"decode|resize({image_size})|normalize|"
          f"vlm_task(('caption',), prefix_len={PREFIX_LEN}, suffix_len={SUFFIX_LEN}, "
          f"eos_id={EOS}, bos_id={BOS}, separator='\\n', caption_prompt='caption en', "
          f"caption_key={caption_key!r})|keep{keys!r}")


def get_config(arg=None):
  del arg
  config = default_config()
  config.seed = 0
  config.batch_size = 256
  config.total_steps = 5 * 566_435 // 256          # 5 epochs of (image, caption) pairs
  config.eval_batch_size = 256
  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.generation.decode = "greedy"
  config.generation.max_len = SUFFIX_LEN

  config.data = pipeline.default_config(
      "coco_files", tokenizer="paligemma-3b-pt-224/tokenizer.model",
      preprocess=preprocess(True), eval_preprocess=preprocess(False))
  config.data.coco_files.update(dict(
      annotations={"train": "annotations/captions_train2017.json",
                   "val": "annotations/captions_val2017.json"},
      images={"train": "train2017", "val": "val2017"}))

  config.model = ml_collections.ConfigDict(dict(
      name="vlm",
      encoder=dict(variant="So400m/14", activation="gelu_tanh", layer_norm_epsilon=1e-6),
      projector="linear",
      vocab_size=257_216, width=2048, depth=18, num_heads=8, num_kv_heads=1, head_dim=256,
      mlp_dim=16_384, activation="gelu_tanh", norm_epsilon=1e-6, norm_scale_offset=1.0,
      rope_base=10_000.0, embed_scale=True, tie_embeddings=True,
      prefix_attention="full", tasks=("caption",), eos_id=EOS, max_decode_len=SUFFIX_LEN,
      dtype="bfloat16"))

  config.optimizer.lr = 1e-5
  config.optimizer.weight_decay = 0.1              # x lr: 1e-6 per step, as big_vision
  config.optimizer.b2 = 0.999
  config.optimizer.clip_grad_norm = 1.0
  config.schedule.name = "cosine"
  config.schedule.warmup_steps = config.total_steps // 20   # 5% warmup
  return config
