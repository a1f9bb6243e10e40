"""Flash attention for TPU as Pallas kernels, with the row statistics stored lane-dense.

jax's Pallas TPU flash attention keeps each query row's statistics (max, sum; and dO.O in
the backward) as (B, heads, T, 128) f32 arrays, one value repeated over the 128 lanes of
a TPU vector register: at DINOv2's 1,152 padded tokens and 8 images per chip that is 57
MB per statistic and block, written by the forward, broadcast again for the backward and
read by both backward kernels. Here the forward stores one log-sum-exp per row and head,
(B, heads, 1, T): a row of lanes, 0.4 MB. Inside a kernel a row becomes a column (and
back) by a broadcast to (128, n) and a transpose on the vector unit.

The sequences this model attends over are short (at most PALLAS_MAX_LENGTH keys): one
kernel step holds every key of a (batch, head), so the forward needs no running maximum,
and one backward kernel computes dQ, dK and dV together (jax's computes the scores twice,
in a dQ kernel and a dK/dV kernel), accumulating dK and dV over the blocks of queries. The
backward reads the output and computes dO.O per row itself.

Inputs are token-major, (B, T, heads * head_dim), as the q, k and v projections write
them: no copy into a heads-first layout and back, and no lane padding (a heads-first
(..., T, 64) array fills half of each 128-lane tile, in HBM and in VMEM). A kernel step
takes a block of 128 lanes (block_width): with heads of 64, two heads, each computed over
the whole block with the other head's lanes zeroed, which costs the 128-wide matrix unit
no more passes than one head alone. For the rrsisd image block on v5e (8 images per chip,
forward and input gradient) the compiler's cycle estimates gave 2.24 ms this way, 2.76 ms
heads-first (XLA's ops by their estimates, both kernels at the roofline of their cost
estimates; bench/RESULTS.md).

Sequences have any length: a block of keys is the whole sequence, and a last block of
queries that runs past the end reads undefined rows, whose outputs are dropped. So
DINOv2's 1,029 tokens need no padding to 1,152 in HBM (with it, XLA padded q, k and v in
every block). Inside the kernels every matmul runs on whole 128-row tiles: the keys and
values are copied into VMEM scratch padded with zeros (_pad_keys), and the backward copies
the defined rows of the last block of queries into zeroed scratch. A bf16 matmul over a
partial tile, or one fed by a select, becomes a masked matmul, and libtpu 0.0.42's static
profiler (kernel_profile) aborts on those; this way both kernels are priced by it.
`key_valid` (B, Tk) masks keys (padding tokens); every query row must see at
least one valid key (the caller's `layers._attendable` ensures it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from s4eca_jax import kernel_profile

LANES = 128
PALLAS_MAX_LENGTH = 2048  # longest key sequence one kernel step holds
_MAX_BLOCK_Q = 512
_SCORES_TILE = 512 * 1024  # most (query, key) pairs per kernel step: a few f32 tiles of VMEM
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # a masked score: exp(it - max) is 0
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b (dK, dV: 1.3% fewer backward cycles than a.T first)


def supports(k_len: int) -> bool:
  return k_len <= PALLAS_MAX_LENGTH


def _column(row):
  """(1, n) -> (n, 1): the row's values down the sublanes (via a (LANES, n) transpose)."""
  return jnp.broadcast_to(row, (LANES, row.shape[-1])).T[:, :1]


def _row(column):
  """(n, 1) -> (1, n)."""
  return jnp.broadcast_to(column, (column.shape[0], LANES)).T[:1]


def _scores(q, k, valid, scale, causal, q_start):
  """(bq, Tk) f32 scores of a block of queries against every key, masked."""
  s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
  keep = jnp.broadcast_to(valid != 0, s.shape)
  if causal:
    rows = q_start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    keep = keep & (jax.lax.broadcasted_iota(jnp.int32, s.shape, 1) <= rows)
  return jnp.where(keep, s, _MASKED)


