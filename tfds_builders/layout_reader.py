"""Readers for the on-disk layouts of the manual downloads (RRSIS-D, RefSegRS).

First stage of the data flow: raw files -> one example dict per sentence -> TFDS builders
(tfds_builders/) -> ArrayRecord -> grain pipeline (pipeline.py). The `rrsis_d` and
`synthetic_rrsis` builders both read through `rrsisd_examples`; `refsegrs` reads through
`refsegrs_examples`. Every example holds encoded bytes (the original JPEG, or a PNG when
the source had to be converted), so TFDS writes them without TensorFlow.

Real-data quirks are repaired or skipped, never silently: each one is recorded in a
`QuirkLog` with the split, the reason and the item's name.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import pickle
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

RRSISD_CATEGORIES = (
    "Expressway-Service-area", "Expressway-toll-station", "airplane", "airport",
    "baseballfield", "basketballcourt", "bridge", "chimney", "dam", "golffield",
    "groundtrackfield", "harbor", "overpass", "ship", "stadium", "storagetank",
    "tenniscourt", "trainstation", "vehicle", "windmill",
)  # category_id 0-19
RRSISD_REFS = "refs(unc).p"
RRSISD_INSTANCES = "instances.json"
RRSISD_IMAGES = "JPEGImages"
RRSISD_SPLITS = ("train", "val", "test")

REFSEGRS_IMAGES = "images"
REFSEGRS_MASKS = "masks"
REFSEGRS_PHRASES = {split: f"output_phrase_{split}.txt" for split in ("train", "val", "test")}
REFSEGRS_MASK_THRESHOLD = 50  # grayscale 0/255 masks: foreground > 50

# Quirks that drop an item, and quirks that are repaired while keeping it.
SKIP_REASONS = {
    "missing_image": "image file not found",
    "unreadable_image": "image file could not be decoded",
    "missing_annotation": "ref's ann_id has no annotation in instances.json",
    "undecodable_mask": "segmentation is not an RLE dict that pycocotools decodes",
    "missing_mask": "mask file not found or not decodable",
    "empty_expression": "expression is empty after stripping whitespace",
    "invalid_text": "expression is not valid Unicode text",
    "duplicate_sent_id": "sentence id already used by an earlier sentence",
    "malformed_ref": "ref entry lacks a field or has one of the wrong type",
    "unknown_split": "ref's split is not train, val or test",
}
REPAIR_REASONS = {
    "mask_resized_to_image": "mask size differed from the image: resized (nearest)",
    "image_converted_to_rgb": "image was not 8-bit RGB: converted to RGB uint8 (PNG)",
}


class LayoutError(ValueError):
  """An annotation file that cannot be read at all (the message names the file and why)."""


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked to import a global; annotation pickles hold builtin types only."""


class _BuiltinContainersUnpickler(pickle.Unpickler):
  """Admits lists, dicts, tuples, str, bytes, numbers, bool and None: those have their
  own pickle opcodes, so any request for a global (a class, a function) is refused."""

  def find_class(self, module: str, name: str):
    raise UnsafePickleError(
        f"Refusing to load {module}.{name}: annotation pickles may only hold builtin "
        "containers (list, dict, str, int). This file is not a plain refs pickle; get "
        "the original annotation file from the dataset's release.")


def load_builtin_pickle(path: str | Path) -> Any:
  """Unpickles `path`, refusing every global (no code can run while loading)."""
  with open(path, "rb") as f:
    return _BuiltinContainersUnpickler(f, encoding="utf-8").load()


