"""Transformer building blocks shared by the image and text encoders and the decoder.

Parameter names follow Flax conventions (`kernel`, `bias`, `scale`, `embedding`); the
mapping to Hugging Face names lives in hf_weights.py.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  """Exact GELU as PyTorch writes it (nn.GELU(), HF "gelu"): x * (1 + erf(x / sqrt(2))) / 2.

  jax.nn.gelu(approximate=False) computes the same function through erfc, whose
  derivative keeps a sign bit per element for the backward: on TPU, packing and reading
  those bits made one frozen MLP of the rrsisd image encoder (8 images per chip, forward
  and input gradient) 1.92 ms by the compiler's cycle estimates, 1.07 ms in this form.
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,  # HF "gelu": exact erf form.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; known: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas")
CUDNN_LENGTH_MULTIPLE = 64  # jax's cuDNN flash attention refuses e.g. 1,029 tokens
PALLAS_BLOCK = 128  # the smallest block of jax's TPU flash kernel: sequences are padded to it
PALLAS_MAX_MAJOR_BLOCK = 2048  # longest block of queries (keys) one kernel step holds
PALLAS_MAX_MINOR_BLOCK = 512  # longest inner block (the scores tile is major x minor f32)


def _largest_block(length: int, limit: int) -> int:
  """The largest multiple of PALLAS_BLOCK that divides `length` and is at most `limit`."""
  return max(b for b in range(PALLAS_BLOCK, min(length, limit) + 1, PALLAS_BLOCK)
             if length % b == 0)


def pallas_block_sizes(q_len: int, k_len: int) -> tuple[int, int, int, int]:
  """(q major, k major, q minor, k minor) blocks of jax's TPU flash kernels (padded lengths).

  The forward and dQ kernels read K and V once per major block of queries, the dK/dV
  kernel reads q and dO once per major block of keys: the kernel's default (128) re-reads
  them 9 times at DINOv2's 1,029 (1,152) tokens. Major blocks as long as the sequence (up
  to PALLAS_MAX_MAJOR_BLOCK) read each once; the inner blocks bound the scores tile. (The
  dQ kernel keeps key blocks of PALLAS_BLOCK, see _jax_flash.)
  """
  q_major = _largest_block(q_len, PALLAS_MAX_MAJOR_BLOCK)
  k_major = _largest_block(k_len, PALLAS_MAX_MAJOR_BLOCK)
  return (q_major, k_major, _largest_block(q_major, PALLAS_MAX_MINOR_BLOCK),
          _largest_block(k_major, PALLAS_MAX_MINOR_BLOCK))


GPU_BACKENDS = ("gpu", "cuda", "rocm")  # jax backend names of a GPU


def resolve_attention(name: str, backend: str, dtype) -> str:
  """config.model.attention -> an implementation: "auto" picks the backend's fused kernel.

  cuDNN's flash attention runs only in 16-bit, so "auto" keeps XLA for f32 on GPU.
  """
  if name == "auto":
    if backend == "tpu":
      return "pallas"
    if backend in GPU_BACKENDS and jnp.dtype(dtype).itemsize == 2:
      return "cudnn"
    return "xla"
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention={name!r}; use 'auto' or one of "
                     f"{ATTENTION_IMPLEMENTATIONS}.")
  return name


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pallas_attention(query, key, value, key_mask, is_causal):
  """TPU flash attention on (B, T, heads, head_dim) at their own lengths.

  Up to flash.PALLAS_MAX_LENGTH keys: the project's kernels (flash.py) on the projections'
  own token-major layout, (B, T, heads * head_dim): any length, lane-dense row statistics,
  one backward kernel. Longer sequences: jax's Pallas kernel, heads-first, on sequences
  padded to its block, whose segment ids carry the masks: a query attends keys of its own
  segment, so valid queries (segment 1) see valid keys and padding queries (segment 0)
  see padding keys only.
  """
  from s4eca_jax.models import flash  # pylint: disable=g-import-not-at-top  # pallas is imported only where it runs

  batch, q_len, heads = query.shape[:3]
  k_len = key.shape[1]
  key_valid = _key_valid(key_mask, batch, k_len)
  if flash.supports(k_len):
    flat = lambda x: x.reshape(x.shape[:2] + (-1,))  # (B, T, heads * head_dim): no copy
    kernels = functools.partial(flash.flash_attention, num_heads=heads, causal=is_causal)
    return _per_device(kernels, flat(query), flat(key), flat(value),
                       key_valid).reshape(query.shape)
  q_padded, k_padded = _round_up(q_len, PALLAS_BLOCK), _round_up(k_len, PALLAS_BLOCK)
  heads_first = lambda x, n: jnp.swapaxes(pad_tokens(x, n), 1, 2)  # (B, heads, T, head_dim)
  segments = lambda valid, n: pad_tokens(valid, n).astype(jnp.int32)
  query_valid = jnp.ones((batch, q_len), bool)
  out = _per_device(functools.partial(_jax_flash, is_causal=is_causal),
                    heads_first(query, q_padded), heads_first(key, k_padded),
                    heads_first(value, k_padded),
                    segments(query_valid, q_padded), segments(key_valid, k_padded))
  return jnp.swapaxes(out, 1, 2)[:, :q_len]


