"""Neural-network building blocks: attention, Transformer stacks, embeddings.

  attention.py    dot_product_attention (backends by name), MultiHeadAttention
  transformer.py  Mlp, EncoderBlock, DecoderBlock, Encoder, Decoder (scan + remat)
  embed.py        PatchEmbed, TubeletEmbed, sin-cos / learned position embeddings, resampling
  norms.py        RMSNorm (Gemma / Llama)
  rope.py         rotary position embeddings
  gated_mlp.py    GatedMlp (GeGLU / SwiGLU)
  lm_block.py     LMBlock: one decoder-only language-model block (Gemma / Llama)
"""
from mmjax.nn.attention import MultiHeadAttention, dot_product_attention
from mmjax.nn.embed import (PatchEmbed, TubeletEmbed, learned_posemb, posemb_sincos_1d,
                            PositionGrid, posemb_sincos_2d, resample_posemb)
from mmjax.nn.gated_mlp import GatedMlp
from mmjax.nn.lm_block import LMBlock, LMBlockConfig
from mmjax.nn.norms import RMSNorm
from mmjax.nn.rope import apply_rope
from mmjax.nn.transformer import Decoder, DecoderBlock, Encoder, EncoderBlock, Mlp

__all__ = [
    "Decoder", "DecoderBlock", "Encoder", "EncoderBlock", "GatedMlp", "LMBlock",
    "LMBlockConfig", "Mlp", "MultiHeadAttention", "PatchEmbed", "RMSNorm", "TubeletEmbed",
    "apply_rope", "dot_product_attention", "learned_posemb", "posemb_sincos_1d",
    "posemb_sincos_2d", "PositionGrid", "resample_posemb",
]
