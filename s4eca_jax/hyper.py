"""Sweep points for config files: a config file may define `get_sweep(arg)` next to
`get_config(arg)`, returning a list of override dicts built with these helpers.

    from s4eca_jax import hyper

    def get_sweep(arg=None):
      return hyper.product(hyper.sweep("optimizer.lr", [1e-4, 3e-4]),
                           hyper.zipit(hyper.sweep("seed", [0, 1]),
                                       hyper.sweep("loss.dice_weight", [0.5, 1.0])))
    # -> 4 points: each lr with (seed 0, dice 0.5) and with (seed 1, dice 1.0)

Keys are dotted config fields, as in `--config.FIELD=VALUE`. `python -m s4eca_jax.sweep`
runs the points (or prints one command per point) and summarises them.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Iterable, Sequence

import ml_collections

Point = dict[str, Any]


def sweep(field: str, values: Iterable[Any]) -> list[Point]:
  """One field over values: [{field: v} for v in values]."""
  return [{field: value} for value in values]


def product(*axes: Sequence[Point]) -> list[Point]:
  """Every combination of one point from each axis (the first axis varies slowest)."""
  points = []
  for combination in itertools.product(*axes):
    merged = {}
    for point in combination:
      _merge_into(merged, point)
    points.append(merged)
  return points


def zipit(*axes: Sequence[Point]) -> list[Point]:
  """The i-th points of all axes merged; the axes must have the same length."""
  lengths = {len(axis) for axis in axes}
  if len(lengths) > 1:
    raise ValueError(f"zipit: axes of different lengths {sorted(lengths)}.")
  points = []
  for row in zip(*axes):
    merged = {}
    for point in row:
      _merge_into(merged, point)
    points.append(merged)
  return points


def _merge_into(merged: Point, point: Point) -> None:
  for key, value in point.items():
    if key in merged:
      raise ValueError(f"sweep field {key!r} set twice in one point; each axis of a "
                       "product/zipit must name different fields.")
    merged[key] = value


def apply(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """A copy of config with the point's dotted fields set; an unknown field is an error."""
  config = copy.deepcopy(config)
  for key, value in point.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent] if parent in node else None
      if not isinstance(node, ml_collections.ConfigDict):
        raise KeyError(f"sweep field {key!r}: config has no {parent!r} group.")
    if name not in node:
      raise KeyError(f"sweep field {key!r}: config has no field {name!r} (see the config "
                     "file's get_config).")
    node[name] = value
  return config


def point_name(index: int, point: Point) -> str:
  """Workdir name of a point: "03_lr=0.0003,seed=1" (last part of each dotted field)."""
  text = ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items())
  return f"{index:02d}_" + re.sub(r"[^A-Za-z0-9._=,+-]", "-", text)
