"""Flash attention for TPU as Pallas kernels, with the row statistics stored lane-dense.

jax's Pallas TPU flash attention keeps each query row's statistics (max, sum; and dO.O in
the backward) as (B, heads, T, 128) f32 arrays, one value repeated over the 128 lanes of
a TPU vector register: at DINOv2's 1,152 padded tokens and 8 images per chip that is 57
MB per statistic and block, written by the forward, broadcast again for the backward and
read by both backward kernels. Here they are one log-sum-exp and one dO.O per row, stored
as (B, heads, 1, T): a row of lanes, 0.4 MB. Inside a kernel a row becomes a column (and
back) by a broadcast to (128, n) and a transpose on the vector unit.

The sequences this model attends over are short (at most PALLAS_MAX_LENGTH keys): one
kernel step holds every key of a (batch, head), so the forward needs no running maximum,
and one backward kernel computes dQ, dK and dV together (jax's computes the scores twice,
in a dQ kernel and a dK/dV kernel), accumulating dK and dV over the blocks of queries.

Inputs are heads-first (B, heads, T, head_dim) at any length: a block of keys is the whole
sequence, and a last block of queries that runs past the end reads undefined rows, whose
outputs are dropped and which the backward masks out of dK and dV. So DINOv2's 1,029
tokens need no padding to 1,152 (with it, XLA padded q, k and v in HBM in every block,
and the kernels computed 25% more scores). `key_valid` (B, Tk) masks keys (padding
tokens); every query row must see at least one valid key (the caller's
`layers._attendable` ensures it).
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


def _forward_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref, *, scale, causal,
                    block_q):
  s = _scores(q_ref[...], k_ref[...], valid_ref[...], scale, causal,
              pl.program_id(2) * block_q)
  m = jnp.max(s, axis=1, keepdims=True)
  p = jnp.exp(s - m)
  total = jnp.sum(p, axis=1, keepdims=True)  # (bq, 1), >= 1
  o = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
  o_ref[...] = (o / total).astype(o_ref.dtype)
  lse_ref[...] = _row(m + jnp.log(total))


def _backward_kernel(q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, di_ref,
                     dq_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, scale, causal, block_q,
                     q_len):
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  live = None
  if q_len % block_q:  # the last block runs past the end: its extra rows are undefined
    live = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0) < q_len
    q, do = jnp.where(live, q, 0).astype(q.dtype), jnp.where(live, do, 0).astype(do.dtype)
  s = _scores(q, k, valid_ref[...], scale, causal, i * block_q)
  p = jnp.exp(s - _column(lse_ref[...]))  # (bq, Tk)
  dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
  ds = p * (dp - _column(di_ref[...]))
  if live is not None:  # undefined statistics too
    p, ds = jnp.where(live, p, 0.0), jnp.where(live, ds, 0.0)
  dv_acc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dk_acc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32) * scale
  dq_ref[...] = (jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
                 * scale).astype(dq_ref.dtype)

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


def _plan(q, k):
  """(queries per step, grid (batch, head, query block), BlockSpecs: a block of queries, all
  keys or values, the key mask, a row statistic)."""
  batch, heads, q_len, d = q.shape
  k_len = k.shape[2]
  bq = block_q(q_len, k_len)
  q_block = pl.BlockSpec((None, None, bq, d), lambda b, h, i: (b, h, i, 0))
  kv_block = pl.BlockSpec((None, None, k_len, d), lambda b, h, i: (b, h, 0, 0))
  valid = pl.BlockSpec((None, 1, k_len), lambda b, h, i: (b, 0, 0))
  row = pl.BlockSpec((None, None, 1, bq), lambda b, h, i: (b, h, 0, i))
  return bq, (batch, heads, pl.cdiv(q_len, bq)), (q_block, kv_block, valid, row)


def _cost(q, k, flops_per_score: int, arrays) -> pl.CostEstimate:
  """What a kernel costs, for XLA's cost analysis: FLOPs per (query, key) pair and head
  dim, one exp per pair, and the bytes of the arrays it reads and writes once each."""
  scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
  return pl.CostEstimate(flops=flops_per_score * scores * q.shape[3], transcendentals=scores,
                         bytes_accessed=sum(a.size * a.dtype.itemsize for a in arrays))


def _forward(q, k, v, valid, scale, causal):
  bq, grid, (q_block, kv_block, valid_block, row) = _plan(q, k)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct(q.shape[:2] + (1, q.shape[2]), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale, causal=causal, block_q=bq),
      grid=grid, in_specs=[q_block, kv_block, kv_block, valid_block],
      out_specs=[q_block, row], out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      cost_estimate=_cost(q, k, 4, [q, k, v, valid] + out_shape), name="s4eca_flash_forward",
  )(q, k, v, valid)


def _backward(q, k, v, valid, do, lse, di, scale, causal):
  bq, grid, (q_block, kv_block, valid_block, row) = _plan(q, k)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
  return pl.pallas_call(
      functools.partial(_backward_kernel, scale=scale, causal=causal, block_q=bq,
                        q_len=q.shape[2]),
      grid=grid, in_specs=[q_block, kv_block, kv_block, valid_block, q_block, row, row],
      out_specs=[q_block, kv_block, kv_block], out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((k.shape[2], q.shape[3]), jnp.float32)] * 2,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=_cost(q, k, 10, [q, k, v, valid, do, lse, di] + out_shape),
      name="s4eca_flash_backward",
  )(q, k, v, valid, do, lse, di)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, valid, scale, causal):
  return _forward(q, k, v, valid, scale, causal)[0]


def _attention_fwd(q, k, v, valid, scale, causal):
  o, lse = _forward(q, k, v, valid, scale, causal)
  return o, (q, k, v, valid, o, lse)


def _attention_bwd(scale, causal, residuals, do):
  q, k, v, valid, o, lse = residuals
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]
  dq, dk, dv = _backward(q, k, v, valid, do.astype(q.dtype), lse, di, scale, causal)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, key_valid, *, causal: bool = False):
  """softmax(q k^T / sqrt(head_dim), keys masked) v on heads-first (B, heads, T, head_dim)."""
  if not supports(k.shape[2]):
    raise ValueError(f"flash_attention: {k.shape[2]} keys; these kernels hold at most "
                     f"{PALLAS_MAX_LENGTH} (longer sequences: jax's kernel, layers._jax_flash).")
  valid = key_valid.astype(jnp.int32)[:, None, :]  # (B, 1, Tk)
  return _attention(q, k, v, valid, float(1.0 / np.sqrt(q.shape[-1])), causal)