def _jax_flash(q, k, v, q_segments, kv_segments, *, is_causal):
  """jax's Pallas TPU flash attention, lengths padded to PALLAS_BLOCK."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # pylint: disable=g-import-not-at-top  # pallas is imported only where it runs

  q_major, k_major, q_minor, k_minor = pallas_block_sizes(q.shape[2], k.shape[2])
  blocks = tpu_flash.BlockSizes(
      block_q=q_major, block_k_major=k_major, block_k=k_minor, block_b=1,
      block_q_major_dkv=q_major, block_k_major_dkv=k_major, block_k_dkv=k_minor,
      # The dQ kernel broadcasts a (B, heads, T) f32 row statistic to its major key block
      # in HBM (B x heads x T x block f32: 510 MB per image block at batch 8 with 1,152):
      # its key blocks stay at the minimum, its query block spans the sequence.
      block_q_dkv=q_minor, block_k_major_dq=PALLAS_BLOCK, block_k_dq=PALLAS_BLOCK,
      block_q_dq=q_major)
  return tpu_flash.flash_attention(
      q, k, v, segment_ids=tpu_flash.SegmentIds(q=q_segments, kv=kv_segments),
      causal=is_causal, sm_scale=1.0 / np.sqrt(q.shape[-1]), block_sizes=blocks)


def _per_device(kernel, *args, replicated: int = 0):
  """kernel(*args), one call per device on its batch shard when the step traces under a
  mesh (jax.sharding.use_abstract_mesh): XLA does not partition Mosaic kernels. The last
  `replicated` args (weights) go whole to every device; their gradients are summed over
  the devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(*args)
  if args[0].shape[0] % mesh.size:
    raise ValueError(f"pallas kernel: batch {args[0].shape[0]} is not divisible by the "
                     f"{mesh.size} devices of the mesh {dict(mesh.shape)}.")
  spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
  specs = (spec,) * (len(args) - replicated) + (jax.sharding.PartitionSpec(),) * replicated
  return jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=spec,
                       check_vma=False)(*args)


def _xla_attention(query, key, value, key_mask, is_causal):
  """Attention as plain XLA ops: heads-first batched matmuls, an f32 softmax whose
  normaliser divides the (T, head_dim) output instead of the (T, T) probabilities.

  Same math as jax.nn.dot_product_attention(implementation="xla"), whose (B, T, heads)
  layout and (T, T) division make XLA:CPU 2.5x slower forward and 2.7x slower forward +
  backward at the demo's attention (8 x 256 tokens, 4 heads of 32; bench/DEMO.md).
  """
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # (B, heads, T, head_dim)
  q, k, v = heads_first(query), heads_first(key), heads_first(value)
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores * np.float32(1.0 / np.sqrt(query.shape[-1]))
  valid = None if key_mask is None else key_mask[:, None, None, :]
  if is_causal:
    causal = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
    valid = causal if valid is None else valid & causal
  if valid is not None:
    scores = jnp.where(valid, scores, np.finfo(np.float32).min)
  # Softmax is invariant to the shift, so its gradient is zero: stop_gradient saves work.
  probs = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
  total = jnp.sum(probs, axis=-1, keepdims=True)  # (B, heads, Tq, 1), >= 1
  out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(value.dtype), v,
                   preferred_element_type=jnp.float32) / total
  return heads_first(out).astype(query.dtype)


