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
forward and input gradient) the compiler's cycle estimates give 2.24 ms this way, 2.76 ms
heads-first.

Sequences have any length: a block of keys is the whole sequence, and a last block of
queries that runs past the end reads undefined rows, whose outputs are dropped and which
the backward masks out of dK and dV. So DINOv2's 1,029 tokens need no padding to 1,152
(with it, XLA padded q, k and v in HBM in every block, and the kernels computed 25% more
scores). `key_valid` (B, Tk) masks keys (padding tokens); every query row must see at
least one valid key (the caller's `layers._attendable` ensures it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
PALLAS_MAX_LENGTH = 2048  # longest key sequence one kernel step holds
_MAX_BLOCK_Q = 512
_SCORES_TILE = 512 * 1024  # most (query, key) pairs per kernel step: a few f32 tiles of VMEM
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # a masked score: exp(it - max) is 0
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


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
  return x if lanes is None else jnp.where(lanes, x, 0).astype(x.dtype)


def _forward_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref, *, scale, causal,
                    block_q, head_dim):
  q, k, v, valid = q_ref[...], k_ref[...], v_ref[...], valid_ref[...]
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
                     dq_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, scale, causal, block_q,
                     q_len, head_dim):
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  q, k, v, do, valid = q_ref[...], k_ref[...], v_ref[...], do_ref[...], valid_ref[...]
  o_do = o_ref[...].astype(jnp.float32) * do.astype(jnp.float32)
  live = None
  if q_len % block_q:  # the last block runs past the end: its extra rows are undefined
    live = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0) < q_len
    q, do = jnp.where(live, q, 0).astype(q.dtype), jnp.where(live, do, 0).astype(do.dtype)
  dq = jnp.zeros(q.shape, jnp.float32)
  for j, lanes in enumerate(_head_lanes(q.shape[-1], head_dim)):
    q_j, do_j = _only(q, lanes), _only(do, lanes)
    s = _scores(q_j, k, valid, scale, causal, i * block_q)
    p = jnp.exp(s - _column(lse_ref[j]))  # (bq, Tk)
    dp = jax.lax.dot_general(do_j, v, _NT, preferred_element_type=jnp.float32)
    di = jnp.sum(_only(o_do, lanes), axis=1, keepdims=True)  # (bq, 1): dO.O of the head
    ds = p * (dp - di)
    if live is not None:  # undefined statistics and outputs too
      p, ds = jnp.where(live, p, 0.0), jnp.where(live, ds, 0.0)
    dv_acc[...] += jnp.dot(p.T.astype(do.dtype), do_j, preferred_element_type=jnp.float32)
    dk_acc[...] += jnp.dot(ds.T.astype(q.dtype), q_j,
                           preferred_element_type=jnp.float32) * scale
    dq += jnp.dot(ds.astype(k.dtype), _only(k, lanes), preferred_element_type=jnp.float32)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)

  @pl.when(i == pl.num_programs(2) - 1)
  def _():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def block_q(q_len: int, k_len: int) -> int:
  """Queries per kernel step: all of them when they fit one step; else the multiple of 128
  (up to 512, with at most _SCORES_TILE scores) that wastes the fewest rows past the end,
  the longest of those. 1,029 tokens: 384 (123 rows past the end; 512 would waste 507)."""
  sizes = [b for b in range(LANES, _MAX_BLOCK_Q + 1, LANES) if b * k_len <= _SCORES_TILE]
  sizes = sizes or [LANES]
  if q_len <= sizes[-1]:
    return q_len
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


def _cost(q, k, heads: int, flops_per_score: int, arrays) -> pl.CostEstimate:
  """What a kernel costs, for XLA's cost analysis: FLOPs per (query, key) pair and
  dimension of a head (summed over heads: q's width), one exp per pair and head, and the
  bytes of the arrays it reads and writes once each."""
  pairs = q.shape[0] * q.shape[1] * k.shape[1]
  return pl.CostEstimate(flops=flops_per_score * pairs * q.shape[2],
                         transcendentals=pairs * heads,
                         bytes_accessed=sum(a.size * a.dtype.itemsize for a in arrays))


def _forward(q, k, v, valid, scale, causal, heads):
  head_dim = q.shape[2] // heads
  bq, grid, (q_block, kv_block, valid_block, rows) = _plan(q, k, head_dim)
  lse = jax.ShapeDtypeStruct((q.shape[0], heads, 1, q.shape[1]), jnp.float32)  # per row, head
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), lse]
  return pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale, causal=causal, block_q=bq,
                        head_dim=head_dim),
      grid=grid, in_specs=[q_block, kv_block, kv_block, valid_block],
      out_specs=[q_block, rows], out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      cost_estimate=_cost(q, k, heads, 4, [q, k, v, valid] + out_shape), name="s4eca_flash_forward",
  )(q, k, v, valid)


def _backward(q, k, v, valid, do, lse, o, scale, causal):
  heads = lse.shape[1]
  head_dim = q.shape[2] // heads
  bq, grid, (q_block, kv_block, valid_block, rows) = _plan(q, k, head_dim)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
  lanes = q_block.block_shape[-1]
  return pl.pallas_call(
      functools.partial(_backward_kernel, scale=scale, causal=causal, block_q=bq,
                        q_len=q.shape[1], head_dim=head_dim),
      grid=grid, in_specs=[q_block, kv_block, kv_block, valid_block, q_block, rows, q_block],
      out_specs=[q_block, kv_block, kv_block], out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((k.shape[1], lanes), jnp.float32)] * 2,
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
