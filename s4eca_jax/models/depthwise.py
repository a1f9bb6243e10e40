"""Depthwise "SAME" convolution for TPU as a Pallas kernel: the vector unit, not the MXU.

XLA's TPU compiler runs a depthwise convolution (feature_group_count = channels) on the
matrix unit, one channel per group. A depthwise conv is k * k multiply-adds per output
value, which the vector unit does at full width. For the visual adapter's branches on a
(8, 32, 32, 112) bf16 map (8 images per chip), v5e, forward plus both gradients, by the
compiler's cycle estimates (`bench/depthwise_aot.py`; XLA's per-op estimates for XLA ops,
the static profile of the compiled kernel for this one): 3x3 65.1 -> 26.5 us, 5x5
112.5 -> 50.6 us, 7x7 187.8 -> 82.5 us.

The kernel works on one image per grid step, channels on the lanes, the width on the
sublanes. The k horizontal shifts of the image (a rotation of the sublanes, with the
columns that wrap around zeroed: the "SAME" padding) are written once into a VMEM scratch
with zero rows above and below, so that every tap reads whole rows. Sums are in f32; the
output has the input's dtype. The input gradient is the same kernel with the taps flipped
and the padding mirrored; the kernel gradient is XLA's (layers.pallas_depthwise_conv).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from s4eca_jax import kernel_profile

_ROWS = 4  # output rows per step of the inner loop: the accumulator stays in registers


def _shifted_copies(x, xs_ref, k: int, before: int):
  """xs_ref[dx, before + h, w] = x[h, w + dx - before] (zero outside), zero pad rows."""
  height, width, channels = x.shape
  after = k - 1 - before
  column = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  for dx in range(k):
    shift = dx - before
    rolled = pltpu.roll(x, (-shift) % width, 1) if shift % width else x
    inside = (column + shift >= 0) & (column + shift < width)
    if before:
      xs_ref[dx, :before] = jnp.zeros((before, width, channels), jnp.float32)
    if after:
      xs_ref[dx, before + height:] = jnp.zeros((after, width, channels), jnp.float32)
    xs_ref[dx, before:before + height] = jnp.where(inside, rolled, 0.0)


def _conv_kernel(x_ref, w_ref, o_ref, xs_ref, *, k: int, before: int):
  """o[h, w] = sum_(dy, dx) x[h + dy - before, w + dx - before] * w[dy, dx], one image."""
  height = x_ref.shape[1]
  _shifted_copies(x_ref[0].astype(jnp.float32), xs_ref, k, before)

  def rows(i, carry):
    start = pl.multiple_of(i * _ROWS, _ROWS)
    acc = jnp.zeros((_ROWS,) + x_ref.shape[2:], jnp.float32)
    for dy in range(k):
      for dx in range(k):
        acc += xs_ref[dx, pl.ds(start + dy, _ROWS)] * w_ref[dy * k + dx]
    o_ref[0, pl.ds(start, _ROWS)] = acc.astype(o_ref.dtype)
    return carry

  jax.lax.fori_loop(0, height // _ROWS, rows, 0)


def _conv(x, taps, k: int, before: int):
  """The kernel over x's batch, one image per step: taps (k * k, 1, C) f32."""
  kernel_profile.record("s4eca_depthwise", _conv, dict(k=k, before=before), x, taps)
  batch, height, width, channels = x.shape
  image = pl.BlockSpec((1, height, width, channels), lambda b: (b, 0, 0, 0))
  return pl.pallas_call(
      functools.partial(_conv_kernel, k=k, before=before),
      grid=(batch,), in_specs=[image, pl.BlockSpec(taps.shape, lambda b: (0, 0, 0))],
      out_specs=image, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      scratch_shapes=[pltpu.VMEM((k, height + k - 1, width, channels), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=pl.CostEstimate(
          flops=2 * k * k * x.size, transcendentals=0,
          bytes_accessed=2 * x.size * x.dtype.itemsize + taps.size * 4),
      name="s4eca_depthwise",
  )(x, taps)


def supports(height: int) -> bool:
  """The kernel steps over output rows _ROWS at a time."""
  return height % _ROWS == 0


def depthwise_conv(x, kernel, *, flipped: bool = False):
  """Depthwise "SAME" convolution, stride 1, on one device's batch: x (B, H, W, C) with H a
  multiple of 4 (`supports`), kernel (k, k, C). f32 sums; the result has x's dtype.
  flipped: the kernel's taps reversed and the padding mirrored, the input gradient's
  convolution. Not differentiable itself: layers.pallas_depthwise_conv is. On CPU: under
  pltpu.force_tpu_interpret_mode()."""
  if not supports(x.shape[1]):
    raise ValueError(f"depthwise.depthwise_conv: height {x.shape[1]} is not a multiple of "
                     f"{_ROWS}; use layers.grouped_depthwise_conv.")
  k = kernel.shape[0]
  if flipped:
    kernel = kernel[::-1, ::-1]
  taps = kernel.astype(jnp.float32).reshape(k * k, 1, -1)  # one row of lanes per tap
  before = (k - 1) // 2
  return _conv(x, taps, k, k - 1 - before if flipped else before)
