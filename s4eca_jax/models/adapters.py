"""The trainable S4ECA adapters: the textual adapter (word tokens -> language proxies) and
the visual adapter that runs inside the frozen image encoder, guided by those proxies.

Data flow: the text encoder runs first; `TextualAdapter` reads its tapped blocks and
returns the proxies P (B, Nq, D); the image encoder then calls `VisualAdapter` at its
adapter blocks (vit.py hook) with P as context, from block 1 on ("early grounding").

Both adapters sow what a visualisation needs into the "intermediates" collection:
`scale_weights` (B, K, r) and `spatial_maps` (B, h, w, K) per visual adapter.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from s4eca_jax.models import layers

# Keeps cosine maps finite when the proxies are zero (the "no language guidance" ablation).
COSINE_EPS = 1e-6
gelu = layers.activation("gelu")


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / |x| in f32, with an epsilon so that zero vectors map to zero (not NaN)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + COSINE_EPS)


def standardize_over_space(x: jax.Array) -> jax.Array:
  """(B, h, w, C) -> zero mean, unit variance over (h, w) per example and channel, in f32.

  The spatial-selection conv then sees where a statistic is high *relative to the rest of
  the image*, whatever its scale; constant maps (zero proxies) map to zeros.
  """
  x = x.astype(jnp.float32)
  centred = x - x.mean(axis=(1, 2), keepdims=True)
  return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=(1, 2), keepdims=True)
                                 + COSINE_EPS)


class QueryReader(nn.Module):
  """One textual-adapter step: the queries read one block's word tokens.

  Q <- Q + CrossAttn(LN(Q), LN(words), pad mask); Q <- Q + FFN(LN(Q)), both in a bottleneck.
  """

  width: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, words, mask):
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    queries = queries + layers.MultiHeadAttention(
        self.num_heads, qkv_features=self.width, key_bias=False, dtype=self.dtype,
        name="attn")(
            norm("query_norm")(queries), norm("word_norm")(words), key_mask=mask)
    return queries + layers.Mlp(self.width, "gelu", dtype=self.dtype, name="ffn")(
        norm("ffn_norm")(queries))


class TextualAdapter(nn.Module):
  """Nq learnable queries read the word tokens after text blocks `blocks` -> proxies.

  Reads the encoder's taps and leaves the word tokens unchanged. Output: (B, Nq, out_dim).
  """

  blocks: Sequence[int]
  out_dim: int  # the image encoder width D
  num_queries: int = 8
  width: int = 64  # bottleneck of the cross-attention and FFN
  num_heads: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, block_tokens: dict[int, jax.Array], attention_mask: jax.Array):
    """block_tokens: {k: (B, L, C)} (text encoder taps); attention_mask: (B, L)."""
    missing = [k for k in self.blocks if k not in block_tokens]
    if missing:
      raise ValueError(f"TextualAdapter needs the text encoder's taps {missing}; call the "
                       f"encoder with taps={tuple(self.blocks)}.")
    batch, _, text_width = block_tokens[self.blocks[0]].shape
    queries = self.param("queries", nn.initializers.normal(0.02),
                         (self.num_queries, text_width))
    queries = jnp.broadcast_to(queries, (batch,) + queries.shape).astype(self.dtype)
    mask = attention_mask  # (B, L)
    for k in self.blocks:
      queries = QueryReader(self.width, self.num_heads, self.dtype, name=f"read_{k}")(
          queries, block_tokens[k], mask)  # (B, Nq, C)
    queries = nn.LayerNorm(dtype=self.dtype, name="out_norm")(queries)
    return nn.Dense(self.out_dim, dtype=self.dtype, name="proxy_proj")(queries)  # (B, Nq, D)


class DenseMultiScale(nn.Module):
  """K branches on the patch grid; branch k sees the input and all earlier branches
  (dense connectivity), 1x1 conv -> depthwise conv with kernel_sizes[k] -> GELU.

  Branch k's 1x1 conv over [x, b_0, ..., b_(k-1)] (one Dense of (k+1) r inputs, as in
  checkpoints) runs as a sum of per-input matmuls over row blocks of its kernel, in f32:
  no concatenated copy of the inputs. The branches come back as a tuple of K (B, h, w, r)
  maps, not stacked: on TPU a (..., K, r) axis pair pads K = 3 to a tile of 8 or 16.
  """

  kernel_sizes: Sequence[int] = (3, 5, 7)
  dense: bool = True
  dtype: Any = jnp.float32
  depthwise: str = "shifted"  # layers.DEPTHWISE_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x) -> tuple[jax.Array, ...]:
    """x: (B, h, w, r) -> K maps (B, h, w, r)."""
    width = x.shape[-1]
    branches = []
    for i, size in enumerate(self.kernel_sizes):
      inputs = [x] + branches if self.dense else [x]
      kernel, bias = layers.DenseParams(width, name=f"branch_{i}_pointwise")(
          width * len(inputs))
      kernel = kernel.astype(self.dtype)
      y = sum(jnp.dot(part.astype(self.dtype), kernel[j * width:(j + 1) * width],
                      preferred_element_type=jnp.float32)
              for j, part in enumerate(inputs))
      y = (y + bias).astype(self.dtype)
      y = layers.DepthwiseConv(size, self.dtype, self.depthwise,
                               name=f"branch_{i}_depthwise")(y)
      branches.append(gelu(y))
    return tuple(branches)


class VisualAdapter(nn.Module):
  """Language-guided multi-scale adapter, in parallel with an image block's MLP.

  n (B, T, D) -> (B, T, D). Tokens are down-projected to `width` (r); prefix tokens
  (CLS, registers) then skip the grid operations (multi-scale branches, scale and spatial
  selection, cross-attention); all tokens are up-projected by a zero-initialised Dense,
  so a fresh adapter outputs zeros and leaves the encoder unchanged.
  """

  width: int
  kernel_sizes: Sequence[int] = (3, 5, 7)
  dense_connectivity: bool = True
  scale_selection: bool = True  # False: uniform weights 1/K
  spatial_selection: bool = True  # False: maps of ones
  spatial_kernel: int = 7
  # Standardise each input map of the spatial conv over (h, w): cosine maps lie in [-1, 1],
  # the branch statistics have the features' scale. False: the raw maps.
  spatial_standardize: bool = True
  cross_attention: bool = True
  num_heads: int = 4
  dtype: Any = jnp.float32
  depthwise: str = "shifted"  # the branches' depthwise conv: layers.DEPTHWISE_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, n, *, context, num_prefix: int, grid: tuple[int, int]):
    """n: (B, T, D) normed tokens; context: language proxies (B, Nq, D)."""
    batch, _, model_width = n.shape
    num_scales = len(self.kernel_sizes)
    x = gelu(nn.Dense(self.width, dtype=self.dtype, name="down")(n))  # (B, T, r)
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    patches = patches.reshape(batch, *grid, self.width)  # (B, h, w, r)

    proxies = None
    if self.scale_selection or self.spatial_selection or self.cross_attention:
      if context is None:
        raise ValueError("VisualAdapter needs language proxies (adapter_context); switch off "
                         "scale_selection, spatial_selection and cross_attention to run without.")
      proxies = nn.Dense(self.width, dtype=self.dtype, name="proxy_proj")(context)  # (B, Nq, r)

    branches = DenseMultiScale(self.kernel_sizes, self.dense_connectivity, self.dtype,
                               self.depthwise, name="multi_scale")(patches)  # K x (B, h, w, r)
    # Sums over the scales in f32, one map at a time: no (B, h, w, K, r) array.
    fused = sum(b.astype(jnp.float32) for b in branches)  # (B, h, w, r)

    if self.scale_selection:
      pooled = jnp.concatenate([fused.mean(axis=(1, 2)).astype(self.dtype),
                                proxies.mean(axis=1)], axis=-1)
      hidden = gelu(nn.Dense(self.width, dtype=self.dtype, name="scale_fc1")(pooled))
      logits = nn.Dense(num_scales * self.width, dtype=self.dtype, name="scale_fc2")(hidden)
      scale_weights = jax.nn.softmax(
          logits.reshape(batch, num_scales, self.width).astype(jnp.float32), axis=1)
      self.sow("intermediates", "scale_weights", scale_weights)
    else:
      scale_weights = jnp.full((batch, num_scales, self.width), 1.0 / num_scales)

    if self.spatial_selection:
      cosine = jnp.einsum("bhwc,bqc->bhwq", l2_normalize(fused), l2_normalize(proxies))
      stats = [b.astype(jnp.float32).mean(-1) for b in branches] + [
          b.max(-1).astype(jnp.float32) for b in branches]  # 2K maps (B, h, w)
      maps_in = jnp.concatenate([cosine, jnp.stack(stats, axis=-1)], axis=-1)  # (B, h, w, Nq+2K)
      if self.spatial_standardize:
        maps_in = standardize_over_space(maps_in)
      # Zero init: every map starts at 0.5 everywhere and learns where to select.
      spatial_maps = jax.nn.sigmoid(layers.BandedConv(
          num_scales, self.spatial_kernel, kernel_init=nn.initializers.zeros,
          dtype=self.dtype, name="spatial_conv")(
              maps_in.astype(self.dtype)).astype(jnp.float32))  # (B, h, w, K)
      self.sow("intermediates", "spatial_maps", spatial_maps)
    else:
      spatial_maps = jnp.ones(branches[0].shape[:3] + (num_scales,))

    # sum_k alpha_k (per channel) * m_k (per pixel) * b_k, in f32.
    selected = sum(scale_weights[:, None, None, k] * spatial_maps[..., k:k + 1]
                   * b.astype(jnp.float32) for k, b in enumerate(branches))
    selected = selected.astype(self.dtype).reshape(batch, -1, self.width)  # (B, N, r)
    if self.cross_attention:
      selected = selected + layers.MultiHeadAttention(
          self.num_heads, key_bias=False, dtype=self.dtype, name="cross_attn")(
              selected, proxies)

    x = jnp.concatenate([prefix, selected], axis=1)  # (B, T, r)
    return nn.Dense(model_width, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name="up")(x)
