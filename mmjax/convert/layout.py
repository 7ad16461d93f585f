"""The mmjax parameter names the importers and the exporter write, in one place.

Source files differ; the destination does not. Every Transformer block of mmjax
(`mmjax.nn.transformer.EncoderBlock`) has the same parameters, and each source format
describes its own block once as a table {mmjax name under the block: (source name, rule)}.

ViT (`mmjax.models.vit.ViT`, registered as "vit"), names at the top of its tree:
  embedding/{kernel [p, p, 3, D], bias}   patch embedding
  cls [1, 1, D]                           class token (class_token / pool_type "cls")
  pos_embedding [1, prefix + N, D]        learned; its first row belongs to the class token
  pre_norm/{scale, bias}                  LayerNorm before the encoder (pre_norm=True)
  encoder/encoderblock_{i}/...            the encoder (or encoder/encoderblock, scanned)
  encoder/encoder_norm                    final LayerNorm
  MAPHead/{probe, attention, norm, mlp}   attention pooling (pool_type "map")
  pre_logits/{kernel, bias}               optional Dense + tanh (representation_size)
  head/{kernel, bias}                     classifier

Two-tower (`mmjax.models.two_tower.TwoTower`, "two_tower"): img/<the ViT above>,
txt/embed/{embedding/embedding, pos_embedding}, txt/encoder/{encoderblock_{i}, encoder_norm},
img_proj/kernel, txt_proj/kernel, contrastive/{logit_scale, logit_bias}.
"""

# Parameters of one encoder block, relative to `.../encoderblock_{i}`.
BLOCK = (
    "attention_norm/scale", "attention_norm/bias",
    "attention/query/kernel", "attention/query/bias",
    "attention/key/kernel", "attention/key/bias",
    "attention/value/kernel", "attention/value/bias",
    "attention/out/kernel", "attention/out/bias",
    "mlp_norm/scale", "mlp_norm/bias",
    "mlp/fc1/kernel", "mlp/fc1/bias",
    "mlp/fc2/kernel", "mlp/fc2/bias",
)

# ViT.
PATCH_KERNEL = "embedding/kernel"
PATCH_BIAS = "embedding/bias"
CLS = "cls"
POSEMB = "pos_embedding"
PRE_NORM = "pre_norm"        # ViT(pre_norm=True): CLIP's pre_layrnorm, timm's norm_pre
ENCODER = "encoder"
BLOCK_PREFIX = "encoderblock"
ENCODER_NORM = "encoder/encoder_norm"
MAP_HEAD = "MAPHead"
PRE_LOGITS = "pre_logits"
HEAD = "head"

# Two-tower.
IMG = "img"
TXT_EMBEDDING = "txt/embed/embedding/embedding"
TXT_POSEMB = "txt/embed/pos_embedding"
TXT_ENCODER = "txt/encoder"
TXT_ENCODER_NORM = "txt/encoder/encoder_norm"
IMG_PROJ = "img_proj/kernel"
TXT_PROJ = "txt_proj/kernel"
LOGIT_SCALE = "contrastive/logit_scale"
LOGIT_BIAS = "contrastive/logit_bias"


def block(encoder: str, i: int) -> str:
  """The name of layer `i` of the encoder at `encoder` (per-layer layout)."""
  return f"{encoder}/{BLOCK_PREFIX}_{i}"


def check_block_table(table) -> None:
  """A source block table must name every mmjax block parameter exactly once."""
  if sorted(table) != sorted(BLOCK):
    raise AssertionError(f"block table covers {sorted(table)}, mmjax blocks have {sorted(BLOCK)}")
