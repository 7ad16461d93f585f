"""Text towers: a Transformer encoder (BERT / CLIP style) and a causal decoder for generation.

TextTransformer: ids [B, L] -> (pooled [B, D], tokens [B, L, D]). Pre-LN, learned position
embeddings, padding masked out of attention (the given mask, else ids != pad_id),
optionally causal (CLIP's text tower).
Pooling: "last" = the last non-padding token (CLIP's EOS token when captions end with it),
"argmax" = the position of the largest id (original CLIP, whose EOS has the largest id),
"mean" over valid tokens, or "first" (a BERT [CLS] token).

TextDecoder: ids [B, L] + encoded [B, N, D] -> next-token logits [B, L, vocab] (float32),
causal self-attention + cross-attention to the encoder, output projection tied to the
token embedding. `decode=True` runs one token at a time against the key/value cache
(see decoding.py); the decoder keeps its own position in the cache as `position`.

Both take their blocks' settings (heads, MLP size, dropout, activation, LayerNorm
epsilon, dtypes, attention backend) as one `mmjax.nn.transformer.BlockConfig`.

Parameter tree (checkpoint format; CLIP's text model maps onto TextTransformer 1:1):
  TextTransformer: embed/{embedding/embedding [V, D], pos_embedding [1, max_len, D]},
                   encoder/encoderblock_{i}/..., encoder/encoder_norm
  TextDecoder:     embedding/embedding [V, D], pos_embedding [1, max_len, D],
                   decoder/decoderblock_{i}/..., decoder/decoder_norm
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.heads import pool as pool_tokens
from mmjax.models.tokenizers import TextTokenizer, check_token_ids
from mmjax.nn.embed import TokenEmbed
from mmjax.nn.transformer import BlockConfig, Decoder, Encoder

Array = jax.Array
TEXT_POOLING = ("last", "argmax", "mean", "first")


class TextTransformer(nn.Module):
  """Text encoder; `causal=True, pool="last"` is CLIP's text tower, `False, "first"` BERT."""
  vocab_size: int
  block: BlockConfig                  # the encoder blocks' settings (heads, mlp_dim, ...)
  width: int = 512
  depth: int = 12
  max_len: int = 77
  causal: bool = True
  pool: str = "last"
  scan_layers: bool = False
  remat_policy: str = "none"
  pad_id: Optional[int] = 0           # see TextTokenizer; None for an imported CLIP

  @nn.compact
  def __call__(self, tokens: Array, mask: Optional[Array] = None, *,
               train: bool = False) -> Tuple[Array, Array]:
    if self.pool not in TEXT_POOLING:
      raise ValueError(f"Unknown text pooling {self.pool!r}; expected one of {TEXT_POOLING}.")
    x, valid = TextTokenizer(self.vocab_size, self.width, self.max_len, type_embedding=False,
                             dtype=self.block.dtype, pad_id=self.pad_id, name="embed")(
                                 tokens, mask)
    mask = valid[:, None, None, :]
    if self.causal:
      length = tokens.shape[1]
      mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    x = Encoder(self.depth, self.block, scan_layers=self.scan_layers,
                remat_policy=self.remat_policy, name="encoder")(
                    x, mask=mask, deterministic=not train)
    if self.pool == "argmax":
      pooled = jnp.take_along_axis(x, jnp.argmax(tokens, axis=1)[:, None, None], axis=1)[:, 0]
    else:
      pooled = pool_tokens(x, valid, self.pool)
    return pooled, x


class TextDecoder(nn.Module):
  """Causal text decoder with cross-attention; logits tied to the token embedding."""
  vocab_size: int
  block: BlockConfig                  # the decoder blocks' settings (heads, mlp_dim, ...)
  width: int = 512
  depth: int = 6
  max_len: int = 64

  @nn.compact
  def __call__(self, tokens: Array, encoded: Array, encoded_mask: Optional[Array] = None, *,
               train: bool = False, decode: bool = False) -> Array:
    check_token_ids(tokens, self.vocab_size, "decoder input")
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"TextDecoder got {length} tokens; at most max_len={self.max_len}.")
    embedding = TokenEmbed(self.vocab_size, self.width, name="embedding")
    posemb = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, "length", "embed")), (1, self.max_len, self.width))
    start = 0
    if decode:  # the position of the next token lives in the cache with the keys/values
      initialized = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      if initialized:
        start = position.value
        position.value = start + length
    posemb = jax.lax.dynamic_slice_in_dim(posemb, start, length, axis=1)
    dtype = self.block.dtype
    x = (embedding(tokens) + posemb).astype(dtype)
    cross_mask = None if encoded_mask is None else encoded_mask[:, None, None, :]
    x = Decoder(self.depth, self.block, name="decoder")(
        x, encoded.astype(dtype), cross_mask=cross_mask, deterministic=not train,
        decode=decode)
    return embedding.attend(x)
