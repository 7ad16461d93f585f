"""Two-tower contrastive image-text model: CLIP (softmax loss) and SigLIP (sigmoid loss).

    image ──► ViT (mmjax.models.vit) ──► img_proj ──► L2 norm ──┐
                                                                ├─► contrastive loss
    text  ──► TextTransformer (causal, last-token pool) ──► txt_proj ──► L2 norm ──┘

The loss compares every image with every text of the *global* batch: under `jax.jit`
with a batch sharded over the mesh, the arrays the loss sees are global, so XLA gathers
the embeddings across devices itself (tests/test_two_tower.py checks that 8 simulated
devices give the single-device value); `contrastive_impl="ring"` computes the same loss
without gathering (mmjax/ring_loss.py). The loss is split into per-example `features`
(the two embeddings) and `loss_from_features`, so gradient accumulation is exact
(mmjax/models/base.py).

Zero-shot classification: `class_embeddings(prompt_tokens [C, P, L])` embeds P prompts
per class ("a photo of a {}.", ...), and `zero_shot_logits(batch, class_embeddings)`
scores images against their prompt-ensembled mean.

Parameter tree (checkpoint format; Hugging Face CLIP maps onto it):
  img/...                 the ViT image tower (see mmjax/models/vit.py), pooled output
  txt/embed/embedding/embedding [V, D], txt/embed/pos_embedding [1, L, D],
  txt/encoder/encoderblock_{i}/{attention_norm, attention/{query,key,value,out}, mlp_norm,
                                mlp/{fc1,fc2}}, txt/encoder/encoder_norm
  img_proj/kernel, txt_proj/kernel   (no bias, as CLIP's visual / text projections)
  contrastive/logit_scale (log inverse temperature), contrastive/logit_bias (sigmoid only)
"""
from typing import Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import metrics
from mmjax.models import heads
from mmjax.models.base import Model
from mmjax.models.text import TextTransformer
from mmjax.nn.embed import PositionGrid
from mmjax.models.vit import ViT
from mmjax.registry import MODELS

Array = jax.Array


