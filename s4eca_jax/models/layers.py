"""Transformer building blocks shared by the image and text encoders and the decoder.

Parameter names follow Flax conventions (`kernel`, `bias`, `scale`, `embedding`); the
mapping to Hugging Face names lives in hf_weights.py.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu": exact erf form.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; known: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate query/key/value projections (as in HF checkpoints).

  `mask` is boolean, True where attention is allowed, broadcastable to (B, heads, Tq, Tk).
  A key bias adds the same logit to every key of a query, which softmax cancels: its
  gradient is zero up to float noise, which Adam would turn into drift. Pretrained
  encoders keep it (their checkpoints have it); trainable modules set key_bias=False.
  """

  num_heads: int
  out_features: int | None = None
  qkv_features: int | None = None
  key_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, mask=None, is_causal=False):
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    features = self.qkv_features or inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"width {features} is not divisible by num_heads={self.num_heads}.")
    head_dim = features // self.num_heads
    dense = lambda name, n, bias=True: nn.Dense(n, use_bias=bias, dtype=self.dtype, name=name)
    split = lambda x: x.reshape(x.shape[:-1] + (self.num_heads, head_dim))
    query = split(dense("query", features)(inputs_q))  # (B, Tq, heads, head_dim)
    key = split(dense("key", features, self.key_bias)(inputs_kv))  # (B, Tk, heads, head_dim)
    value = split(dense("value", features)(inputs_kv))
    out = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal)
    out = out.reshape(out.shape[:-2] + (features,))
    return dense("out", self.out_features or inputs_q.shape[-1])(out)


def _same_padding(kernel_size: int) -> tuple[int, int]:
  """(before, after) of "SAME" padding at stride 1: an even kernel's extra pad goes after."""
  before = (kernel_size - 1) // 2
  return before, kernel_size - 1 - before


def _shifted_views(x, k: int, before: int, after: int):
  """pad(x)[:, i:i+H, j:j+W] for the k*k taps (i, j) in row-major order; x (B, H, W, C)."""
  padded = jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
  height, width = x.shape[1:3]
  return [padded[:, i:i + height, j:j + width] for i in range(k) for j in range(k)]


def _shifted_sum(x, kernel, before: int, after: int):
  """sum_ij pad(x)[:, i:i+H, j:j+W] * kernel[i, j]: x (B, H, W, C), kernel (k, k, C).

  Products and their sum are in f32 whatever x's dtype (as cuDNN accumulates a bf16
  convolution): a 7x7 kernel adds 49 products, and a bf16 running sum would round each.
  The result is cast back to x's dtype.
  """
  k = kernel.shape[0]
  taps = kernel.astype(jnp.float32).reshape(k * k, -1)
  total = sum(view.astype(jnp.float32) * tap
              for view, tap in zip(_shifted_views(x, k, before, after), taps))
  return total.astype(x.dtype)


@jax.custom_vjp
def depthwise_conv(x, kernel):
  """Depthwise "SAME" convolution, stride 1: x (B, H, W, C), kernel (k, k, C).

  Shifted products summed, forward and backward (the input gradient is the same sum with
  the flipped kernel; the kernel gradient one reduction per tap), accumulated in f32.
  Autodiff of the slices would pad every tap's gradient to full size, which XLA:CPU does
  not fuse.
  """
  return _shifted_sum(x, kernel, *_same_padding(kernel.shape[0]))


def _depthwise_fwd(x, kernel):
  return depthwise_conv(x, kernel), (x, kernel)


def _depthwise_bwd(residuals, grad):
  x, kernel = residuals
  k = kernel.shape[0]
  before, after = _same_padding(k)
  grad_x = _shifted_sum(grad, kernel[::-1, ::-1], after, before).astype(x.dtype)
  grad_f32 = grad.astype(jnp.float32)
  grad_kernel = jnp.stack([jnp.sum(view.astype(jnp.float32) * grad_f32, axis=(0, 1, 2))
                           for view in _shifted_views(x, k, before, after)])
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
  """Depthwise 2-D convolution, stride 1, "SAME" padding (`depthwise_conv`).

  Same parameters (kernel (k, k, 1, C), bias (C,), LeCun-normal init) and outputs as
  `nn.Conv(C, (k, k), padding="SAME", feature_group_count=C)`, which XLA:CPU runs slowly
  (7x7 on (8, 16, 16, 32): 8.5 ms forward against 0.4 ms for the shifted sum).
  """

  kernel_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, C) -> (B, H, W, C)."""
    k, channels = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    out = depthwise_conv(x.astype(self.dtype), kernel[:, :, 0].astype(self.dtype))
    return out + bias.astype(self.dtype)


class Mlp(nn.Module):
  """Two-layer MLP: fc1 -> activation -> fc2."""

  hidden_dim: int
  act: str = "gelu"
  out_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_dim = self.out_dim or x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
    x = activation(self.act)(x)
    return nn.Dense(out_dim, dtype=self.dtype, name="fc2")(x)


class LayerScale(nn.Module):
  """Per-channel scale on a residual branch (DINOv2)."""

  init_value: float = 1.0

  @nn.compact
  def __call__(self, x):
    gamma = self.param("lambda1", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


def padding_mask(attention_mask: jax.Array) -> jax.Array:
  """(B, Tk) 0/1 key mask -> boolean (B, 1, 1, Tk) attention mask."""
  return attention_mask.astype(bool)[:, None, None, :]


# ---------------------------------------------------------------------------
# Position-embedding resampling, numerically identical to torch.nn.functional.interpolate
# (mode="bicubic", align_corners=False), with and without antialias. Hugging Face DINOv2 and
# CLIP use the plain form; DINOv2-with-registers uses antialias=True.
# ---------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  """(out_size, in_size) resampling matrix along one axis, as PyTorch computes it."""
  scale = in_size / out_size
  matrix = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    if not antialias:
      # a = -0.75, 4 taps, borders clamped.
      src = (i + 0.5) * scale - 0.5
      base = int(np.floor(src))
      t = src - base
      for offset in range(-1, 3):
        j = min(max(base + offset, 0), in_size - 1)
        matrix[i, j] += _cubic(np.array(t - offset), -0.75)
    else:
      # PIL-style separable filter: a = -0.5, support widened when downsampling, taps
      # outside the input dropped and the rest renormalised.
      support = 2.0 * max(scale, 1.0)
      inv = 1.0 / max(scale, 1.0)
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      taps = np.arange(lo, hi)
      weights = _cubic((taps - center + 0.5) * inv, -0.5)
      matrix[i, lo:hi] = weights / weights.sum()
  return matrix


def resize_grid(grid: jax.Array, out_hw: tuple[int, int], antialias: bool) -> jax.Array:
  """Bicubically resamples a (1, H, W, D) grid of embeddings to (1, h, w, D), in f32."""
  _, height, width, _ = grid.shape
  if (height, width) == tuple(out_hw):
    return grid
  rows = jnp.asarray(bicubic_matrix(height, out_hw[0], antialias), jnp.float32)
  cols = jnp.asarray(bicubic_matrix(width, out_hw[1], antialias), jnp.float32)
  dtype = grid.dtype
  grid = grid.astype(jnp.float32)
  out = jnp.einsum("ih,bhwd,jw->bijd", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)
  return out.astype(dtype)


def abstract_params(module: nn.Module, *inputs, **kwargs) -> Any:
  """Parameter shapes of `module` for these inputs (jax.ShapeDtypeStruct leaves), from
  jax.eval_shape of its init: nothing is allocated. The one eval_shape helper of the
  project."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs, **kwargs))
  return shapes["params"]
