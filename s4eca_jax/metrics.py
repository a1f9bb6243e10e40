"""Referring segmentation metrics, as SPEC.md (Evaluation) defines them.

Per sample: I = |pred AND gt|, U = |pred OR gt|, IoU = I / U, and IoU = 0 when U = 0.
mIoU = mean IoU; oIoU = sum I / sum U; P@t = fraction of samples with IoU >= t for
t in 0.5, 0.6, 0.7, 0.8, 0.9. All values are fractions in [0, 1]; `n` counts samples.

Two forms of the same definitions:
- `referring_metrics(pred_masks, gt_masks)`: numpy, masks of any (and differing) sizes;
  `metrics_from_counts(intersections, unions)` from per-sample pixel counts.
- An accumulator for jit-compiled eval steps: `init_accumulator()`,
  `update_accumulator(acc, pred, gt, valid)`, `merge_accumulators(a, b)`,
  `finalize_accumulator(acc)`. The state is a dict of sums, so merging the states of
  several hosts (or devices) is exact: never a mean of means. Pixel sums are exact
  integers (int32 high/low words, as jax runs without 64-bit types), P@t compares
  integers (10 * I >= 10t * U), and the IoU sum is Kahan-compensated float32.

Protocols: `input` compares at the network input size (pred from the logits, gt =
batch["mask"]); `original` brings the logits to each sample's original size with
`resize_logits_to_original` and compares with batch["mask_original"] (pipeline.py).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

THRESHOLD_TENTHS = (5, 6, 7, 8, 9)  # P@0.5 ... P@0.9
_LOW_WORD = 2**20  # pixel sums are high * 2**20 + low, low < 2**20 after each update


def _hits(intersection, union, xp):
  """(N, 5) bool: IoU >= t, in integers; an empty union has IoU 0 and hits nothing."""
  tenths = xp.asarray(THRESHOLD_TENTHS, dtype=intersection.dtype)
  return (union[:, None] > 0) & (10 * intersection[:, None] >= tenths * union[:, None])


def _iou(intersection, union, xp):
  return xp.where(union > 0, intersection / xp.maximum(union, 1), 0.0)


def _summary(total_intersection, total_union, iou_sum, hits, n) -> dict[str, float]:
  n_or_1 = max(n, 1)
  metrics = {"mIoU": iou_sum / n_or_1,
             "oIoU": total_intersection / total_union if total_union > 0 else 0.0}
  for tenths, count in zip(THRESHOLD_TENTHS, hits):
    metrics[f"P@0.{tenths}"] = count / n_or_1
  metrics["n"] = n
  return {k: (int(v) if k == "n" else float(v)) for k, v in metrics.items()}


def referring_metrics(pred_masks: Sequence[np.ndarray],
                      gt_masks: Sequence[np.ndarray]) -> dict[str, float]:
  """Metrics over paired boolean (or 0/1) masks; pair i must have one shape, pairs may
  differ (e.g. original image sizes)."""
  if len(pred_masks) != len(gt_masks):
    raise ValueError(f"{len(pred_masks)} predictions for {len(gt_masks)} ground truths.")
  intersection, union = [], []
  for pred, gt in zip(pred_masks, gt_masks):
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
      raise ValueError(f"Prediction {pred.shape} and ground truth {gt.shape} differ: bring "
                       "the prediction to the ground truth's size first.")
    intersection.append(np.logical_and(pred, gt).sum())
    union.append(np.logical_or(pred, gt).sum())
  return metrics_from_counts(np.asarray(intersection), np.asarray(union))


def metrics_from_counts(intersections: np.ndarray, unions: np.ndarray) -> dict[str, float]:
  """Metrics from per-sample pixel counts I and U, (N,) integers each."""
  intersection = np.asarray(intersections, np.int64).reshape(-1)
  union = np.asarray(unions, np.int64).reshape(-1)
  if intersection.shape != union.shape:
    raise ValueError(f"{intersection.size} intersections for {union.size} unions.")
  return _summary(intersection.sum(), union.sum(), _iou(intersection, union, np).sum(),
                  _hits(intersection, union, np).sum(0), len(intersection))


# ---------------------------------------------------------------------------------------
# Accumulator: pure functions on a dict of jnp arrays, usable inside jit.
# ---------------------------------------------------------------------------------------


def init_accumulator() -> dict[str, jax.Array]:
  return {
      "intersection": jnp.zeros(2, jnp.int32),  # [high, low] words of sum I
      "union": jnp.zeros(2, jnp.int32),  # [high, low] words of sum U
      "iou_sum": jnp.zeros((), jnp.float32),
      "iou_compensation": jnp.zeros((), jnp.float32),  # Kahan: lost low-order bits
      "hits": jnp.zeros(len(THRESHOLD_TENTHS), jnp.int32),
      "n": jnp.zeros((), jnp.int32),
  }


def _add_to_words(words: jax.Array, value: jax.Array) -> jax.Array:
  low = words[1] + value
  return jnp.stack([words[0] + low // _LOW_WORD, low % _LOW_WORD])


def update_accumulator(acc: dict[str, jax.Array], pred_masks: jax.Array,
                       gt_masks: jax.Array, valid: jax.Array | None = None
                       ) -> dict[str, jax.Array]:
  """Adds a batch: pred_masks and gt_masks (B, H, W) bool (or 0/1); valid (B,) bool
  drops padding samples. Pixels outside a sample's image must be False in both."""
  pred, gt = pred_masks.astype(bool), gt_masks.astype(bool)
  intersection = jnp.sum(pred & gt, axis=(1, 2), dtype=jnp.int32)  # (B,)
  union = jnp.sum(pred | gt, axis=(1, 2), dtype=jnp.int32)  # (B,)
  if valid is None:
    valid = jnp.ones(intersection.shape, bool)
  intersection, union = intersection * valid, union * valid
  iou = _iou(intersection, union, jnp).astype(jnp.float32)
  corrected = jnp.sum(iou) - acc["iou_compensation"]
  iou_sum = acc["iou_sum"] + corrected
  return {
      "intersection": _add_to_words(acc["intersection"], jnp.sum(intersection)),
      "union": _add_to_words(acc["union"], jnp.sum(union)),
      "iou_sum": iou_sum,
      "iou_compensation": (iou_sum - acc["iou_sum"]) - corrected,
      "hits": acc["hits"] + jnp.sum(_hits(intersection, union, jnp) & valid[:, None], axis=0,
                                    dtype=jnp.int32),
      "n": acc["n"] + jnp.sum(valid, dtype=jnp.int32),
  }