def dot_product_attention(query, key, value, *, key_mask=None, is_causal: bool = False,
                          implementation: str = "xla"):
  """softmax(q k^T / sqrt(d)) v with one of ATTENTION_IMPLEMENTATIONS.

  query (B, Tq, heads, head_dim), key/value (B, Tk, heads, head_dim); key_mask (B, Tk),
  nonzero where a key may be attended (the tokenizer's attention mask; valid keys first
  for cuDNN, which takes lengths). A row with no valid key (a padded evaluation example)
  attends to all keys instead: finite outputs that the caller discards, never NaN.
  cuDNN runs on sequences padded to a multiple of 64: padding keys are masked and padding
  query rows dropped. Pallas: _pallas_attention.
  """
  batch, q_len, k_len = query.shape[0], query.shape[1], key.shape[1]
  if implementation == "xla":
    return _xla_attention(query, key, value, _attendable(key_mask), is_causal)
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}; use one of "
                     f"{ATTENTION_IMPLEMENTATIONS}.")
  if implementation == "pallas":
    return _pallas_attention(query, key, value, key_mask, is_causal)
  q_padded = _round_up(q_len, CUDNN_LENGTH_MULTIPLE)
  k_padded = _round_up(k_len, CUDNN_LENGTH_MULTIPLE)
  query, key, value = (pad_tokens(x, n) for x, n in ((query, q_padded), (key, k_padded),
                                                     (value, k_padded)))
  lengths = jnp.sum(_key_valid(key_mask, batch, k_len), axis=-1, dtype=jnp.int32)  # (B,) valid keys come first
  out = jax.nn.dot_product_attention(
      query, key, value, is_causal=is_causal, implementation="cudnn",
      query_seq_lengths=jnp.full((batch,), q_len, jnp.int32), key_value_seq_lengths=lengths)
  return out[:, :q_len]


def _attendable(key_mask):
  """(B, Tk) bool: the keys a query may attend; a row with no valid key attends all."""
  if key_mask is None:
    return None
  key_mask = key_mask.astype(bool)
  return key_mask | ~jnp.any(key_mask, axis=-1, keepdims=True)


def _key_valid(key_mask, batch: int, k_len: int):
  """(B, Tk) bool: _attendable(key_mask), every key where there is no mask."""
  return jnp.ones((batch, k_len), bool) if key_mask is None else _attendable(key_mask)


def pad_tokens(x, length: int):
  """Zero-pads the token axis of x (B, T, ...) to `length`."""
  return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


