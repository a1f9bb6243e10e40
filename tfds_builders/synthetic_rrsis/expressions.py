"""The expression grammar of synthetic_rrsis: RRSIS-D-style descriptions of one object
among the others of a scene ("The red vehicle on the lower left", "The larger storage
tank", "The ship to the right of the bridge").

Every description is (text, predicate, type): the predicate says which objects the text
fits, and a description is kept only if exactly the target fits it. The type
(EXPRESSION_TYPES) is the cue it rests on. Objects are read through four attributes
(category, colour, center (x, y) in pixels, area), as scenes.SceneObject has them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

NOUNS = {
    "vehicle": "vehicle", "storagetank": "storage tank", "ship": "ship",
    "tenniscourt": "tennis court", "basketballcourt": "basketball court",
    "groundtrackfield": "ground track field", "baseballfield": "baseball field",
    "airplane": "airplane", "windmill": "windmill", "bridge": "bridge",
}
REGIONS = (("upper left", "top", "upper right"), ("left", "middle", "right"),
           ("lower left", "bottom", "lower right"))
REGION_PREPOSITION = {"top": "at the", "bottom": "at the", "middle": "in the"}
# What an expression rests on besides the noun: nothing ("The ship"), the colour, the
# relative size, or the position (image region, leftmost..., relation to another object).
EXPRESSION_TYPES = ("category", "colour", "size", "location")

SceneObject = Any  # anything with .category, .colour, .center and .area


def _region(obj: SceneObject, size: int) -> str | None:
  """3 x 3 grid cell of the object's centre, None within 4% of a cell border."""
  cells = []
  for coordinate in obj.center:
    cell = int(np.clip(coordinate * 3 // size, 0, 2))
    border_distance = min(abs(coordinate - size * k / 3) for k in (1, 2))
    if border_distance < 0.04 * size:
      return None
    cells.append(cell)
  return REGIONS[cells[1]][cells[0]]


def _region_phrase(region: str) -> str:
  return f"{REGION_PREPOSITION.get(region, 'on the')} {region}"


Description = tuple[str, Callable[[SceneObject], bool], str]


def _descriptions(objects: tuple[SceneObject, ...], target: SceneObject,
                  size: int) -> list[Description]:
  noun, category = NOUNS[target.category], target.category
  same = [o for o in objects if o.category == category]
  of_category = lambda predicate: (lambda o: o.category == category and predicate(o))
  candidates: list[Description] = [
      (f"The {noun}", of_category(lambda o: True), "category"),
      (f"The {target.colour} {noun}", of_category(lambda o: o.colour == target.colour),
       "colour"),
  ]
  region = _region(target, size)
  if region is not None:
    in_region = lambda o: _region(o, size) == region
    candidates += [
        (f"The {noun} {_region_phrase(region)}", of_category(in_region), "location"),
        (f"The {target.colour} {noun} {_region_phrase(region)}",
         of_category(lambda o: in_region(o) and o.colour == target.colour), "location"),
    ]
  if len(same) >= 2:
    areas = sorted(o.area for o in same)
    two = len(same) == 2
    if target.area == areas[-1] and areas[-1] >= 1.4 * areas[-2]:
      candidates.append((f"The {'larger' if two else 'largest'} {noun}",
                         of_category(lambda o: o.area == areas[-1]), "size"))
    if target.area == areas[0] and areas[1] >= 1.4 * areas[0]:
      candidates.append((f"The {'smaller' if two else 'smallest'} {noun}",
                         of_category(lambda o: o.area == areas[0]), "size"))
    for axis, (low, high) in ((0, ("leftmost", "rightmost")), (1, ("topmost", "bottommost"))):
      ordered = sorted(o.center[axis] for o in same)
      gap = 0.08 * size
      if target.center[axis] == ordered[0] and ordered[1] - ordered[0] >= gap:
        candidates.append((f"The {low} {noun}",
                           of_category(lambda o, a=axis, v=ordered[0]: o.center[a] == v),
                           "location"))
      if target.center[axis] == ordered[-1] and ordered[-1] - ordered[-2] >= gap:
        candidates.append((f"The {high} {noun}",
                           of_category(lambda o, a=axis, v=ordered[-1]: o.center[a] == v),
                           "location"))
  margin = 0.05 * size
  for anchor in objects:
    if anchor is target or sum(o.category == anchor.category for o in objects) != 1:
      continue  # "the bridge" must itself be unambiguous
    ax, ay = anchor.center
    relations = {
        "to the left of": lambda o: o.center[0] < ax - margin,
        "to the right of": lambda o: o.center[0] > ax + margin,
        "above": lambda o: o.center[1] < ay - margin,
        "below": lambda o: o.center[1] > ay + margin,
    }
    for phrase, relation in relations.items():
      if relation(target):
        candidates.append((f"The {noun} {phrase} the {NOUNS[anchor.category]}",
                           of_category(relation), "location"))
  return candidates


def unique_descriptions(objects: tuple[SceneObject, ...], target: int,
                         size: int) -> list[tuple[str, str]]:
  """(text, type) of every description that selects exactly objects[target]."""
  return [(text, kind) for text, predicate, kind in _descriptions(objects, objects[target], size)
          if [i for i, o in enumerate(objects) if predicate(o)] == [target]]
