"""Trainable/frozen split from regex rules, and the optimizer on the trainable tree only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s4eca_jax import optimizer, param_table, partition
from s4eca_jax.models import s4eca
from tests import run_fixtures

RULES = (
    (r"encoder/block_\d+/adapter/.*", "train"),
    (r"encoder/.*", "freeze"),
    (r"decoder/.*", "train"),
)


def _tree():
  ones = lambda *shape: jnp.ones(shape)
  return {
      "encoder": {"block_1": {"mlp": {"kernel": ones(4, 4), "bias": ones(4)},
                              "adapter": {"down": {"kernel": ones(4, 2), "bias": ones(2)}}},
                  "final_norm": {"scale": ones(4)}},
      "decoder": {"proj": {"kernel": ones(4, 3), "bias": ones(3)}},
  }


def test_first_matching_rule_wins_and_split_merges_back():
  params = _tree()
  flat_mask = partition.flatten(partition.trainable_mask(params, RULES))
  assert flat_mask == {
      "encoder/block_1/mlp/kernel": False, "encoder/block_1/mlp/bias": False,
      "encoder/block_1/adapter/down/kernel": True, "encoder/block_1/adapter/down/bias": True,
      "encoder/final_norm/scale": False,
      "decoder/proj/kernel": True, "decoder/proj/bias": True}
  trainable, frozen = partition.split(params, partition.unflatten(flat_mask))
  assert set(partition.flatten(trainable)) == {p for p, t in flat_mask.items() if t}
  assert set(partition.flatten(frozen)) == {p for p, t in flat_mask.items() if not t}
  merged = partition.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  text = partition.describe(params, RULES)
  assert "train" in text and "'decoder/.*': 2 leaves, 15 params" in text
  assert "trainable 25 of 49 params" in text


def test_unmatched_leaf_and_bad_action_are_named():
  with pytest.raises(ValueError, match="decoder/proj/kernel"):
    partition.trainable_mask(_tree(), RULES[:2])
  with pytest.raises(ValueError, match="action"):
    partition.trainable_mask(_tree(), ((r".*", "learn"),))


def _optimizer_config(**overrides):
  config = run_fixtures.config("rrsisd").optimizer
  config.update(overrides)
  return config


def test_frozen_leaves_get_no_gradient_and_no_optimizer_state():
  params = _tree()
  trainable, frozen = partition.split(params, partition.trainable_mask(params, RULES))
  tx, _ = optimizer.make_optimizer(_optimizer_config(warmup_steps=0, lr=0.1), total_steps=10)
  opt_state = tx.init(trainable)
  state_paths = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    state_paths.add("/".join(keys))
  state_paths.discard("")  # step counters
  assert state_paths == set(partition.flatten(trainable))  # mu/nu for trainable leaves only

  loss = lambda t: sum(jnp.sum(x**2) for x in jax.tree.leaves(partition.merge(t, frozen)))
  grads = jax.grad(loss)(trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  updates, _ = tx.update(grads, opt_state, trainable)
  new = optax.apply_updates(trainable, updates)
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(trainable)))


def test_weight_decay_skips_biases_and_norms():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  tx, _ = optimizer.make_optimizer(
      _optimizer_config(warmup_steps=0, lr=0.1, weight_decay=0.5, clip_norm=None), 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0.0
  assert float(updates["dense"]["kernel"][0, 0]) < 0.0


def test_schedules():
  cosine = optimizer.make_schedule(_optimizer_config(lr=1.0, warmup_steps=10), 110)
  np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  step = optimizer.make_schedule(
      _optimizer_config(lr=1.0, warmup_steps=0, schedule="step", step_boundaries=(0.5, 0.8),
                        step_decay=0.1), 100)
  np.testing.assert_allclose([step(10), step(60), step(90)], [1.0, 0.1, 0.01], rtol=1e-5)
  with pytest.raises(ValueError, match="schedule"):
    optimizer.make_schedule(_optimizer_config(schedule="linear"), 10)


@pytest.mark.parametrize("variant", ["full", "tiny"])
def test_config_rules_train_exactly_adapters_and_decoder(variant):
  config = run_fixtures.config("rrsisd", f"variant={variant}")
  shapes = s4eca.abstract_params(config)
  mask = partition.flatten(partition.trainable_mask(shapes, config.trainable))
  for path, trainable in mask.items():
    assert trainable == (param_table.group_of(path) in ("adapters", "decoder")), path


def test_config_rules_without_textual_adapter():
  config = run_fixtures.config("rrsisd", "variant=tiny")
  config.model.textual_adapter.enabled = False
  shapes = s4eca.abstract_params(config)
  assert "sentence_proxy" in shapes and "textual_adapter" not in shapes
  mask = partition.flatten(partition.trainable_mask(shapes, config.trainable))
  assert mask["sentence_proxy/kernel"]