@dataclasses.dataclass
class QuirkLog:
  """Items a builder skipped or repaired: (split, reason) -> names of the items."""

  items: dict[tuple[str, str], list[str]] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(list))
  # sentence id -> the item that used it first (TFDS keys must be unique within a split;
  # across splits a repeated id means leaked or mislabelled data).
  sent_ids: dict[int, str] = dataclasses.field(default_factory=dict)

  def claim_sent_id(self, split: str, sent_id: int, item: str) -> bool:
    """False (recorded as a duplicate) when `sent_id` was already used."""
    if sent_id in self.sent_ids:
      self.record(split, "duplicate_sent_id",
                  f"sent {sent_id} of {item} (first: {self.sent_ids[sent_id]})")
      return False
    self.sent_ids[sent_id] = f"{split} {item}"
    return True

  def record(self, split: str, reason: str, item: str) -> None:
    if reason not in SKIP_REASONS and reason not in REPAIR_REASONS:
      raise ValueError(f"Unknown quirk {reason!r}; add it to SKIP_REASONS or REPAIR_REASONS.")
    self.items[(split, reason)].append(item)

  def count(self, reason: str, split: str | None = None) -> int:
    return sum(len(names) for (s, r), names in self.items.items()
               if r == reason and split in (None, s))

  def summary(self, max_names: int = 5) -> list[str]:
    """One line per (split, reason): count, what it means and the first names."""
    lines = []
    for (split, reason), names in sorted(self.items.items()):
      kind = "skipped" if reason in SKIP_REASONS else "repaired"
      meaning = SKIP_REASONS.get(reason) or REPAIR_REASONS[reason]
      shown = ", ".join(names[:max_names]) + (", ..." if len(names) > max_names else "")
      lines.append(f"{split}: {kind} {len(names)} x {reason} ({meaning}): {shown}")
    return lines

  def to_json(self) -> dict[str, dict[str, list[str]]]:
    nested: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)
    for (split, reason), names in self.items.items():
      nested[split][reason] = list(names)
    return dict(nested)


def require_files(dataset: str, root: str | Path, names: list[str], instructions: str):
  """Raises FileNotFoundError listing every expected path under `root` that is absent."""
  root = Path(root)
  missing = [str(root / name) for name in names if not (root / name).exists()]
  if missing:
    raise FileNotFoundError(
        f"{dataset}: the manual download folder {root} lacks:\n  " + "\n  ".join(missing)
        + f"\n\nHow to get them and the exact layout:\n{instructions}")


