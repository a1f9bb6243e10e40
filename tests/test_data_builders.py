"""TFDS builders on folders made in the published layouts: RRSIS-D with real refs from
shared/data/rrsisd (generated images and instances.json), RefSegRS with generated TIFFs,
and synthetic_rrsis. Also: the restricted unpickler and the prepare CLI."""

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import tfds_builders
from s4eca_jax import prepare
from s4eca_jax.data import pipeline
from tfds_builders import layout_reader, layout_writer
from tfds_builders.synthetic_rrsis import expressions, scenes

SHARED_RRSISD = Path(__file__).resolve().parents[2] / "shared" / "data" / "rrsisd"
REAL_REFS = SHARED_RRSISD / layout_reader.RRSISD_REFS
SIZE = 40  # generated images are SIZE x SIZE unless a quirk says otherwise


def _random_mask(rng, height, width):
  mask = np.zeros((height, width), np.uint8)
  y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
  mask[y:y + height // 3, x:x + width // 4] = 1
  return mask


def _save(path: Path, array: np.ndarray, mode: str | None = None, format: str = "JPEG"):
  image = Image.fromarray(array)
  image = image.convert(mode) if mode else image
  image.save(path, format=format)


@pytest.fixture(scope="module")
def real_refs():
  if not REAL_REFS.exists():
    pytest.skip(f"real RRSIS-D refs not found at {REAL_REFS} (shared/ is a sibling of the repo)")
  return layout_reader.load_builtin_pickle(REAL_REFS)


@pytest.fixture(scope="module")
def rrsisd_folder(tmp_path_factory, real_refs):
  """Real refs (4 train, 3 val, 3 test) with generated images and RLE annotations; one
  ref per quirk. Returns (root, refs, expected masks by sent_id, quirk sent_ids)."""
  root = tmp_path_factory.mktemp("rrsisd")
  (root / "JPEGImages").mkdir()
  chosen = {"train": 7, "val": 3, "test": 3}
  refs = []
  for ref in real_refs:
    if chosen[ref["split"]]:
      chosen[ref["split"]] -= 1
      refs.append(ref)
  rng = np.random.default_rng(0)
  images, annotations, masks = [], [], {}
  quirks = {}
  for i, ref in enumerate(refs):
    height = width = SIZE
    pixels = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    path = root / "JPEGImages" / ref["file_name"]
    kind = ["size_mismatch", "grayscale", "cmyk", "rgba", "16bit", "unreadable", "missing",
            "no_annotation", "empty"][i] if i < 9 else "plain"
    quirks[kind] = ref
    if kind == "size_mismatch":  # like the 800x801 RRSIS-D images with 800x800 masks
      height = SIZE + 1
      _save(path, rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    elif kind == "grayscale":
      _save(path, pixels, "L")
    elif kind == "cmyk":
      _save(path, pixels, "CMYK")
    elif kind == "rgba":
      _save(path, np.dstack([pixels, np.full((SIZE, SIZE), 128, np.uint8)]), format="PNG")
    elif kind == "16bit":
      Image.fromarray(np.full((SIZE, SIZE), 257 * 200, np.uint16)).save(path, format="PNG")
    elif kind == "unreadable":
      path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif kind != "missing":
      _save(path, pixels)
    mask = _random_mask(rng, SIZE, SIZE)  # masks are SIZE x SIZE, like the RRSIS-D RLEs
    if kind == "empty":
      ref = dict(ref, sentences=[dict(ref["sentences"][0], raw="   ", sent="   ")])
      refs[i] = ref
    images.append({"id": ref["image_id"], "file_name": ref["file_name"], "height": SIZE,
                   "width": SIZE})
    if kind != "no_annotation":
      annotations.append({"id": ref["ann_id"], "image_id": ref["image_id"],
                          "segmentation": [layout_reader.encode_rle(mask)],
                          "area": int(mask.sum()), "categories_id": ref["category_id"]})
    masks[ref["sent_ids"][0]] = (mask if height == SIZE else
                                 layout_reader.fit_mask_to_image(mask, height, width))
  (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations}))
  with open(root / "refs(unc).p", "wb") as f:
    pickle.dump(refs, f, protocol=2)
  return root, refs, masks, quirks


