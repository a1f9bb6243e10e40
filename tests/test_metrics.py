"""Referring metrics against hand-computed cases; the jit accumulator against the numpy
reference, across merges and padding; logits -> masks for both protocols."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s4eca_jax import metrics


def _mask(shape, *cells):
  mask = np.zeros(shape, bool)
  for row, col in cells:
    mask[row, col] = True
  return mask


# 2 x 3 masks. Hand-computed I, U, IoU per sample:
PRED = [
    _mask((2, 3), (0, 0), (0, 1)),  # I=1, U=2 -> 0.5 (exactly the P@0.5 boundary)
    _mask((2, 3), (0, 0), (0, 1), (0, 2)),  # I=3, U=5 -> 0.6 (exactly P@0.6)
    _mask((2, 3)),  # empty prediction, truth of 2 -> I=0, U=2 -> 0
    _mask((2, 3), (1, 1)),  # empty truth -> I=0, U=1 -> 0
    _mask((2, 3)),  # both empty -> U=0 -> IoU 0, counts for no threshold
    _mask((2, 3), (0, 0), (1, 2)),  # identical -> I=2, U=2 -> 1
]
GT = [
    _mask((2, 3), (0, 0)),
    _mask((2, 3), (0, 0), (0, 1), (1, 0), (1, 1), (0, 2)),
    _mask((2, 3), (1, 0), (1, 1)),
    _mask((2, 3)),
    _mask((2, 3)),
    _mask((2, 3), (0, 0), (1, 2)),
]
EXPECTED = {
    "mIoU": (0.5 + 0.6 + 0 + 0 + 0 + 1) / 6,
    "oIoU": (1 + 3 + 0 + 0 + 0 + 2) / (2 + 5 + 2 + 1 + 0 + 2),
    "P@0.5": 3 / 6, "P@0.6": 2 / 6, "P@0.7": 1 / 6, "P@0.8": 1 / 6, "P@0.9": 1 / 6,
    "n": 6,
}


def test_referring_metrics_hand_computed():
  assert metrics.referring_metrics(PRED, GT) == pytest.approx(EXPECTED, abs=1e-12)


def test_metrics_from_counts_hand_computed():
  intersections = [1, 3, 0, 0, 0, 2]  # the I and U of PRED / GT above
  unions = [2, 5, 2, 1, 0, 2]
  assert metrics.metrics_from_counts(np.array(intersections), np.array(unions)) == (
      pytest.approx(EXPECTED, abs=1e-12))


def test_referring_metrics_edge_cases():
  empty = [np.zeros((4, 4), bool)]
  assert metrics.referring_metrics(empty, empty) == {
      "mIoU": 0.0, "oIoU": 0.0, "P@0.5": 0.0, "P@0.6": 0.0, "P@0.7": 0.0, "P@0.8": 0.0,
      "P@0.9": 0.0, "n": 1}
  # Masks of different sizes in one call (original-size protocol).
  result = metrics.referring_metrics([np.ones((3, 5)), np.ones((7, 2))],
                                     [np.ones((3, 5)), np.zeros((7, 2))])
  assert result["mIoU"] == 0.5 and result["oIoU"] == 15 / 29
  with pytest.raises(ValueError, match="bring the prediction"):
    metrics.referring_metrics([np.ones((3, 5))], [np.ones((5, 3))])


def test_accumulator_matches_reference_with_padding_and_merge():
  update = jax.jit(metrics.update_accumulator)
  pad = _mask((2, 3), (0, 0), (1, 1))  # padding that would change every metric if counted
  pred = jnp.asarray(np.stack(PRED[:3] + [pad]))
  gt = jnp.asarray(np.stack(GT[:3] + [np.zeros((2, 3), bool)]))
  first = update(metrics.init_accumulator(), pred, gt, jnp.array([True, True, True, False]))
  second = update(metrics.init_accumulator(), jnp.asarray(np.stack(PRED[3:])),
                  jnp.asarray(np.stack(GT[3:])), jnp.ones(3, bool))
  merged = metrics.finalize_accumulator(metrics.merge_accumulators(first, second))
  assert merged == pytest.approx(EXPECTED, abs=1e-6)
  sequential = update(first, jnp.asarray(np.stack(PRED[3:])), jnp.asarray(np.stack(GT[3:])),
                      jnp.ones(3, bool))
  assert metrics.finalize_accumulator(sequential) == pytest.approx(EXPECTED, abs=1e-6)
  across = metrics.merge_across_processes(sequential)  # one process: itself
  assert metrics.finalize_accumulator(across) == pytest.approx(EXPECTED, abs=1e-6)


def test_accumulator_random_batches_and_exact_large_pixel_sums():
  rng = np.random.default_rng(0)
  pred = rng.random((6, 8, 16, 16)) > 0.5
  gt = rng.random((6, 8, 16, 16)) > 0.6
  acc = metrics.init_accumulator()
  for p, g in zip(pred, gt):
    acc = jax.jit(metrics.update_accumulator)(acc, p, g)
  reference = metrics.referring_metrics(list(pred.reshape(-1, 16, 16)),
                                        list(gt.reshape(-1, 16, 16)))
  assert metrics.finalize_accumulator(acc) == pytest.approx(reference, rel=1e-6)
  # 24 batches of 2 x 1024 x 1024 with 2**21 - 3 union pixels each: 50,331,576 in all,
  # past float32's exact integers (2**24); the int32 words keep it exact.
  full = jnp.ones((2, 1024, 1024), bool).at[0, 0, :3].set(False)
  acc = metrics.init_accumulator()
  for _ in range(24):
    acc = jax.jit(metrics.update_accumulator)(acc, full, full)
  high, low = np.asarray(acc["union"])
  assert int(high) * 2**20 + int(low) == 24 * (2**21 - 3)
  assert metrics.finalize_accumulator(acc)["oIoU"] == 1.0


def test_masks_from_logits():
  logits = jnp.array([-1.0, 0.0, 1e-6, 0.5, 2.0])
  np.testing.assert_array_equal(metrics.masks_from_logits(logits),
                                [False, False, True, True, True])
  np.testing.assert_array_equal(metrics.masks_from_logits(logits, probability=0.7),
                                [False, False, False, False, True])  # logit(0.7) = 0.847


def test_resize_logits_to_original_matches_bilinear_resize():
  """Sample 0: random logits against jax.image.resize. Sample 1, the original protocol
  end to end: a 4 x 4 block of an 8 x 8 logit map, brought to 16 x 16, is an 8 x 8 block."""
  random_logits = np.random.default_rng(1).normal(size=(8, 8))
  block_logits = np.full((8, 8), -5.0)
  block_logits[:4, :4] = 5.0
  logits = jnp.asarray(np.stack([random_logits, block_logits]), jnp.float32)
  heights, widths = jnp.array([12, 16]), jnp.array([20, 16])
  resized = jax.jit(metrics.resize_logits_to_original, static_argnums=3)(
      logits, heights, widths, (24, 24))  # (2, 24, 24)
  assert resized.shape == (2, 24, 24)
  np.testing.assert_allclose(resized[0, :12, :20],
                             jax.image.resize(logits[0], (12, 20), "linear"), atol=1e-5)
  for b in range(2):
    h, w = int(heights[b]), int(widths[b])
    assert jnp.all(resized[b, h:] == -jnp.inf) and jnp.all(resized[b, :, w:] == -jnp.inf)
  gt = np.zeros((24, 24), bool)
  gt[:8, :8] = True
  pred = np.asarray(metrics.masks_from_logits(resized[1]))
  assert metrics.referring_metrics([pred], [gt])["mIoU"] == 1.0
