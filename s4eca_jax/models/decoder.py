"""The trainable S4ECA decoder: image feature maps + language -> one mask logit map.

Data flow: patch maps tapped from the image encoder (e.g. after blocks 4, 8 and the final
norm) -> sentence-gated neck (1x1 per tap, concat, 1x1 + 3x3 fuse, 2-D sine positions)
-> transformer layers (pixel self-attention, cross-attention to [word tokens ; proxies])
-> projector (x2 upsampling stages, then a 1x1 kernel generated from the sentence) ->
logits, bilinearly upsampled to the input size.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from s4eca_jax.models import layers


def sine_position_encoding(height: int, width: int, dim: int,
                           temperature: float = 10000.0) -> np.ndarray:
  """DETR-style 2-D sine encoding: (h, w, dim); first half encodes y, second half x."""
  if dim % 4:
    raise ValueError(f"Sine position encoding needs a width divisible by 4, got {dim}.")
  quarter = dim // 4
  freqs = temperature ** (-np.arange(quarter) / quarter)  # (dim/4,)
  ys = (np.arange(height) + 0.5) / height * 2 * math.pi
  xs = (np.arange(width) + 0.5) / width * 2 * math.pi
  enc = lambda pos: np.concatenate([np.sin(pos[:, None] * freqs), np.cos(pos[:, None] * freqs)], -1)
  y, x = enc(ys), enc(xs)  # (h, dim/2), (w, dim/2)
  return np.concatenate([np.broadcast_to(y[:, None], (height, width, dim // 2)),
                         np.broadcast_to(x[None], (height, width, dim // 2))],
                        -1).astype(np.float32)


class ConvNormAct(nn.Module):
  """conv -> GroupNorm -> GELU."""

  features: int
  kernel_size: int
  norm_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.features % self.norm_groups:
      raise ValueError(f"{self.features} channels are not divisible by norm_groups="
                       f"{self.norm_groups}; change config.model.decoder.norm_groups.")
    x = nn.Conv(self.features, (self.kernel_size,) * 2, padding="SAME", use_bias=False,
                dtype=self.dtype, name="conv")(x)
    x = nn.GroupNorm(self.norm_groups, dtype=self.dtype, name="norm")(x)
    return layers.activation("gelu")(x)


class DecoderLayer(nn.Module):
  """Pre-LN: pixel self-attention, cross-attention to the language memory, FFN."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, memory, memory_mask):
    """x: (B, N, d) pixels; memory: (B, M, d); memory_mask: (B, M) 1 = valid."""
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    attn = lambda name: layers.MultiHeadAttention(self.num_heads, key_bias=False,
                                                  dtype=self.dtype, name=name)
    x = x + attn("self_attn")(norm("self_norm")(x))
    x = x + attn("cross_attn")(norm("cross_norm")(x), memory,
                               mask=layers.padding_mask(memory_mask))
    return x + layers.Mlp(self.mlp_dim, "gelu", dtype=self.dtype, name="ffn")(norm("ffn_norm")(x))


class Decoder(nn.Module):
  """Feature maps + language -> {"logits": (B, H, W), "low_res_logits": (B, h', w')} in f32."""

  width: int = 256
  num_layers: int = 3
  num_heads: int = 8
  mlp_dim: int = 1024
  sentence_gate: bool = True
  projector_dims: Sequence[int] = (128, 64)  # one x2 upsampling stage each
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feature_maps: Sequence[jax.Array], sentence, words, word_mask, proxies,
               out_size: tuple[int, int]):
    """feature_maps: [(B, h, w, D)]; sentence: (B, S); words: (B, L, C); word_mask: (B, L);
    proxies: (B, Nq, D); out_size: (H, W) of the input images."""
    batch, height, width, _ = feature_maps[0].shape
    sentence = nn.LayerNorm(dtype=self.dtype, name="sentence_norm")(sentence)

    # Neck: each tap -> width, gated per channel by the sentence, then fused.
    neck = []
    for i, fmap in enumerate(feature_maps):
      fmap = nn.Dense(self.width, dtype=self.dtype, name=f"tap_{i}_proj")(fmap)
      if self.sentence_gate:
        gate = jax.nn.sigmoid(nn.Dense(self.width, dtype=self.dtype, name=f"tap_{i}_gate")(sentence))
        fmap = fmap * gate[:, None, None]
      neck.append(fmap)
    x = ConvNormAct(self.width, 1, self.norm_groups, self.dtype, name="fuse_1x1")(
        jnp.concatenate(neck, axis=-1))
    x = ConvNormAct(self.width, 3, self.norm_groups, self.dtype, name="fuse_3x3")(x)
    x = x + sine_position_encoding(height, width, self.width).astype(x.dtype)

    # Transformer layers over the pixels, reading [word tokens ; proxies].
    memory = jnp.concatenate([
        nn.Dense(self.width, dtype=self.dtype, name="word_proj")(words),
        nn.Dense(self.width, dtype=self.dtype, name="proxy_proj")(proxies)], axis=1)
    memory_mask = jnp.concatenate(
        [word_mask.astype(bool), jnp.ones(proxies.shape[:2], bool)], axis=1)  # (B, L + Nq)
    x = x.reshape(batch, height * width, self.width)  # (B, N, d)
    for i in range(self.num_layers):
      x = DecoderLayer(self.num_heads, self.mlp_dim, self.dtype, name=f"layer_{i}")(
          x, memory, memory_mask)
    x = nn.LayerNorm(dtype=self.dtype, name="out_norm")(x).reshape(batch, height, width, -1)

    # Projector: upsample, then a per-example 1x1 kernel (and bias) from the sentence.
    for i, dim in enumerate(self.projector_dims):
      x = jax.image.resize(x, (batch, 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), "bilinear")
      x = ConvNormAct(dim, 3, self.norm_groups, self.dtype, name=f"upsample_{i}")(x)
    kernel = nn.Dense(x.shape[-1] + 1, name="dynamic_kernel")(sentence.astype(jnp.float32))
    low_res = jnp.einsum("bhwc,bc->bhw", x.astype(jnp.float32), kernel[:, :-1])
    low_res = low_res + kernel[:, -1, None, None]  # (B, h', w')
    logits = jax.image.resize(low_res, (batch, *out_size), "bilinear")
    return {"logits": logits, "low_res_logits": low_res}
