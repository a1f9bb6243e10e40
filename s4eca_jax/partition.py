"""Which parameters train: regex rules from the config, the trainable/frozen split, and
parameter counts (the one function that counts them).

    mask = trainable_mask(params, config.trainable)   # first matching rule wins
    trainable, frozen = split(params, mask)           # two disjoint nested dicts
    grads = jax.grad(lambda t: loss(merge(t, frozen)))(trainable)

Paths are "/"-joined parameter names, e.g. "image_encoder/block_2/adapter/down/kernel".
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax
import jax
import numpy as np

ACTIONS = ("train", "freeze")


def flatten(tree: Any) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> Any:
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _check_rules(rules: Sequence[Sequence[str]]):
  for rule in rules:
    if len(rule) != 2 or rule[1] not in ACTIONS:
      raise ValueError(f"Trainable rule {tuple(rule)!r} must be (regex, action) with action in "
                       f"{ACTIONS}; see config.trainable.")


def rule_index(path: str, rules: Sequence[Sequence[str]]) -> int | None:
  """Index of the first rule whose regex matches the whole path, or None."""
  return next((i for i, (pattern, _) in enumerate(rules) if re.fullmatch(pattern, path)), None)


def trainable_mask(params: Any, rules: Sequence[Sequence[str]]) -> Any:
  """Tree of bools like `params`: True where the first matching rule says "train".

  Every leaf must match a rule; otherwise a ValueError names the unmatched leaves.
  """
  _check_rules(rules)
  flat = flatten(params)
  matches = {path: rule_index(path, rules) for path in flat}
  unmatched = [path for path, i in matches.items() if i is None]
  if unmatched:
    shown = "\n  ".join(unmatched[:20]) + ("\n  ..." if len(unmatched) > 20 else "")
    raise ValueError(f"{len(unmatched)} parameters match no rule in config.trainable:\n  "
                     f"{shown}\nAdd a (regex, 'train'|'freeze') rule that covers them.")
  return unflatten({path: rules[i][1] == "train" for path, i in matches.items()})


def split(params: Any, mask: Any) -> tuple[Any, Any]:
  """(trainable, frozen): two nested dicts holding disjoint subsets of the leaves."""
  flat, flat_mask = flatten(params), flatten(mask)
  trainable = {p: v for p, v in flat.items() if flat_mask[p]}
  frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
  return unflatten(trainable), unflatten(frozen)


def merge(trainable: Any, frozen: Any) -> Any:
  """Inverse of split."""
  return unflatten({**flatten(frozen), **flatten(trainable)})


def count_params(tree_or_leaves: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs) or list of leaves."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree_or_leaves)))


def describe(params: Any, rules: Sequence[Sequence[str]]) -> str:
  """A readable log of the split: leaves and parameters per rule, then the totals."""
  flat = flatten(params)
  by_rule = [[] for _ in rules]
  for path, leaf in flat.items():
    by_rule[rule_index(path, rules)].append(leaf)
  lines = [f"  {action:6s} {pattern!r}: {len(leaves)} leaves, {count_params(leaves):,} params"
           for (pattern, action), leaves in zip(rules, by_rule)]
  trainable = count_params([leaf for (_, action), leaves in zip(rules, by_rule)
                            if action == "train" for leaf in leaves])
  total = count_params(list(flat.values()))
  lines.append(f"  trainable {trainable:,} of {total:,} params ({100 * trainable / total:.2f}%)")
  return "Trainable split (first matching rule wins):\n" + "\n".join(lines)


def perturb_zero_leaves(params: Any, seed: int = 3, scale: float = 0.5) -> Any:
  """Every all-zero leaf (biases, the adapters' zero-initialised "up", the spatial conv)
  replaced by N(0, scale^2) noise, so that no path through the model is closed by a zero
  weight (tests of what reaches the output, bf16 agreement with live adapters)."""
  flat = flatten(params)
  rng = np.random.default_rng(seed)
  for path, leaf in sorted(flat.items()):
    if not np.any(np.asarray(leaf)):
      flat[path] = jax.numpy.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype)
  return unflatten(flat)