def _head_lanes(width: int, head_dim: int):
  """[(1, width) bool] per head of a block: the lanes that hold it; [None] for one head."""
  if width == head_dim:
    return [None]
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
  return [lane // head_dim == j for j in range(width // head_dim)]


def _only(x, lanes):
  """x with the lanes of other heads zeroed: a matmul over the block's width then sums
  one head's dimensions (and writes only its lanes)."""
  # Selected in f32: libtpu's static profiler aborts on a bf16 select that feeds a matmul
  # ("Expected vector-bf16packed, got vector-int16").
  return x if lanes is None else jnp.where(lanes, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _pad_keys(k_ref, v_ref, valid_ref, k_pad, v_pad, keep):
  """Copies this (batch, block of heads)'s keys and values into VMEM scratch of a multiple
  of 128 rows, zeros after the last key, and its key mask into a (1, rows) f32 row (1 =
  attend). Every matmul then contracts over whole 128-row tiles: a bf16 matmul over a
  partial tile (1,029 keys) is one that libtpu's static profiler aborts on ("Expected
  vector-f32, got vector-bf16packed" at vmatmul.msk), and the MXU takes a whole tile
  either way. Runs once per (batch, block of heads): the first block of queries."""
  _copy_and_zero_tail(k_pad, k_ref[...])
  _copy_and_zero_tail(v_pad, v_ref[...])
  _copy_and_zero_tail(keep, (valid_ref[...] != 0).astype(jnp.float32), axis=1)


def _copy_and_zero_tail(scratch, value, axis: int = 0):
  """scratch[:n] = value and zeros after it, along `axis` (n = value's length there)."""
  n, rows = value.shape[axis], scratch.shape[axis]
  head = (slice(None),) * axis + (slice(0, n),)
  scratch[head] = value
  if rows > n:
    tail = (slice(None),) * axis + (slice(n, rows),)
    shape = scratch.shape[:axis] + (rows - n,) + scratch.shape[axis + 1:]
    scratch[tail] = jnp.zeros(shape, scratch.dtype)


def _forward_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref, k_pad, v_pad, keep, *,
                    scale, causal, block_q, head_dim):
  @pl.when(pl.program_id(2) == 0)
  def _():
    _pad_keys(k_ref, v_ref, valid_ref, k_pad, v_pad, keep)

  q, k, v, valid = q_ref[...], k_pad[...], v_pad[...], keep[...]
  o = jnp.zeros(q.shape, jnp.float32)
  for j, lanes in enumerate(_head_lanes(q.shape[-1], head_dim)):
    s = _scores(_only(q, lanes), k, valid, scale, causal, pl.program_id(2) * block_q)
    m = jnp.max(s, axis=1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=1, keepdims=True)  # (bq, 1), >= 1
    o += jnp.dot(p.astype(v.dtype), _only(v, lanes), preferred_element_type=jnp.float32) / total
    lse_ref[j] = _row(m + jnp.log(total))
  o_ref[...] = o.astype(o_ref.dtype)


def _backward_kernel(q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, o_ref,
                     dq_ref, dk_ref, dv_ref, k_pad, v_pad, keep, q_end, do_end, o_end,
                     lse_end, dk_acc, dv_acc, *, scale, causal, block_q, q_len, head_dim):
  i, last = pl.program_id(2), pl.num_programs(2) - 1

  @pl.when(i == 0)
  def _():
    _pad_keys(k_ref, v_ref, valid_ref, k_pad, v_pad, keep)
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  def step(q_ref, do_ref, o_ref, lse_ref):
    q, k, v, do, valid = q_ref[...], k_pad[...], v_pad[...], do_ref[...], keep[...]
    o_do = o_ref[...].astype(jnp.float32) * do.astype(jnp.float32)
    dq = jnp.zeros(q.shape, jnp.float32)
    for j, lanes in enumerate(_head_lanes(q.shape[-1], head_dim)):
      q_j, do_j = _only(q, lanes), _only(do, lanes)
      s = _scores(q_j, k, valid, scale, causal, i * block_q)
      p = jnp.exp(s - _column(lse_ref[j]))  # (bq, Tk)
      dp = jax.lax.dot_general(do_j, v, _NT, preferred_element_type=jnp.float32)
      di = jnp.sum(_only(o_do, lanes), axis=1, keepdims=True)  # (bq, 1): dO.O of the head
      ds = p * (dp - di)
      dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype), do_j, _TN,
                                         preferred_element_type=jnp.float32)
      dk_acc[...] += jax.lax.dot_general(ds.astype(q.dtype), q_j, _TN,
                                         preferred_element_type=jnp.float32) * scale
      dq += jnp.dot(ds.astype(k.dtype), _only(k, lanes), preferred_element_type=jnp.float32)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)

  rows = q_len - (pl.cdiv(q_len, block_q) - 1) * block_q  # of the last block, in the array
  if rows == block_q:
    step(q_ref, do_ref, o_ref, lse_ref)
  else:
    pl.when(i < last)(lambda: step(q_ref, do_ref, o_ref, lse_ref))

    @pl.when(i == last)
    def _():
      # The last block runs past the end: its other rows (and statistics) are undefined.
      # Its defined rows go into zeroed scratch, so those rows add nothing to dK and dV
      # (q and dO zero, statistics zero: finite). Copies, not a select on the row: a
      # select feeding a matmul becomes a masked matmul, which the static profiler aborts on.
      for end, ref in ((q_end, q_ref), (do_end, do_ref), (o_end, o_ref)):
        _copy_and_zero_tail(end, ref[:rows])
      _copy_and_zero_tail(lse_end, lse_ref[:, :, :rows], axis=2)
      step(q_end, do_end, o_end, lse_end)

  @pl.when(i == last)
  def _():
    k_len = dk_ref.shape[0]
    dk_ref[...] = dk_acc[:k_len].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[:k_len].astype(dv_ref.dtype)