@MODELS.register("two_tower")
class TwoTower(Model):
  """CLIP / SigLIP: a ViT image tower and a Transformer text tower, contrastively trained."""
  vocab_size: int = 1000
  embed_dim: int = 64
  loss_type: str = "softmax"          # "softmax" (CLIP) or "sigmoid" (SigLIP)
  scale_init: Optional[float] = None  # None: 1 / 0.07 for softmax (CLIP), 10 for sigmoid
  bias_init: float = -10.0
  max_logit_scale: Optional[float] = 100.0  # cap on exp(logit_scale); None: none (SigLIP)
  contrastive_impl: str = "dense"     # "dense" or "ring" (mmjax/ring_loss.py): same loss
  # Image tower (ViT).
  patch_size: int = 8
  image_width: int = 64
  image_depth: int = 2
  image_heads: int = 4
  image_mlp_dim: Optional[int] = None
  image_pool: str = "cls"             # CLIP: the class token; SigLIP: "map"
  image_pre_norm: bool = False        # CLIP: LayerNorm before the image encoder (pre_layrnorm)
  # Text tower.
  text_width: int = 64
  text_depth: int = 2
  text_heads: int = 4
  text_mlp_dim: Optional[int] = None
  max_text_len: int = 32
  text_pool: str = "last"
  text_causal: bool = True
  pad_id: Optional[int] = 0           # padding id when the batch has no `text_mask`; None: none

  dropout_rate: float = 0.0
  activation: str = "gelu_tanh"       # both towers' MLPs; CLIP: "quick_gelu"
  layer_norm_epsilon: float = 1e-6    # both towers; CLIP: 1e-5
  dtype: str = "float32"
  implementation: Optional[str] = None
  scan_layers: bool = False           # both towers: one scanned block (compile time flat in depth)
  remat_policy: str = "none"          # both towers: rematerialise blocks (see nn.transformer)

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    self.img = ViT(variant=None, width=self.image_width, depth=self.image_depth,
                   mlp_dim=self.image_mlp_dim or 4 * self.image_width,
                   num_heads=self.image_heads, patch_size=self.patch_size, num_classes=0,
                   pool_type=self.image_pool, pre_norm=self.image_pre_norm,
                   activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
                   dropout_rate=self.dropout_rate, dtype=dtype,
                   implementation=self.implementation, scan_layers=self.scan_layers,
                   remat_policy=self.remat_policy)
    self.txt = TextTransformer(
        self.vocab_size, width=self.text_width, depth=self.text_depth,
        num_heads=self.text_heads, mlp_dim=self.text_mlp_dim, max_len=self.max_text_len,
        causal=self.text_causal, pool=self.text_pool, pad_id=self.pad_id,
        dropout_rate=self.dropout_rate,
        activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
        dtype=dtype, implementation=self.implementation, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy)
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None))
    self.img_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=dtype, kernel_init=kernel_init)
    self.txt_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=dtype, kernel_init=kernel_init)
    self.contrastive = heads.ContrastiveHead(self.loss_type, scale_init=self.scale_init,
                                             bias_init=self.bias_init,
                                             max_scale=self.max_logit_scale,
                                             impl=self.contrastive_impl)

  @nn.nowrap  # plain arithmetic: callable on an unbound model
  def position_grids(self, batch: Mapping[str, Array]) -> Dict[str, PositionGrid]:
    """The image tower's position table ('img/pos_embedding') for batch['image']."""
    tower = ViT(variant=None, patch_size=self.patch_size, pool_type=self.image_pool)
    return {f"img/{k}": v for k, v in tower.position_grids(batch).items()}

  def embed_image(self, image: Array, *, train: bool = False) -> Array:
    """Images [B, H, W, 3] -> L2-normalised embeddings [B, embed_dim] (float32)."""
    if image.ndim != 4:
      raise ValueError(f"'image' must be [batch, height, width, 3]; got shape {image.shape}.")
    return heads.l2_normalize(self.img_proj(self.img(image, train=train)))

  def embed_text(self, text: Array, mask: Optional[Array] = None, *,
                 train: bool = False) -> Array:
    """Token ids [B, L] (+ bool mask [B, L]) -> L2-normalised embeddings [B, embed_dim]."""
    pooled, _ = self.txt(text, mask, train=train)
    return heads.l2_normalize(self.txt_proj(pooled))

  def class_embeddings(self, prompt_tokens: Array, prompt_mask: Optional[Array] = None) -> Array:
    """Prompts [C, P, L] (P prompts per class, + mask) -> embeddings [C, P, embed_dim]."""
    if prompt_tokens.ndim != 3:
      raise ValueError("Zero-shot prompts must be token ids [classes, prompts, length]; got "
                       f"shape {prompt_tokens.shape}.")
    c, p, length = prompt_tokens.shape
    mask = None if prompt_mask is None else prompt_mask.reshape(c * p, length)
    return self.embed_text(prompt_tokens.reshape(c * p, length), mask).reshape(c, p, -1)

  def zero_shot_logits(self, batch: Mapping[str, Array], class_embeddings: Array) -> Array:
    """Zero-shot class logits [B, C] of batch['image'] against prompt-ensembled classes."""
    return heads.zero_shot_logits(self.embed_image(batch["image"]), class_embeddings)

  def _embeddings(self, batch, train) -> Tuple[Array, Array]:
    for key in ("image", "text"):
      if key not in batch:
        raise ValueError(f"two_tower reads batch keys ['image', 'text']; got {sorted(batch)}.")
    if batch["image"].shape[0] != batch["text"].shape[0]:
      raise ValueError(f"'image' and 'text' batch sizes differ: {batch['image'].shape[0]} vs "
                       f"{batch['text'].shape[0]}.")
    return (self.embed_image(batch["image"], train=train),
            self.embed_text(batch["text"], batch.get("text_mask"), train=train))

  def features(self, batch: Mapping[str, Array], train: bool = False) -> Dict[str, Array]:
    zimg, ztxt = self._embeddings(batch, train)
    return {"image_embedding": zimg, "text_embedding": ztxt}

  def loss_from_features(self, features: Mapping[str, Array],
                         train: bool = False) -> Tuple[Array, Dict]:
    del train
    loss, i2t_correct = self.contrastive(features["image_embedding"], features["text_embedding"])
    scale = jnp.exp(self.contrastive.variables["params"]["logit_scale"])
    if self.max_logit_scale is not None:
      scale = jnp.minimum(scale, self.max_logit_scale)  # in effect
    logged = {"contrastive_loss": loss,
              "i2t_batch_accuracy": jnp.mean(i2t_correct),
              "logit_scale": scale}
    if self.loss_type == "sigmoid":
      logged["logit_bias"] = self.contrastive.variables["params"]["logit_bias"]
    return loss, logged

  def evaluate(self, batch: Mapping[str, Array]) -> Dict[str, Array]:
    zimg, ztxt = self._embeddings(batch, train=False)
    return {"image_embedding": zimg, "text_embedding": ztxt}

  @staticmethod
  def summarize(outputs: Mapping[str, np.ndarray]) -> Dict[str, float]:
    return metrics.retrieval_recall(outputs["image_embedding"], outputs["text_embedding"])