@pytest.fixture(scope="module")
def rrsisd_built(rrsisd_folder, tmp_path_factory):
  root, *_ = rrsisd_folder
  data_dir = tmp_path_factory.mktemp("tfds_rrsisd")
  builder = tfds_builders.RrsisdBuilder(data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  return builder, data_dir


def test_real_refs_load_with_restricted_unpickler(real_refs):
  assert len(real_refs) == 17402
  splits = [ref["split"] for ref in real_refs]
  assert (splits.count("train"), splits.count("val"), splits.count("test")) == (12181, 1740, 3481)


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / "executed"

  class Exploit:
    def __reduce__(self):
      return (os.mkdir, (str(marker),))

  path = tmp_path / "refs(unc).p"
  path.write_bytes(pickle.dumps([{"ref_id": 1, "payload": Exploit()}], protocol=2))
  with pytest.raises(layout_reader.UnsafePickleError, match="posix.mkdir|os.mkdir"):
    layout_reader.load_builtin_pickle(path)
  assert not marker.exists()


def test_rrsisd_counts_ids_expressions_and_masks(rrsisd_folder, rrsisd_built):
  _, refs, masks, quirks = rrsisd_folder
  builder, data_dir = rrsisd_built
  skipped = {quirks[k]["ref_id"] for k in ("unreadable", "missing", "no_annotation", "empty")}
  kept = [ref for ref in refs if ref["ref_id"] not in skipped]
  for split in ("train", "val", "test"):
    expected = {ref["sent_ids"][0]: ref for ref in kept if ref["split"] == split}
    source = pipeline.open_split("rrsis_d", split, data_dir)
    assert len(source) == len(expected), split
    for example in source:
      ref = expected[example["sent_id"]]
      assert example["expression"].decode() == ref["sentences"][0]["raw"]
      assert (example["ref_id"], example["image_id"], example["category"]) == (
          ref["ref_id"], ref["image_id"], ref["category_id"])
      mask = np.asarray(Image.open(io.BytesIO(example["mask"])))
      np.testing.assert_array_equal(mask, masks[example["sent_id"]])
      image = Image.open(io.BytesIO(example["image"]))
      assert image.mode == "RGB" and image.size == (example["width"], example["height"])
  assert "tensorflow" not in sys.modules


def test_rrsisd_quirks_are_counted(rrsisd_folder, rrsisd_built):
  _, _, _, quirks = rrsisd_folder
  log = rrsisd_built[0].quirks
  for reason in ("missing_image", "unreadable_image", "missing_annotation",
                 "empty_expression", "mask_resized_to_image"):
    assert log.count(reason) == 1, (reason, log.summary())
  assert log.count("image_converted_to_rgb") == 4  # L, CMYK, RGBA, 16-bit
  converted = " ".join(log.to_json()[quirks["16bit"]["split"]]["image_converted_to_rgb"])
  assert "I;16" in converted or "(I)" in converted
  named = " ".join(line for line in log.summary())
  assert quirks["missing"]["file_name"] in named and quirks["unreadable"]["file_name"] in named


def test_rrsisd_converted_images_decode_as_rgb_uint8(rrsisd_folder, rrsisd_built):
  _, _, _, quirks = rrsisd_folder
  data_dir = rrsisd_built[1]
  ref = quirks["16bit"]
  decoded = tfds.data_source("rrsis_d", split=ref["split"], data_dir=data_dir, download=False)
  example = next(e for e in decoded if e["sent_id"] == ref["sent_ids"][0])
  assert example["image"].dtype == np.uint8 and example["image"].shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(example["image"], 200)  # 257 * 200 / 257
  assert example["mask"].shape == (SIZE, SIZE, 1)
  assert "tensorflow" not in sys.modules


def test_missing_manual_files_are_listed(tmp_path):
  (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([]))
  process = subprocess.run(
      [sys.executable, "-m", "s4eca_jax.prepare", "rrsis_d", "--manual_dir", str(tmp_path),
       "--data_dir", str(tmp_path / "d")], capture_output=True, text=True, check=False)
  assert process.returncode == 2, process.stderr
  assert "Traceback" not in process.stderr
  message = process.stderr
  assert str(tmp_path / "instances.json") in message and str(tmp_path / "JPEGImages") in message
  assert "refs(unc).p" not in message.split("How to get them")[0]
  assert "github.com/Lsan2401/RMSIN" in message


@pytest.fixture(scope="module")
def refsegrs_folder(tmp_path_factory):
  """8 triplets over the three phrase files; one missing image, one empty expression,
  one mask of another size. Masks hold 0, 40 (background: <= 50) and 255."""
  root = tmp_path_factory.mktemp("refsegrs")
  (root / "images").mkdir()
  (root / "masks").mkdir()
  rng = np.random.default_rng(1)
  lines = {"train": [], "val": [], "test": []}
  masks = {}
  for i in range(8):
    split = ["train", "train", "train", "train", "val", "val", "test", "test"][i]
    name = f"{100 + i}"
    expression = {5: "", 2: "the  road   on the left"}.get(i, f"vehicle number {i}")
    lines[split].append(f"{name} {expression}".rstrip())
    if i != 3:
      _save(root / "images" / f"{name}.tif", rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8),
            format="TIFF")
    mask_size = SIZE - 8 if i == 6 else SIZE
    gray = np.zeros((mask_size, mask_size), np.uint8)
    gray[2:10, 3:20] = 255
    gray[12:15, :] = 40
    _save(root / "masks" / f"{name}.tif", gray, format="TIFF")
    masks[name] = layout_reader.fit_mask_to_image((gray > 50).astype(np.uint8), SIZE, SIZE)
  for split, split_lines in lines.items():
    (root / f"output_phrase_{split}.txt").write_text("\n".join(split_lines) + "\n")
  return root, lines, masks


