"""Writes scenes of synthetic_rrsis in the RRSIS-D on-disk layout (JPEGImages/,
instances.json with RLE, refs(unc).p), which layout_reader.py reads back: the
`synthetic_rrsis` and `rrsis_d` builders build it with the same code as the real data.
Scene i of a split uses its own generator seeded with (seed, split, i), so the files do
not depend on how many processes draw them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
import tqdm

from tfds_builders import layout_reader
from tfds_builders.synthetic_rrsis import scenes

SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


def _write_scene(job: tuple[Path, str, int, int, int, int]) -> dict:
  """Draws scene i of a split, saves its JPEG; returns its image, annotation and ref."""
  root, split, i, ident, image_size, seed = job
  scene = scenes.make_scene(np.random.default_rng([seed, SPLIT_SEED[split], i]), image_size)
  target = scene.objects[scene.target]
  file_name = f"{ident:05d}.jpg"
  Image.fromarray(scene.image).save(root / layout_reader.RRSISD_IMAGES / file_name, quality=90)
  category_id = layout_reader.RRSISD_CATEGORIES.index(target.category)
  x0, y0, x1, y1 = target.box
  return {
      "image": {"id": ident, "file_name": file_name, "height": image_size,
                "width": image_size},
      "annotation": {"id": ident, "image_id": ident, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "segmentation": [layout_reader.encode_rle(target.mask)],
                     "area": target.area, "categories_id": category_id, "iscrowd": 0},
      "ref": {"image_id": ident, "split": split, "file_name": file_name,
              "category_id": category_id, "ann_id": ident, "ref_id": ident,
              "sent_ids": [ident],
              "sentences": [{"tokens": scene.expression.split(), "raw": scene.expression,
                             "sent_id": ident, "sent": scene.expression,
                             "type": scene.expression_type}]},
  }


def write_rrsis_layout(root: str | Path, *, num_train: int, num_val: int, num_test: int,
                       image_size: int, seed: int, progress: bool = True,
                       workers: int | None = None) -> Path:
  """Writes JPEGImages/NNNNN.jpg, instances.json and refs(unc).p under `root`, one ref
  (and sentence) per image, ids 1, 2, ... in train, val, test order. Each sentence also
  records its "type" (expressions.EXPRESSION_TYPES), which RRSIS-D readers ignore. refs(unc).p is
  written last, so its presence marks a complete layout.

  Scenes are drawn in `workers` processes (default: one per CPU core this process may
  use; 1: in this process).
  Every scene has its own seed, so the files do not depend on the number of workers.
  """
  root = Path(root)
  (root / layout_reader.RRSISD_IMAGES).mkdir(parents=True, exist_ok=True)
  counts = {"train": num_train, "val": num_val, "test": num_test}
  jobs = [(root, split, i, ident, image_size, seed) for ident, (split, i) in enumerate(
      ((split, i) for split, n in counts.items() for i in range(n)), start=1)]
  workers = min(workers or len(os.sched_getaffinity(0)), max(1, len(jobs) // 64))
  bar = lambda items: tqdm.tqdm(items, total=len(jobs), desc="synthetic scenes",
                                disable=not progress)
  if workers > 1:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      written = list(bar(pool.imap(_write_scene, jobs, chunksize=32)))
  else:
    written = list(bar(map(_write_scene, jobs)))
  categories = [{"id": i, "name": name} for i, name in enumerate(layout_reader.RRSISD_CATEGORIES)]
  (root / layout_reader.RRSISD_INSTANCES).write_text(json.dumps(
      {"images": [w["image"] for w in written],
       "annotations": [w["annotation"] for w in written], "categories": categories}))
  with open(root / layout_reader.RRSISD_REFS, "wb") as f:
    pickle.dump([w["ref"] for w in written], f, protocol=2)
  return root
