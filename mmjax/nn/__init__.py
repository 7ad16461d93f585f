"""Neural-network building blocks: attention, Transformer stacks, embeddings.

  attention.py    dot_product_attention (backends by name), MultiHeadAttention
  transformer.py  Mlp, EncoderBlock, DecoderBlock, Encoder, Decoder (scan + remat)
  embed.py        PatchEmbed, TubeletEmbed, sin-cos / learned position embeddings, resampling
"""
from mmjax.nn.attention import MultiHeadAttention, dot_product_attention
from mmjax.nn.embed import (PatchEmbed, TubeletEmbed, learned_posemb, posemb_sincos_1d,
                            posemb_sincos_2d, resample_posemb)
from mmjax.nn.transformer import Decoder, DecoderBlock, Encoder, EncoderBlock, Mlp

__all__ = [
    "Decoder", "DecoderBlock", "Encoder", "EncoderBlock", "Mlp", "MultiHeadAttention",
    "PatchEmbed", "TubeletEmbed", "dot_product_attention", "learned_posemb",
    "posemb_sincos_1d", "posemb_sincos_2d", "resample_posemb",
]