def test_refsegrs_builds_with_counts_masks_and_quirks(refsegrs_folder, tmp_path):
  root, lines, masks = refsegrs_folder
  builder = tfds_builders.RefsegrsBuilder(data_dir=str(tmp_path))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      "train": 3, "val": 1, "test": 2}
  assert "category" not in builder.info.features
  names = sorted(line.split(" ")[0] for split_lines in lines.values() for line in split_lines)
  expressions = {}
  for split in ("train", "val", "test"):
    for example in pipeline.open_split("refsegrs", split, tmp_path):
      name = names[example["image_id"]]
      expressions[name] = example["expression"].decode()
      assert example["ref_id"] == example["sent_id"] == int(name) - 100  # line order
      mask = np.asarray(Image.open(io.BytesIO(example["mask"])))
      np.testing.assert_array_equal(mask, masks[name])
      assert Image.open(io.BytesIO(example["image"])).format == "PNG"
  assert expressions["102"] == "the  road   on the left"  # split at the first space only
  assert expressions["100"] == "vehicle number 0"
  for reason in ("missing_image", "empty_expression", "mask_resized_to_image"):
    assert builder.quirks.count(reason) == 1, (reason, builder.quirks.summary())
  assert "tensorflow" not in sys.modules


def test_synthetic_scenes_need_the_expression():
  """Most targets have a same-category or same-colour distractor; the expression's
  description selects the target alone; hand-made scenes pick the right template."""
  with_distractor = 0
  for i in range(40):
    scene = scenes.make_scene(np.random.default_rng([7, 0, i]), 96)
    target = scene.objects[scene.target]
    others = [o for j, o in enumerate(scene.objects) if j != scene.target]
    with_distractor += any(o.category == target.category or o.colour == target.colour
                           for o in others)
    assert scene.expression in [text for text, _ in expressions.unique_descriptions(scene.objects, scene.target, 96)]
    assert len(scene.expression.split()) <= 20 and target.area > 0
    assert scenes.MIN_OBJECTS <= len(scene.objects) <= scenes.MAX_OBJECTS == 6
    assert not any((o.mask & target.mask).any() for o in others)
  assert with_distractor >= 30

  def vehicle(colour, x, y, side=4):
    mask = np.zeros((96, 96), np.uint8)
    mask[y:y + side, x:x + side] = 1
    return scenes.SceneObject("vehicle", colour, (x + side / 2, y + side / 2),
                                 (x, y, x + side, y + side), mask)

  red, blue = vehicle("red", 5, 40), vehicle("blue", 70, 42)
  texts = [text for text, _ in expressions.unique_descriptions((red, blue), 0, 96)]
  assert "The red vehicle" in texts and "The leftmost vehicle" in texts
  assert "The vehicle" not in texts and "The blue vehicle" not in texts
  big = vehicle("red", 60, 70, side=12)
  texts = [text for text, _ in expressions.unique_descriptions((red, big), 1, 96)]
  assert "The larger vehicle" in texts and "The red vehicle" not in texts