def png_bytes(array: np.ndarray) -> bytes:
  """PNG encoding of a uint8 (H, W) or (H, W, 3) array."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
  """(H, W, 3) uint8 from any PIL mode. 16-bit data is scaled from its full 0-65535 range
  (value / 257), so the mapping does not depend on the image's content."""
  if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I (32-bit PNG decode of 16-bit)
    values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
    gray = np.round(values / 257.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(image.convert("RGB"))


def read_rgb_image(path: Path) -> tuple[bytes, int, int, str | None]:
  """Encoded RGB uint8 image for the `image` feature: (bytes, height, width, source mode
  if it had to be converted). RGB JPEG/PNG files are passed through untouched; other
  formats (TIFF) are re-encoded as PNG. Raises OSError when the file cannot be decoded."""
  data = path.read_bytes()
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # decodes fully, so truncated files fail here and not in training
    width, height = image.size
    if image.mode == "RGB" and image.format in ("JPEG", "PNG"):
      return data, height, width, None
    converted_from = None if image.mode == "RGB" else image.mode
    return png_bytes(to_rgb_uint8(image)), height, width, converted_from


def fit_mask_to_image(mask: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest-neighbour resize of a (h, w) 0/1 mask to (height, width)."""
  return np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))


def decode_rle(segmentation: Any) -> np.ndarray:
  """(h, w) uint8 0/1 mask from a COCO RLE (a dict, or a list of dicts that are merged),
  compressed (string counts) or uncompressed (list counts). Pixels equal to 1 are object.
  Raises ValueError for anything else (e.g. polygons)."""
  segments = segmentation if isinstance(segmentation, list) else [segmentation]
  if not segments or not all(isinstance(s, dict) and {"size", "counts"} <= s.keys()
                             for s in segments):
    raise ValueError(f"Expected RLE dicts with 'size' and 'counts', got {segmentation!r:.80}")
  rles = []
  for segment in segments:
    height, width = segment["size"]
    counts = segment["counts"]
    if isinstance(counts, list):
      rles.append(coco_mask.frPyObjects(segment, height, width))
    else:
      rles.append({"size": [height, width],
                   "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
  merged = coco_mask.merge(rles) if len(rles) > 1 else rles[0]
  return (coco_mask.decode(merged) == 1).astype(np.uint8)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
  """COCO compressed RLE of a (h, w) 0/1 mask, JSON-ready (string counts)."""
  rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------
# RRSIS-D: refs(unc).p + instances.json + JPEGImages/
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RrsisdAnnotations:
  refs: list[dict[str, Any]]  # the refs pickle, one dict per ref
  annotations: dict[int, dict[str, Any]]  # instances.json annotations by id


def read_rrsisd_annotations(root: str | Path) -> RrsisdAnnotations:
  """Raises LayoutError naming the file for annotation files that cannot be read at all;
  single bad entries are skipped later and counted."""
  root = Path(root)
  refs_path, instances_path = root / RRSISD_REFS, root / RRSISD_INSTANCES
  try:
    refs = load_builtin_pickle(refs_path)
  except UnsafePickleError:
    raise
  except Exception as error:  # pylint: disable=broad-except  # any non-pickle file
    raise LayoutError(f"{refs_path} is not a readable refs pickle ({type(error).__name__}: "
                      f"{error}); use the refs(unc).p of the dataset's release.") from None
  if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
    raise LayoutError(f"{refs_path} holds a {type(refs).__name__}, not a list of ref "
                      "dicts; use the refs(unc).p of the dataset's release.")
  try:
    instances = json.loads(instances_path.read_bytes())
  except json.JSONDecodeError as error:
    raise LayoutError(f"{instances_path}:{error.lineno}:{error.colno}: not valid JSON "
                      f"({error.msg}); use the instances.json of the dataset's release.") from None
  except UnicodeDecodeError as error:
    raise LayoutError(f"{instances_path}: not UTF-8 text ({error.reason} at byte "
                      f"{error.start}).") from None
  if not isinstance(instances, dict) or not isinstance(instances.get("annotations"), list):
    raise LayoutError(f"{instances_path} has no \"annotations\" list (COCO format expected).")
  annotations = {}
  for index, annotation in enumerate(instances["annotations"]):
    try:
      annotations[int(annotation["id"])] = annotation
    except (KeyError, TypeError, ValueError):
      raise LayoutError(f"{instances_path}: annotations[{index}] has no integer \"id\".") from None
  return RrsisdAnnotations(refs=refs, annotations=annotations)


def record_unknown_splits(annotations: RrsisdAnnotations, quirks: QuirkLog) -> None:
  """Counts the refs that no split generator will read (split not train/val/test)."""
  for ref in annotations.refs:
    split = ref.get("split")
    if split not in RRSISD_SPLITS:
      quirks.record(str(split), "unknown_split", f"ref {ref.get('ref_id')} "
                    f"({ref.get('file_name')})")


def valid_text(text: str) -> bool:
  """False for strings that cannot be written as UTF-8 (lone surrogates)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _load_image_and_mask(image_path: Path, mask: np.ndarray, split: str, item: str,
                         quirks: QuirkLog) -> dict[str, Any] | None:
  """Shared tail of both readers: image bytes, mask fitted to it, quirks recorded."""
  if not image_path.is_file():
    quirks.record(split, "missing_image", item)
    return None
  try:
    image, height, width, converted_from = read_rgb_image(image_path)
  except Exception as error:  # pylint: disable=broad-except
    # Any decoder failure skips this item only: OSError, SyntaxError, ValueError,
    # Image.DecompressionBombError (above PIL's pixel limit), MemoryError, ...
    quirks.record(split, "unreadable_image", f"{item} ({type(error).__name__})")
    return None
  if converted_from is not None:
    quirks.record(split, "image_converted_to_rgb", f"{item} ({converted_from})")
  if mask.shape != (height, width):
    quirks.record(split, "mask_resized_to_image",
                  f"{item} (mask {mask.shape[0]}x{mask.shape[1]}, image {height}x{width})")
    mask = fit_mask_to_image(mask, height, width)
  return dict(image=image, mask=png_bytes(mask), height=height, width=width)


def rrsisd_examples(root: str | Path, annotations: RrsisdAnnotations, split: str,
                    quirks: QuirkLog) -> Iterator[tuple[int, dict[str, Any]]]:
  """(sent_id, example) for each sentence of the refs in `split`."""
  root = Path(root)
  for index, ref in enumerate(annotations.refs):
    if ref.get("split") != split:
      continue
    try:
      item = f"ref {ref['ref_id']} ({ref['file_name']})"
      ids = dict(ref_id=int(ref["ref_id"]), image_id=int(ref["image_id"]),
                 category=int(ref["category_id"]))
      ann_id = int(ref["ann_id"])
      sentences = [(int(s["sent_id"]), s["raw"]) for s in ref["sentences"]]
      if not all(isinstance(raw, str) for _, raw in sentences):
        raise TypeError("sentence raw text is not a string")
    except (KeyError, TypeError, ValueError) as error:
      quirks.record(split, "malformed_ref", f"refs[{index}] ({type(error).__name__}: "
                    f"{error})")
      continue
    annotation = annotations.annotations.get(ann_id)
    if annotation is None:
      quirks.record(split, "missing_annotation", item)
      continue
    try:
      mask = decode_rle(annotation["segmentation"])
    except Exception:  # pylint: disable=broad-except  # any malformed RLE skips this ref
      quirks.record(split, "undecodable_mask", item)
      continue
    kept = []
    for sent_id, raw in sentences:
      expression = raw.strip()
      if not expression:
        quirks.record(split, "empty_expression", f"sent {sent_id} of {item}")
      elif not valid_text(expression):
        quirks.record(split, "invalid_text", f"sent {sent_id} of {item}")
      elif quirks.claim_sent_id(split, sent_id, item):
        kept.append((sent_id, expression))
    if not kept:
      continue
    loaded = _load_image_and_mask(root / RRSISD_IMAGES / ref["file_name"], mask, split,
                                  item, quirks)
    if loaded is None:
      continue
    for sent_id, expression in kept:
      yield sent_id, dict(loaded, expression=expression, sent_id=sent_id, **ids)


# ---------------------------------------------------------------------------------------
# RefSegRS: images/<id>.tif, masks/<id>.tif, output_phrase_{train,val,test}.txt
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RefsegrsTriplet:
  sent_id: int  # position over the train, val and test phrase files read in that order
  image_name: str  # <id> of images/<id>.tif and masks/<id>.tif
  expression: str


def read_refsegrs_phrases(root: str | Path) -> dict[str, list[RefsegrsTriplet]]:
  """Triplets per split from `<id> <expression>` lines (split at the first space)."""
  root = Path(root)
  triplets, sent_id = {}, 0
  for split, filename in REFSEGRS_PHRASES.items():
    triplets[split] = []
    # Undecodable bytes survive as surrogates, so that the line is skipped and counted
    # (invalid_text) instead of failing the whole file.
    text = (root / filename).read_bytes().decode("utf-8", errors="surrogateescape")
    for line in text.splitlines():
      if not line.strip():
        continue
      image_name, _, expression = line.strip().partition(" ")
      triplets[split].append(RefsegrsTriplet(sent_id, image_name, expression.strip()))
      sent_id += 1
  return triplets


def _read_refsegrs_mask(path: Path) -> np.ndarray | None:
  try:
    with Image.open(path) as mask:
      return (np.asarray(mask.convert("L")) > REFSEGRS_MASK_THRESHOLD).astype(np.uint8)
  except (OSError, SyntaxError, ValueError):
    return None


def refsegrs_examples(root: str | Path, triplets: dict[str, list[RefsegrsTriplet]],
                      split: str, quirks: QuirkLog) -> Iterator[tuple[int, dict[str, Any]]]:
  """(sent_id, example) per triplet. ref_id = sent_id (every triplet is its own ref);
  image_id = index of the image name in the sorted names of all splits."""
  root = Path(root)
  names = sorted({t.image_name for split_triplets in triplets.values() for t in split_triplets})
  image_ids = {name: index for index, name in enumerate(names)}
  for triplet in triplets[split]:
    item = f"{triplet.image_name}.tif (line sent_id {triplet.sent_id})"
    if not triplet.expression:
      quirks.record(split, "empty_expression", item)
      continue
    if not valid_text(triplet.expression):
      quirks.record(split, "invalid_text", item)
      continue
    mask = _read_refsegrs_mask(root / REFSEGRS_MASKS / f"{triplet.image_name}.tif")
    if mask is None:
      quirks.record(split, "missing_mask", item)
      continue
    loaded = _load_image_and_mask(root / REFSEGRS_IMAGES / f"{triplet.image_name}.tif",
                                  mask, split, item, quirks)
    if loaded is None:
      continue
    yield triplet.sent_id, dict(loaded, expression=triplet.expression,
                                ref_id=triplet.sent_id, sent_id=triplet.sent_id,
                                image_id=image_ids[triplet.image_name])
