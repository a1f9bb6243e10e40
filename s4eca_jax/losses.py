"""Segmentation losses on mask logits: BCE-with-logits + Dice, in f32, masked per example.

Called by the train step on the model's "logits" (B, H, W) and the ground-truth masks at
the input size; padded examples (valid = 0) contribute nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _masked_mean(per_example: jax.Array, valid: jax.Array) -> jax.Array:
  return (per_example * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def bce_per_example(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Mean pixel BCE-with-logits: (B, H, W), (B, H, W) -> (B,)."""
  return optax.sigmoid_binary_cross_entropy(logits, masks).mean(axis=(1, 2))


def dice_per_example(logits: jax.Array, masks: jax.Array, smooth: float = 1.0) -> jax.Array:
  """Soft Dice loss 1 - (2|P.M| + s) / (|P| + |M| + s): (B, H, W), (B, H, W) -> (B,)."""
  probs = jax.nn.sigmoid(logits)
  overlap = (probs * masks).sum(axis=(1, 2))
  total = probs.sum(axis=(1, 2)) + masks.sum(axis=(1, 2))
  return 1.0 - (2.0 * overlap + smooth) / (total + smooth)


def segmentation_loss(logits: jax.Array, masks: jax.Array, valid: jax.Array | None = None, *,
                      bce_weight: float = 1.0, dice_weight: float = 1.0):
  """bce_weight * BCE + dice_weight * Dice, averaged over valid examples.

  logits: (B, H, W) any float dtype; masks: (B, H, W) {0, 1}; valid: (B,) 1 for real
  examples, 0 for batch padding (None: all valid). Returns (loss, {"bce", "dice"}), f32.
  """
  if logits.shape != masks.shape:
    raise ValueError(f"logits {logits.shape} and masks {masks.shape} differ; resize the masks "
                     "to the model input size (the data pipeline's image_size).")
  logits, masks = logits.astype(jnp.float32), masks.astype(jnp.float32)
  valid = jnp.ones(logits.shape[:1]) if valid is None else valid.astype(jnp.float32)
  bce = _masked_mean(bce_per_example(logits, masks), valid)
  dice = _masked_mean(dice_per_example(logits, masks), valid)
  return bce_weight * bce + dice_weight * dice, {"bce": bce, "dice": dice}