def test_synthetic_builder_is_deterministic_and_reads_like_rrsis_d(tmp_path):
  reports = []
  for run in ("a", "b"):
    reports.append(prepare.prepare("synthetic_rrsis", tmp_path / run, num_train=5, num_val=2,
                                   num_test=2, image_size=64, seed=3))
  name = "synthetic_rrsis/train5_val2_test2_64px_seed3"
  assert reports[0]["name"] == name and reports[0]["examples"] == {
      "train": 5, "val": 2, "test": 2}
  layout_a, layout_b = (Path(r["layout_dir"]) for r in reports)
  assert layout_a.parts[-2:] == ("train5_val2_test2_64px_seed3", "1.2.0")  # versioned
  for file in ("refs(unc).p", "instances.json", "JPEGImages/00007.jpg"):
    assert (layout_a / file).read_bytes() == (layout_b / file).read_bytes()
  refs = layout_reader.load_builtin_pickle(layout_a / "refs(unc).p")
  instances = json.loads((layout_a / "instances.json").read_text())
  rle_masks = {a["id"]: layout_reader.decode_rle(a["segmentation"]) for a in instances["annotations"]}
  by_sent = {ref["sent_ids"][0]: ref for ref in refs}
  for example in pipeline.open_split(name, "train", tmp_path / "a"):
    ref = by_sent[example["sent_id"]]
    assert example["expression"].decode() == ref["sentences"][0]["raw"]
    assert layout_reader.RRSISD_CATEGORIES[example["category"]] in scenes.CATEGORIES
    mask = np.asarray(Image.open(io.BytesIO(example["mask"])))
    np.testing.assert_array_equal(mask, rle_masks[ref["ann_id"]])
    assert mask.any()
  # The generated folder is an RRSIS-D layout: the real builder reads it the same way.
  builder = tfds_builders.RrsisdBuilder(data_dir=str(tmp_path / "as_rrsis_d"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(layout_a)))
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == reports[0]["examples"]
  other_seed = layout_writer.write_rrsis_layout(tmp_path / "c", num_train=1, num_val=1, num_test=1,
                                            image_size=64, seed=4, progress=False)
  assert ((other_seed / "JPEGImages/00001.jpg").read_bytes()
          != (layout_a / "JPEGImages/00001.jpg").read_bytes())


def test_synthetic_layout_does_not_depend_on_the_number_of_workers(tmp_path):
  layouts_written = [layout_writer.write_rrsis_layout(
      tmp_path / str(workers), num_train=120, num_val=4, num_test=4, image_size=64, seed=1,
      progress=False, workers=workers) for workers in (1, 2)]
  one, two = layouts_written
  assert ((one / layout_reader.RRSISD_INSTANCES).read_bytes()
          == (two / layout_reader.RRSISD_INSTANCES).read_bytes())
  # Same content; the pickle bytes differ only in memoised (shared) strings.
  assert (layout_reader.load_builtin_pickle(one / layout_reader.RRSISD_REFS)
          == layout_reader.load_builtin_pickle(two / layout_reader.RRSISD_REFS))
  images = sorted(p.name for p in (one / layout_reader.RRSISD_IMAGES).iterdir())
  assert len(images) == 128
  assert all((one / layout_reader.RRSISD_IMAGES / n).read_bytes()
             == (two / layout_reader.RRSISD_IMAGES / n).read_bytes() for n in images)
