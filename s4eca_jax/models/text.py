"""Frozen text encoders: the CLIP text tower and the BERT family (e.g. MiniLM).

Both take `input_ids` and `attention_mask` (B, L) int arrays from s4eca_jax.text_tokenizer and
return
    {"tokens": (B, L, C) final word tokens, "sentence": (B, C') sentence vector,
     "taps": {k: (B, L, C) tokens after block k (1-based)}, "adapter_state": ...}.
CLIP: causal + padding mask, final LayerNorm, sentence = text_projection(EOT token).
BERT: post-LN blocks, token types, sentence = mean over valid tokens ("mean"), the [CLS]
token ("cls") or the tanh pooler ("pooler").

Adapter hook: after each block k in `adapter_blocks` the encoder calls
    tokens, adapter_state = adapter(name=f"adapter_{k}")(tokens, attention_mask, adapter_state)
with adapter_state None at the first such block; the last state is returned. The adapter
after block k has its parameters at `adapter_{k}/...`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from s4eca_jax.models import layers


def masked_mean(tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean over valid tokens: (B, L, C), (B, L) -> (B, C)."""
  weights = attention_mask.astype(tokens.dtype)[..., None]
  return (tokens * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


class _AdapterHook(nn.Module):
  """Shared adapter-hook plumbing for the text encoders."""

  def run_blocks(self, x, attention_mask, make_block, taps):
    tapped, state = {}, None
    for k in range(1, self.depth + 1):
      x = make_block(k)(x)
      if self.adapter is not None and k in self.adapter_blocks:
        x, state = self.adapter(name=f"adapter_{k}")(x, attention_mask, state)
      if k in taps:
        tapped[k] = x
    return x, tapped, state


class TextBlock(nn.Module):
  """Transformer block: pre-LN (CLIP) or post-LN (BERT), with a key-padding/causal mask."""

  num_heads: int
  mlp_dim: int
  act: str
  layer_norm_eps: float
  pre_norm: bool
  is_causal: bool = False
  attention: str = "xla"
  fused_qkv: bool = False
  f32_residual: bool = True  # post-LN: the norms write the stream, in f32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask):
    norm_dtype = jnp.float32 if self.f32_residual and not self.pre_norm else self.dtype
    norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=norm_dtype, name=name)
    attn = lambda h: layers.MultiHeadAttention(
        self.num_heads, attention=self.attention, fused_qkv=self.fused_qkv, dtype=self.dtype,
        name="attn")(h, key_mask=key_mask, is_causal=self.is_causal)
    mlp = layers.Mlp(self.mlp_dim, self.act, dtype=self.dtype, name="mlp")
    if self.pre_norm:
      x = x + attn(norm("norm1")(x))
      return x + mlp(norm("norm2")(x))
    x = norm("norm1")(x + attn(x))
    return norm("norm2")(x + mlp(x))


class ClipTextEncoder(_AdapterHook):
  """CLIP text transformer (pre-LN, causal) with optional text_projection."""

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_positions: int = 77
  projection_dim: int | None = 512  # None: no text_projection (CLIPTextModel)
  eos_token_id: int = 2
  layer_norm_eps: float = 1e-5
  act: str = "quick_gelu"
  adapter: Callable[..., nn.Module] | None = None
  adapter_blocks: Sequence[int] = ()
  remat: bool | str = False  # layers.REMAT_POLICIES
  attention: str = "xla"  # layers.ATTENTION_IMPLEMENTATIONS
  fused_qkv: bool = False
  f32_residual: bool = True  # the residual stream in f32, the blocks in dtype (vit.py)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, *, taps: Sequence[int] = ()):
    length = input_ids.shape[1]
    x = nn.Embed(self.vocab_size, self.width, name="token_embedding")(input_ids)
    pos = self.param("pos_embedding", nn.initializers.normal(0.01),
                     (self.max_positions, self.width))
    x = (x + pos[None, :length]).astype(jnp.float32 if self.f32_residual else self.dtype)

    block_cls = layers.remat_block(TextBlock, self.remat)
    make_block = lambda k: (lambda h: block_cls(
        self.num_heads, self.mlp_dim, self.act, self.layer_norm_eps, pre_norm=True,
        is_causal=True, attention=self.attention, fused_qkv=self.fused_qkv,
        f32_residual=self.f32_residual, dtype=self.dtype, name=f"block_{k}")(h, attention_mask))
    x, tapped, state = self.run_blocks(x, attention_mask, make_block, taps)
    tokens = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="final_norm")(x)

    if self.eos_token_id == 2:
      # Legacy HF CLIP configs: EOT is the largest id in the vocabulary.
      eot = jnp.argmax(input_ids, axis=-1)
    else:
      eot = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    sentence = jnp.take_along_axis(tokens, eot[:, None, None], axis=1)[:, 0]  # (B, C)
    if self.projection_dim is not None:
      sentence = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                          name="text_projection")(sentence)
    return {"tokens": tokens, "sentence": sentence, "taps": tapped, "adapter_state": state}


POOLINGS = ("mean", "cls", "pooler")


class BertEncoder(_AdapterHook):
  """BERT encoder (post-LN, absolute positions, token types)."""

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  act: str = "gelu"
  pooling: str = "mean"
  use_pooler: bool = True  # the checkpoint has pooler.dense
  adapter: Callable[..., nn.Module] | None = None
  adapter_blocks: Sequence[int] = ()
  remat: bool | str = False  # layers.REMAT_POLICIES
  attention: str = "xla"  # layers.ATTENTION_IMPLEMENTATIONS
  fused_qkv: bool = False
  f32_residual: bool = True  # the residual stream in f32, the blocks in dtype (vit.py)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               taps: Sequence[int] = ()):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r}; expected one of {POOLINGS}.")
    if self.pooling == "pooler" and not self.use_pooler:
      raise ValueError("pooling='pooler' needs use_pooler=True (a checkpoint with pooler.dense).")
    length = input_ids.shape[1]
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (nn.Embed(self.vocab_size, self.width, name="word_embedding")(input_ids)
         + nn.Embed(self.max_positions, self.width, name="pos_embedding")(jnp.arange(length))[None]
         + nn.Embed(self.type_vocab_size, self.width, name="type_embedding")(token_type_ids))
    stream_dtype = jnp.float32 if self.f32_residual else self.dtype
    x = nn.LayerNorm(self.layer_norm_eps, dtype=stream_dtype, name="embed_norm")(
        x.astype(stream_dtype))

    block_cls = layers.remat_block(TextBlock, self.remat)
    make_block = lambda k: (lambda h: block_cls(
        self.num_heads, self.mlp_dim, self.act, self.layer_norm_eps, pre_norm=False,
        attention=self.attention, fused_qkv=self.fused_qkv, f32_residual=self.f32_residual,
        dtype=self.dtype, name=f"block_{k}")(h, attention_mask))
    tokens, tapped, state = self.run_blocks(x, attention_mask, make_block, taps)

    out = {"tokens": tokens, "taps": tapped, "adapter_state": state}
    if self.use_pooler:
      out["pooler_output"] = jnp.tanh(
          nn.Dense(self.width, dtype=self.dtype, name="pooler")(tokens[:, 0]))
    out["sentence"] = {"mean": lambda: masked_mean(tokens, attention_mask),
                       "cls": lambda: tokens[:, 0],
                       "pooler": lambda: out["pooler_output"]}[self.pooling]()
    return out