def merge_accumulators(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Exact merge (e.g. of two hosts' states): every field is a sum. The words need no
  carry here because finalize reads them as high * 2**20 + low in float64."""
  return jax.tree.map(lambda x, y: x + y, a, b)


def merge_across_processes(acc: dict[str, jax.Array]) -> dict[str, np.ndarray]:
  """The merge of every JAX process's accumulator (call on all processes)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  gathered = multihost_utils.process_allgather(acc)  # leaves (P, ...)
  return jax.tree.map(lambda x: np.asarray(x).sum(axis=0), gathered)


def finalize_accumulator(acc: dict[str, jax.Array]) -> dict[str, float]:
  """Host-side metrics dict (same keys as referring_metrics)."""
  acc = jax.tree.map(np.asarray, acc)
  words = lambda w: float(w[0]) * _LOW_WORD + float(w[1])
  iou_sum = float(acc["iou_sum"]) - float(acc["iou_compensation"])
  return _summary(words(acc["intersection"]), words(acc["union"]), iou_sum, acc["hits"],
                  int(acc["n"]))


# ---------------------------------------------------------------------------------------
# Logits -> masks, for both protocols.
# ---------------------------------------------------------------------------------------


def masks_from_logits(logits: jax.Array, probability: float = 0.5) -> jax.Array:
  """sigmoid(logits) > probability, computed as logits > log(p / (1 - p))."""
  if not 0.0 < probability < 1.0:
    raise ValueError(f"probability must be in (0, 1), got {probability}.")
  return logits > np.log(probability / (1.0 - probability))


def resize_logits_to_original(logits: jax.Array, heights: jax.Array, widths: jax.Array,
                              padded_shape: tuple[int, int]) -> jax.Array:
  """(B, S, S) logits -> (B, H, W): sample b resized bilinearly (half-pixel centres, as
  jax.image.resize) to heights[b] x widths[b] in the top-left corner, -inf elsewhere, to
  compare with the pipeline's `mask_original`."""
  size = jnp.asarray(logits.shape[1:], jnp.float32)
  rows = jnp.arange(padded_shape[0])[:, None]
  cols = jnp.arange(padded_shape[1])[None, :]

  def resize_one(logit, height, width):  # (S, S) -> (H, W)
    scale = jnp.stack([height, width]).astype(jnp.float32) / size
    resized = jax.image.scale_and_translate(
        logit.astype(jnp.float32), padded_shape, (0, 1), scale, jnp.zeros(2, jnp.float32),
        method="linear", antialias=False)
    return jnp.where((rows < height) & (cols < width), resized, -jnp.inf)

  return jax.vmap(resize_one)(logits, heights, widths)