def block_q(q_len: int, k_len: int) -> int:
  """Queries per kernel step, a multiple of 128 (the backward contracts over them): all of
  them, rounded up, when that fits one step; else the size up to 512, with at most
  _SCORES_TILE scores, that wastes the fewest rows past the end, the longest of those.
  1,029 tokens: 384 (123 rows past the end; 512 would waste 507)."""
  sizes = [b for b in range(LANES, _MAX_BLOCK_Q + 1, LANES) if b * k_len <= _SCORES_TILE]
  sizes = sizes or [LANES]
  if q_len <= sizes[-1]:
    return _padded(q_len)
  return min(sizes, key=lambda b: (-(-q_len // b) * b - q_len, -b))


def block_width(width: int, head_dim: int) -> int:
  """Lanes per kernel step: the narrowest multiple of 128 that holds whole heads and
  divides the width (768 = 12 heads of 64: 128, two heads); else the whole width."""
  for lanes in range(LANES, width, LANES):
    if lanes % head_dim == 0 and width % lanes == 0:
      return lanes
  return width


def _plan(q, k, head_dim: int):
  """(queries per step, grid (batch, block of heads, block of queries), BlockSpecs: a block
  of queries, all keys or values, the key mask, the row statistics of the block's heads)."""
  batch, q_len, width = q.shape
  k_len = k.shape[1]
  bq, lanes = block_q(q_len, k_len), block_width(width, head_dim)
  q_block = pl.BlockSpec((None, bq, lanes), lambda b, h, i: (b, i, h))
  kv_block = pl.BlockSpec((None, k_len, lanes), lambda b, h, i: (b, 0, h))
  valid = pl.BlockSpec((None, 1, k_len), lambda b, h, i: (b, 0, 0))
  rows = pl.BlockSpec((None, lanes // head_dim, 1, bq), lambda b, h, i: (b, h, 0, i))
  return bq, (batch, width // lanes, pl.cdiv(q_len, bq)), (q_block, kv_block, valid, rows)


def _padded(n: int) -> int:
  """n rounded up to a multiple of 128."""
  return -(-n // LANES) * LANES


def _key_scratch(k, lanes: int) -> list:
  """VMEM for _pad_keys: keys, values (rows rounded up to 128), the key mask row."""
  rows = _padded(k.shape[1])
  return [pltpu.VMEM((rows, lanes), k.dtype)] * 2 + [pltpu.VMEM((1, rows), jnp.float32)]


def _cost(q, k, heads: int, flops_per_score: int, arrays) -> pl.CostEstimate:
  """What a kernel costs, for XLA's cost analysis: FLOPs per (query, key) pair and
  dimension of a head (summed over heads: q's width), one exp per pair and head, and the
  bytes of the arrays it reads and writes once each."""
  pairs = q.shape[0] * q.shape[1] * k.shape[1]
  return pl.CostEstimate(flops=flops_per_score * pairs * q.shape[2],
                         transcendentals=pairs * heads,
                         bytes_accessed=sum(a.size * a.dtype.itemsize for a in arrays))


def _profiled(q_block) -> bool:
  """Whether kernel_profile can price the kernel: libtpu's static profiler aborts on the
  partial-tile matmuls of blocks narrower than 128 lanes (heads of a tiny config); those
  kernels are not recorded and keep the roofline of their cost estimates."""
  return q_block.block_shape[-1] % LANES == 0


def _forward(q, k, v, valid, scale, causal, heads):
  head_dim = q.shape[2] // heads
  bq, grid, (q_block, kv_block, valid_block, rows) = _plan(q, k, head_dim)
  if _profiled(q_block):
    kernel_profile.record("s4eca_flash_forward", _forward,
                          dict(scale=scale, causal=causal, heads=heads), q, k, v, valid,
                          per_image=True)
  lse = jax.ShapeDtypeStruct((q.shape[0], heads, 1, q.shape[1]), jnp.float32)  # per row, head
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), lse]
  return pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale, causal=causal, block_q=bq,
                        head_dim=head_dim),
      grid=grid, in_specs=[q_block, kv_block, kv_block, valid_block],
      out_specs=[q_block, rows], out_shape=out_shape,
      scratch_shapes=_key_scratch(k, q_block.block_shape[-1]),
      compiler_params=pltpu.CompilerParams(  # blocks of queries in order: the first pads
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=_cost(q, k, heads, 4, [q, k, v, valid] + out_shape), name="s4eca_flash_forward",
  )(q, k, v, valid)


def _backward(q, k, v, valid, do, lse, o, scale, causal):
  heads = lse.shape[1]
  head_dim = q.shape[2] // heads
  bq, grid, (q_block, kv_block, valid_block, rows) = _plan(q, k, head_dim)
  if _profiled(q_block):
    kernel_profile.record("s4eca_flash_backward", _backward,
                          dict(scale=scale, causal=causal), q, k, v, valid, do, lse, o,
                          per_image=True)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
  lanes = q_block.block_shape[-1]
  return pl.pallas_call(
      functools.partial(_backward_kernel, scale=scale, causal=causal, block_q=bq,
                        q_len=q.shape[1], head_dim=head_dim),
      grid=grid, in_specs=[q_block, kv_block, kv_block, valid_block, q_block, rows, q_block],
      out_specs=[q_block, kv_block, kv_block], out_shape=out_shape,
      scratch_shapes=_key_scratch(k, lanes) + [pltpu.VMEM((bq, lanes), x.dtype) for x in (
          q, do, o)] + [pltpu.VMEM(rows.block_shape[1:], jnp.float32)] + [
          pltpu.VMEM((_padded(k.shape[1]), lanes), jnp.float32)] * 2,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=_cost(q, k, heads, 10, [q, k, v, valid, do, lse, o] + out_shape),
      name="s4eca_flash_backward",
  )(q, k, v, valid, do, lse, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, valid, scale, causal, heads):
  return _forward(q, k, v, valid, scale, causal, heads)[0]


def _attention_fwd(q, k, v, valid, scale, causal, heads):
  o, lse = _forward(q, k, v, valid, scale, causal, heads)
  return o, (q, k, v, valid, o, lse)


def _attention_bwd(scale, causal, heads, residuals, do):
  del heads  # the backward reads it from lse's shape
  q, k, v, valid, o, lse = residuals
  dq, dk, dv = _backward(q, k, v, valid, do.astype(q.dtype), lse, o, scale, causal)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, key_valid, *, num_heads: int, causal: bool = False):
  """softmax(q k^T / sqrt(head_dim), keys masked) v, per head, on token-major arrays
  q (B, Tq, heads * head_dim), k and v (B, Tk, heads * head_dim): the projections' own
  layout, lane-dense. key_valid (B, Tk) bool."""
  if not supports(k.shape[1]):
    raise ValueError(f"flash_attention: {k.shape[1]} keys; these kernels hold at most "
                     f"{PALLAS_MAX_LENGTH} (longer sequences: jax's kernel, layers._jax_flash).")
  if q.shape[-1] % num_heads:
    raise ValueError(f"flash_attention: width {q.shape[-1]} is not divisible by "
                     f"{num_heads} heads.")
  valid = key_valid.astype(jnp.int32)[:, None, :]  # (B, 1, Tk)
  scale = float(1.0 / np.sqrt(q.shape[-1] // num_heads))
  return _attention(q, k, v, valid, scale, causal, num_heads)
