"""The optimizer of the trainable tree: global-norm clipping, AdamW, and the learning-rate
schedule (linear warmup, then cosine or step decay), all from `config.optimizer`.

    tx, schedule = make_optimizer(config.optimizer, total_steps)
    opt_state = tx.init(trainable)   # no state for frozen leaves (partition.split)
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to config.lr, then "cosine" decay (to lr * end_lr_ratio) or "step"
  decay (times step_decay at each fraction of total_steps in step_boundaries)."""
  warmup = min(config.warmup_steps, total_steps)
  if config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(
        config.lr, max(total_steps - warmup, 1), alpha=config.end_lr_ratio)
  elif config.schedule == "step":
    decay = optax.piecewise_constant_schedule(config.lr, {
        max(int(fraction * total_steps) - warmup, 0): config.step_decay
        for fraction in config.step_boundaries})
  else:
    raise ValueError(f"config.optimizer.schedule={config.schedule!r}; use 'cosine' or 'step'.")
  warmup_fn = optax.linear_schedule(0.0, config.lr, max(warmup, 1))
  return optax.join_schedules([warmup_fn, decay], [warmup])


def _decay_mask(params: Any) -> Any:
  # Weight decay on matrices, kernels and embeddings; not on biases, norms, LayerScale.
  return jax.tree.map(lambda leaf: leaf.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  """(optax chain for the trainable tree, its learning-rate schedule).

  Global-norm clipping (config.clip_norm; None or 0 disables) then AdamW.
  """
  schedule = make_schedule(config, total_steps)
  chain = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
  chain.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=_decay_mask))
  return optax.chain(*chain), schedule