class PatchEmbed(nn.Module):
  """nn.Conv with a (p, p) kernel at stride p and no padding, as one matmul over each
  patch's p * p * C values: nn.Conv's parameters (kernel (p, p, C, D), bias (D,)), init
  and sums. On TPU the strided convolution first copies the (B, H, W, 3) image into a
  batch-minor layout: for the rrsisd image encoder on v5e (8 images per chip) the
  compiler's cycle estimates give that copy and the convolution 2.3 ms, the matmul 0.2 ms.
  """

  features: int
  patch_size: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    """images (B, H, W, C), H and W multiples of patch_size -> (B, H / p, W / p, D)."""
    batch, height, width, channels = images.shape
    p = self.patch_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, channels, self.features))
    patches = images.astype(self.dtype).reshape(batch, height // p, p, width // p, p, channels)
    out = jnp.einsum("bipjqc,pqcd->bijd", patches, kernel.astype(self.dtype))
    if self.use_bias:
      out = out + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return out


def _norm_statistics(x, epsilon: float):
  """(x - mean, 1 / sqrt(var + epsilon)) over the last axis in f32, as nn.LayerNorm computes
  them (fast variance E[x^2] - E[x]^2, clipped at zero)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(jax.lax.square(x), axis=-1, keepdims=True) - jax.lax.square(mean),
                    0.0)
  return x - mean, jax.lax.rsqrt(var + epsilon)


def _layer_norm_output(centred, inv, scale, bias, dtype):
  """nn.LayerNorm's output from _norm_statistics, in its order of operations."""
  return (centred * (inv * scale) + bias).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _compact_layer_norm(x, scale, bias, epsilon: float, dtype):
  # Without a gradient (evaluation) nothing is kept: no barrier, XLA fuses as it likes.
  return _layer_norm_output(*_norm_statistics(x, epsilon), scale, bias, dtype)


def _compact_layer_norm_fwd(x, scale, bias, epsilon, dtype):
  centred, inv = _norm_statistics(x, epsilon)
  out = _layer_norm_output(centred, inv, scale, bias, dtype)
  # The backward's only (B, T, D) residual: the normalised input in the compute dtype. The
  # barrier keeps XLA from fusing its computation into the backward's ops, which would
  # keep the f32 input alive until then instead.
  normed, inv = jax.lax.optimization_barrier(((centred * inv).astype(dtype), inv))
  return out, (normed, inv, scale, jnp.zeros((), x.dtype), jnp.zeros((), bias.dtype))


def _compact_layer_norm_bwd(epsilon, dtype, residuals, grad):
  del epsilon, dtype
  normed, inv, scale, x_like, bias_like = residuals
  normed = normed.astype(jnp.float32)
  grad = grad.astype(jnp.float32)
  reduce = tuple(range(grad.ndim - 1))
  d_normed = grad * scale.astype(jnp.float32)
  d_x = inv * (d_normed - jnp.mean(d_normed, axis=-1, keepdims=True)
               - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
  return (d_x.astype(x_like.dtype), jnp.sum(grad * normed, axis=reduce).astype(scale.dtype),
          jnp.sum(grad, axis=reduce).astype(bias_like.dtype))


_compact_layer_norm.defvjp(_compact_layer_norm_fwd, _compact_layer_norm_bwd)


class LayerNorm(nn.Module):
  """nn.LayerNorm over the last axis (same parameters, init, statistics and output, to the
  bit), whose backward keeps the normalised input in `dtype` instead of the f32 input.

  Autodiff of a norm over the f32 residual stream saves that stream, 4 bytes per value,
  once for every norm; this norm's backward reads the normalised input rounded to the
  compute dtype (2 bytes in bf16) and the per-token 1 / std in f32. The forward is
  unchanged; the input gradient carries the rounding of the saved values (relative 2^-9 in
  bf16), as a backward through bf16 activations does.
  """

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    return _compact_layer_norm(x, scale, bias, self.epsilon, self.dtype)


class GroupNorm(nn.Module):
  """GroupNorm with nn.GroupNorm's parameters, init, epsilon and (fast) variance.

  The statistics are per-channel sums over space mapped to groups by a small matmul:
  nn.GroupNorm reduces over (space, channels of a group) at once, which XLA:CPU runs 5x
  slower forward and 2.3x slower forward + backward at the demo's pixel path (8 x 64 x 64
  x 32, 8 groups).
  """

  num_groups: int
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"{channels} channels are not divisible by {self.num_groups} groups.")
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    x = x.astype(jnp.float32)
    space = tuple(range(1, x.ndim - 1))
    member = np.repeat(np.eye(self.num_groups, dtype=np.float32),
                       channels // self.num_groups, axis=1)  # (groups, C)
    count = np.prod(x.shape[1:-1]) * (channels // self.num_groups)
    mean = jnp.sum(x, axis=space) @ member.T / count  # (B, groups)
    mean_square = jnp.sum(jnp.square(x), axis=space) @ member.T / count
    inv_std = jax.lax.rsqrt(jnp.maximum(mean_square - jnp.square(mean), 0.0) + self.epsilon)
    per_channel = lambda t: (t @ member).reshape(
        (x.shape[0],) + (1,) * len(space) + (channels,))
    y = (x - per_channel(mean)) * (per_channel(inv_std) * scale) + bias
    return y.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate query/key/value projections (as in HF checkpoints).

  `key_mask` (B, Tk) is nonzero where a key may be attended; `attention` names the
  implementation (see dot_product_attention). A key bias adds the same logit to every key
  of a query, which softmax cancels: its gradient is zero up to float noise, which Adam
  would turn into drift. Pretrained encoders keep it (their checkpoints have it);
  trainable modules set key_bias=False. fused_qkv: self-attention projects q, k and v in
  one matmul over the concatenated kernels (same parameters).
  """

  num_heads: int
  out_features: int | None = None
  qkv_features: int | None = None
  key_bias: bool = True
  attention: str = "xla"
  fused_qkv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, key_mask=None, is_causal=False):
    self_attention = inputs_kv is None
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    features = self.qkv_features or inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"width {features} is not divisible by num_heads={self.num_heads}.")
    head_dim = features // self.num_heads
    dense = lambda name, n, bias=True: nn.Dense(n, use_bias=bias, dtype=self.dtype, name=name)
    split = lambda x: x.reshape(x.shape[:-1] + (self.num_heads, head_dim))
    if self.fused_qkv and self_attention:
      query, key, value = map(split, _fused_projection(self, inputs_q, features))
    else:
      query = split(dense("query", features)(inputs_q))  # (B, Tq, heads, head_dim)
      key = split(dense("key", features, self.key_bias)(inputs_kv))  # (B, Tk, heads, head_dim)
      value = split(dense("value", features)(inputs_kv))
    out = dot_product_attention(query, key, value, key_mask=key_mask, is_causal=is_causal,
                                implementation=self.attention)
    out = out.reshape(out.shape[:-2] + (features,))
    return dense("out", self.out_features or inputs_q.shape[-1])(out)


class DenseParams(nn.Module):
  """The kernel and bias of an nn.Dense (same names and init), returned, not applied."""

  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else (
        jnp.zeros((self.features,)))
    return kernel, bias


def _fused_projection(module: MultiHeadAttention, x, features: int):
  """q, k, v of x from one matmul over the query, key and value kernels concatenated (the
  params stay separate, as in checkpoints)."""
  parts = [DenseParams(features, name != "key" or module.key_bias, name=name)(x.shape[-1])
           for name in ("query", "key", "value")]
  kernel = jnp.concatenate([k for k, _ in parts], axis=1)  # (in_features, 3 * features)
  bias = jnp.concatenate([b for _, b in parts])
  qkv = jnp.dot(x.astype(module.dtype), kernel.astype(module.dtype)) + bias.astype(
      module.dtype)  # (B, T, 3 * features)
  return jnp.split(qkv, 3, axis=-1)


class BandedConv(nn.Module):
  """nn.Conv(features, (k, k), padding="SAME") at stride 1, for few channels on small
  maps, as one matmul: nn.Conv's parameters (kernel (k, k, C, F), bias (F,)), init and
  sums. Output row i reads input rows i - before ... i + after, each flattened to W * C
  values, against the kernel written out as a banded (Toeplitz) matrix along the width,
  (k * W * C, W * F); the band's zeros are the "SAME" padding at the sides.

  A TPU convolution puts channels on the 128 lanes: the visual adapter's 7x7 spatial conv
  (14 -> 3 channels on a 32x32 grid) fills 14 of them. The matmul's contraction is
  7 * 32 * 14. The band costs W times the conv's FLOPs, which for such maps is still
  little (0.15 GFLOP for 8 maps of 32x32).
  """

  features: int
  kernel_size: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x (B, H, W, C) -> (B, H, W, features)."""
    batch, height, width, channels = x.shape
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, channels, self.features))
    before, after = _same_padding(k)
    # band[dx, v, w] = 1 where input column v = output column w + dx - before
    band = np.stack([np.eye(width, k=before - dx, dtype=np.float32) for dx in range(k)])
    matrix = jnp.einsum("xvw,yxco->yvcwo", band, kernel).astype(self.dtype).reshape(
        k, width * channels, width * self.features)  # (k, W * C, W * F)
    rows = jnp.pad(x.astype(self.dtype), ((0, 0), (before, after), (0, 0), (0, 0))).reshape(
        batch, height + k - 1, width * channels)
    out = sum(jnp.dot(rows[:, dy:dy + height], matrix[dy], preferred_element_type=jnp.float32)
              for dy in range(k)).astype(self.dtype).reshape(batch, height, width, self.features)
    if self.use_bias:
      out = out + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return out


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


def resolve_depthwise(name: str, backend: str) -> str:
  """config.model.visual_adapter.depthwise -> "shifted" (sums of shifted products, the
  custom VJP below), "grouped" (XLA's convolution with one group per channel) or "pallas"
  (the Pallas TPU kernel of depthwise.py, on the vector unit).

  "auto" picks by backend (bench/RESULTS.md). GPU: grouped, cuDNN's depthwise kernels
  (rrsisd train step, batch 32, one H200: 406.9 images/s against 383.0 for shifted sums,
  whose backward was 12.6 of 72.4 ms of device time in a profile). TPU: pallas (rrsisd,
  v5e 2x2, compiled ahead of time, by the compiler's cycle estimates: the three branch
  convolutions of one adapter, forward and gradients, take 160 us against 365 us as
  grouped convolutions, which XLA runs on the matrix unit: bench/depthwise_aot.py; the
  shifted sums were slower still). CPU: shifted sums (the demo's step on 2 cores: no
  difference beyond the noise).
  """
  if name == "auto":
    return {"tpu": "pallas", "cpu": "shifted"}.get(backend, "grouped")
  if name not in DEPTHWISE_IMPLEMENTATIONS:
    raise ValueError(f"config.model.visual_adapter.depthwise={name!r}; use 'auto' or one of "
                     f"{DEPTHWISE_IMPLEMENTATIONS}.")
  return name


NORM_RESIDUALS = ("stream", "shared", "compact")


def resolve_norm_residuals(name: str, backend: str, dtype) -> str:
  """config.model.norm_residuals -> which of the image encoder's norms over the f32 stream
  are LayerNorm (above), whose backward keeps the normed input in the compute dtype, not
  the stream: "stream" none (autodiff of nn.LayerNorm), "compact" all, "shared" those whose
  output feeds several ops anyway (vit.VisionTransformer).

  "auto" is "compact" on TPU at 16-bit compute, "stream" elsewhere (at f32 both keep the
  same bytes; GPU is not measured). rrsisd, v5e 2x2, 8 per chip, compiled ahead of time:
  "stream" 33.21 GB of XLA's bytes accessed per chip and step, 7.14 GB by the HBM estimate,
  2.26 GiB of temporaries, 34.2 ms of XLA ops by the compiler's cycle estimates; "compact"
  28.51 GB, 6.15 GB, 2.00 GiB, 34.5 ms; "shared" 30.02 GB, 5.95 GB, 2.06 GiB, 33.7 ms. A
  norm whose output only feeds one matmul is fused into it, and keeping its normed input
  costs a pass of its own: "shared" skips those, the fastest by the cycle estimates;
  "compact" moves the fewest bytes (bench/RESULTS.md).
  """
  if name == "auto":
    return "compact" if backend == "tpu" and jnp.dtype(dtype).itemsize == 2 else "stream"
  if name not in NORM_RESIDUALS:
    raise ValueError(f"config.model.norm_residuals={name!r}; use 'auto' or one of "
                     f"{NORM_RESIDUALS}.")
  return name


def grouped_depthwise_conv(x, kernel):
  """depthwise_conv by XLA's grouped convolution (feature_group_count = channels), f32
  accumulation at any input dtype (as depthwise_conv), result in x's dtype."""
  channels = x.shape[-1]
  out = jax.lax.conv_general_dilated(
      x, kernel.reshape(*kernel.shape[:2], 1, channels), window_strides=(1, 1),
      padding=[_same_padding(kernel.shape[0])] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
      preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


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

def pallas_depthwise_conv(x, kernel):
  """depthwise_conv by the Pallas TPU kernel of depthwise.py (the vector unit), one call
  per device on its batch shard; heights that are not a multiple of depthwise's row step:
  the grouped convolution."""
  from s4eca_jax.models import depthwise  # pylint: disable=g-import-not-at-top  # pallas is imported only where it runs

  if not depthwise.supports(x.shape[1]):
    return grouped_depthwise_conv(x, kernel)
  return _per_device(_pallas_depthwise, x, kernel, replicated=1)


@jax.custom_vjp
def _pallas_depthwise(x, kernel):
  from s4eca_jax.models import depthwise  # pylint: disable=g-import-not-at-top  # pallas is imported only where it runs

  return depthwise.depthwise_conv(x, kernel)


def _pallas_depthwise_fwd(x, kernel):
  return _pallas_depthwise(x, kernel), (x, kernel)


def _pallas_depthwise_bwd(residuals, grad):
  """The input gradient: the kernel with its taps flipped. The kernel gradient: XLA's (the
  grouped convolution's weight gradient, one sum over batch and pixels per tap); as a
  Pallas kernel it took 104,058 cycles at 7x7 on v5e by the static profile, XLA's 37,700."""
  from s4eca_jax.models import depthwise  # pylint: disable=g-import-not-at-top  # pallas is imported only where it runs

  x, kernel = residuals
  grad_x = depthwise.depthwise_conv(grad.astype(x.dtype), kernel, flipped=True)
  weight_grad = jax.vjp(lambda w: grouped_depthwise_conv(x, w), kernel.astype(x.dtype))[1]
  return grad_x, weight_grad(grad.astype(x.dtype))[0].astype(kernel.dtype)


_pallas_depthwise.defvjp(_pallas_depthwise_fwd, _pallas_depthwise_bwd)


DEPTHWISE_CONVS = {"shifted": depthwise_conv, "grouped": grouped_depthwise_conv,
                   "pallas": pallas_depthwise_conv}
DEPTHWISE_IMPLEMENTATIONS = tuple(DEPTHWISE_CONVS)


class DepthwiseConv(nn.Module):
  """Depthwise 2-D convolution, stride 1, "SAME" padding (`depthwise_conv`).

  Same parameters (kernel (k, k, 1, C), bias (C,), LeCun-normal init) and outputs as
  `nn.Conv(C, (k, k), padding="SAME", feature_group_count=C)`, which XLA:CPU runs slowly
  (7x7 on (8, 16, 16, 32): 8.5 ms forward against 0.4 ms for the shifted sum).
  """

  kernel_size: int
  dtype: Dtype = jnp.float32
  implementation: str = "shifted"  # a DEPTHWISE_CONVS key (resolve_depthwise)

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, C) -> (B, H, W, C)."""
    k, channels = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    conv = DEPTHWISE_CONVS[self.implementation]
    out = conv(x.astype(self.dtype), kernel[:, :, 0].astype(self.dtype))
    return out + bias.astype(self.dtype)


REMAT_POLICIES = {
    # name -> what a rematerialised block keeps from its forward pass for the backward
    "full": None,  # only the block input: everything is recomputed
    "dots": "checkpoint_dots",  # every matmul output
    "dots_no_batch": "dots_with_no_batch_dims_saveable",  # projections and MLP, not scores
}


def remat_block(block_cls, policy: bool | str):
  """block_cls rematerialised by `policy`: False/"none", True/"full", or a REMAT_POLICIES key."""
  if policy in (False, None, "none", ""):
    return block_cls
  policy = "full" if policy is True else policy
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat={policy!r}; use False, 'none', True or one of "
                     f"{sorted(REMAT_POLICIES)}.")
  name = REMAT_POLICIES[policy]
  return nn.remat(block_cls, policy=getattr(jax.checkpoint_policies, name) if name else None)


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
