"""The trainable S4ECA decoder: image feature maps + language -> one mask logit map.

Data flow: patch maps tapped from the image encoder (e.g. after blocks 4, 8 and the final
norm) -> sentence-gated neck (1x1 per tap, concat, 1x1 + 3x3 fuse, 2-D sine positions)
-> transformer layers (pixel self-attention, cross-attention to [word tokens ; proxies])
-> projector (x2 upsampling stages, then a 1x1 kernel generated from the sentence) ->
logits, bilinearly upsampled to the input size.

Two options beyond the paper, off by default (configs/demo.py turns them on; the runs
behind them are in bench/DEMO.md):
- coordinate_freqs: cosine bases of x and y joined to each projector input, so the
  sentence kernel can weigh "left", "top", "middle" directly.
- pixel_dim: the pixel path, for objects only a few patches wide. A conv stem embeds the
  image at the projector's resolution and is scored against a query from the projector
  features; the coarse map's probability gates the score, so it refines the coarse mask
  near the target instead of lighting up every object.
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


def coordinate_channels(height: int, width: int, num_freqs: int) -> np.ndarray:
  """(h, w, 2 * num_freqs) cosine bases of the position, cos(pi k u) for k = 1..num_freqs
  and u in (0, 1) across x (first half) and y: a ramp, a centre bump, thirds... from
  which a 1x1 kernel reads "left", "middle", "top"."""
  k = np.arange(1, num_freqs + 1)
  basis = lambda n: np.cos(np.pi * k * ((np.arange(n) + 0.5) / n)[:, None])  # (n, K)
  x, y = basis(width), basis(height)
  return np.concatenate([np.broadcast_to(x[None], (height, width, num_freqs)),
                         np.broadcast_to(y[:, None], (height, width, num_freqs))],
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
    x = layers.GroupNorm(self.norm_groups, dtype=self.dtype, name="norm")(x)
    return layers.activation("gelu")(x)


class DecoderLayer(nn.Module):
  """Pre-LN: pixel self-attention, cross-attention to the language memory, FFN."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention: str = "xla"  # pixel self-attention only; the short cross-attention uses XLA

  @nn.compact
  def __call__(self, x, memory, memory_mask):
    """x: (B, N, d) pixels; memory: (B, M, d); memory_mask: (B, M) 1 = valid."""
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    attn = lambda name, attention="xla": layers.MultiHeadAttention(
        self.num_heads, key_bias=False, attention=attention, dtype=self.dtype, name=name)
    x = x + attn("self_attn", self.attention)(norm("self_norm")(x))
    x = x + attn("cross_attn")(norm("cross_norm")(x), memory,
                               key_mask=memory_mask)
    return x + layers.Mlp(self.mlp_dim, "gelu", dtype=self.dtype, name="ffn")(norm("ffn_norm")(x))


class Decoder(nn.Module):
  """Feature maps + language -> {"logits": (B, H, W), "low_res_logits": (B, h', w')} in f32."""

  width: int = 256
  num_layers: int = 3
  num_heads: int = 8
  mlp_dim: int = 1024
  sentence_gate: bool = True
  projector_dims: Sequence[int] = (128, 64)  # one x2 upsampling stage each
  coordinate_freqs: int = 0  # coordinate_channels joined to each projector input; 0: none
  pixel_dim: int = 0  # > 0: the pixel path's width (_pixel_logits); 0: none, as in the paper
  norm_groups: int = 32
  attention: str = "xla"  # layers.ATTENTION_IMPLEMENTATIONS, for the pixel self-attention
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feature_maps: Sequence[jax.Array], sentence, words, word_mask, proxies,
               out_size: tuple[int, int], images=None):
    """feature_maps: [(B, h, w, D)]; sentence: (B, S); words: (B, L, C); word_mask: (B, L);
    proxies: (B, Nq, D); out_size: (H, W) of the input images; images: (B, H, W, 3), read
    only by the pixel path."""
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
      x = DecoderLayer(self.num_heads, self.mlp_dim, self.dtype, self.attention,
                       name=f"layer_{i}")(
          x, memory, memory_mask)
    x = nn.LayerNorm(dtype=self.dtype, name="out_norm")(x).reshape(batch, height, width, -1)

    # Projector: upsample, then a per-example 1x1 kernel (and bias) from the sentence. Each
    # stage also sees the pixel coordinates, so the kernel can weigh position directly.
    def with_coordinates(x):
      if not self.coordinate_freqs:
        return x
      coords = coordinate_channels(x.shape[1], x.shape[2], self.coordinate_freqs)
      return jnp.concatenate(
          [x, jnp.broadcast_to(coords.astype(x.dtype), (batch, *coords.shape))], axis=-1)

    for i, dim in enumerate(self.projector_dims):
      x = jax.image.resize(x, (batch, 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), "bilinear")
      x = ConvNormAct(dim, 3, self.norm_groups, self.dtype, name=f"upsample_{i}")(
          with_coordinates(x))
    x = with_coordinates(x)
    kernel = nn.Dense(x.shape[-1] + 1, name="dynamic_kernel")(sentence.astype(jnp.float32))
    low_res = jnp.einsum("bhwc,bc->bhw", x.astype(jnp.float32), kernel[:, :-1])
    low_res = low_res + kernel[:, -1, None, None]  # (B, h', w')
    if self.pixel_dim:  # refines where the coarse map is undecided, not far from it
      low_res = low_res + jax.nn.sigmoid(low_res) * self._pixel_logits(x, images)
    logits = jax.image.resize(low_res, (batch, *out_size), "bilinear")
    return {"logits": logits, "low_res_logits": low_res}

  def _pixel_logits(self, x, images):
    """The pixel path: detail finer than the image encoder's patches. A conv stem embeds the
    image at the projector's resolution; each location's projector features give a query
    that its pixel embedding is scored against (a dot product, as mask embeddings in
    MaskFormer), so "pixels that look like the target here" need no learned upsampling."""
    if images is None:
      raise ValueError("config.model.decoder.pixel_dim > 0 needs the images; pass images=.")
    batch, height, width, _ = x.shape
    pixels = jax.image.resize(images.astype(self.dtype), (batch, height, width, 3), "linear")
    pixels = ConvNormAct(self.pixel_dim, 3, math.gcd(self.norm_groups, self.pixel_dim),
                         self.dtype, name="pixel_stem_0")(pixels)
    pixels = nn.Conv(self.pixel_dim, (3, 3), padding="SAME", dtype=self.dtype,
                     name="pixel_stem_1")(pixels)
    query = nn.Dense(self.pixel_dim, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                     name="pixel_query")(x)  # zero: the path starts as a no-op
    return jnp.einsum("bhwc,bhwc->bhw", pixels.astype(jnp.float32),
                      query.astype(jnp.float32)) / math.sqrt(self.pixel_dim)
