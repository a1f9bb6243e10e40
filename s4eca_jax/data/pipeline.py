"""grain input pipeline: prepared TFDS splits -> model-ready numpy batches.

Data flow: `open_split` (tfds.data_source over ArrayRecord, random access, image and mask
left encoded) -> per-process shard -> seeded shuffle, reshuffled every epoch (train) ->
decode, resize to S x S (image bilinear, mask nearest), optional horizontal flip that
also swaps left/right words, normalise, tokenise -> batch -> threads / worker processes.
Iterators are grain `DatasetIterator`s: `get_state()` / `set_state(state)` checkpoint and
resume them exactly.

Train batch (`make_train_iterator`), B = per-process batch, S = image_size, L = the
tokenizer's max_length; every epoch is cut into full batches (drop remainder):

  image           float32 (B, S, S, 3)  RGB, (pixel / 255 - mean) / std
  mask            float32 (B, S, S)     1.0 = referred object
  input_ids       int32   (B, L)        tokenizer output, padded/truncated to L
  attention_mask  int32   (B, L)        1 = real token

Eval batch (`make_eval_iterator`): the train keys, plus

  valid           bool    (B,)          False for the padding that fills the last batches
  index           int64   (B,)          position in the data source (-1 for padding)
  sent_id, ref_id, image_id  int64 (B,) dataset ids (-1 for padding)

and, when `original_size=(H, W)` is given (the `original` evaluation protocol):

  mask_original   uint8   (B, H, W)     mask at its original h x w in the top-left
                                        corner, zeros elsewhere (H, W fixed: one jit shape)
  original_height int32   (B,)          h (0 for padding)
  original_width  int32   (B,)          w (0 for padding)

Eval visits every example once over all processes (process k takes indices k, k + P, ...)
and every process yields the same number of batches, so a multi-host eval step never
waits on a process that ran out. Padding examples are zeros with valid=False.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import flags as absl_flags
import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

import tfds_builders  # pylint: disable=unused-import  # registers the builders with tfds
from s4eca_jax import cli

Tokenizer = Callable[[list[str]], dict[str, np.ndarray]]  # e.g. text_tokenizer.TextTokenizer
Example = dict[str, Any]

_KEEP_ENCODED = {"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()}
_MIRRORED_WORDS = {"left": "right", "leftmost": "rightmost", "west": "east",
                   "western": "eastern", "westernmost": "easternmost",
                   "northwest": "northeast", "southwest": "southeast"}
_MIRRORED_WORDS.update({v: k for k, v in _MIRRORED_WORDS.items()})
_MIRRORED_PATTERN = re.compile(r"\b(" + "|".join(_MIRRORED_WORDS) + r")\b", re.IGNORECASE)


class SplitNotPrepared(cli.UsageError, FileNotFoundError):
  """A split that `python -m s4eca_jax.prepare` has not built in the data_dir: a usage
  error (exit 2), named with the command that builds it."""


def open_split(name: str, split: str, data_dir: str | Path) -> Sequence[Example]:
  """Random-access data source of a prepared split; `name` as in tfds, e.g. "rrsis_d" or
  "synthetic_rrsis/train64_val16_test16_128px_seed0". Image and mask stay encoded bytes
  (decoded in the pipeline, in its threads or worker processes)."""
  builder = tfds.builder(name, data_dir=data_dir)
  if split not in builder.info.splits:
    dataset = name.split("/")[0]
    raise SplitNotPrepared(
        f"Split {split!r} of {name} is not prepared in {data_dir} (found: "
        f"{sorted(builder.info.splits) or 'nothing'}). Build it with: python -m "
        f"s4eca_jax.prepare {dataset} --data_dir {data_dir} ... (see --help).")
  return builder.as_data_source(split, decoders=_KEEP_ENCODED)


def flip_expression(expression: str) -> str:
  """Swaps left/right (and west/east) words, keeping capitalisation, for a mirrored image."""

  def swap(match: re.Match) -> str:
    word = match.group(0)
    mirrored = _MIRRORED_WORDS[word.lower()]
    return mirrored.capitalize() if word[0].isupper() else mirrored

  return _MIRRORED_PATTERN.sub(swap, expression)


def resize_image(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
  """RGB (H, W, 3) uint8 -> (size, size, 3) uint8, bilinear (PIL, antialiased)."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))


def normalize_image(image: np.ndarray, mean: Sequence[float],
                    std: Sequence[float]) -> np.ndarray:
  """uint8 (..., 3) -> float32 (pixel / 255 - mean) / std, computed in two passes as
  pixel * scale + offset."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  normalized = np.multiply(image, 1.0 / (255.0 * std), dtype=np.float32)
  normalized += -mean / std
  return normalized


def _decode_rgb(data: bytes, size: int) -> np.ndarray:
  """(size, size, 3) uint8 from encoded bytes."""
  with Image.open(io.BytesIO(data)) as image:
    image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4, 1/8 when still >= size
    return resize_image(image, size)


def _decode_mask(data: bytes) -> np.ndarray:
  """(h, w) uint8 0/1."""
  with Image.open(io.BytesIO(data)) as mask:
    return np.asarray(mask, np.uint8).reshape(mask.height, mask.width)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


def example_text(value: bytes | str) -> str:
  """A record's text feature (bytes from tfds) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else value


def preprocess(example: Example, *, image_size: int, tokenizer: Tokenizer,
               mean: Sequence[float], std: Sequence[float], flip: bool = False) -> Example:
  """One data-source record -> the per-example train features (see module docstring)."""
  image = _decode_rgb(example["image"], image_size)  # (S, S, 3)
  mask = _resize_mask(_decode_mask(example["mask"]), image_size)  # (S, S)
  expression = example_text(example["expression"])
  if flip:
    image, mask, expression = image[:, ::-1], mask[:, ::-1], flip_expression(expression)
  tokens = tokenizer([expression])
  return {
      "image": normalize_image(image, mean, std),
      "mask": mask.astype(np.float32),
      "input_ids": tokens["input_ids"][0].astype(np.int32),
      "attention_mask": tokens["attention_mask"][0].astype(np.int32),
  }


def _process_defaults(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")
  return shard_index, shard_count


def _to_iterator(dataset: grain.MapDataset, worker_count: int, read_threads: int,
                 prefetch_buffer_size: int) -> grain.DatasetIterator:
  iterable = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    if not absl_flags.FLAGS.is_parsed():
      # grain reads its absl flags in mp_prefetch (google/grain#1355); scripts that do not
      # run under absl.app never parse them, so take the defaults.
      absl_flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                                    worker_init_fn=functools.partial(_die_with, os.getpid()))
  return iter(iterable)


def _die_with(trainer_pid: int, worker_index: int, worker_count: int) -> None:
  """In each worker process: end it once the trainer is gone, however the trainer ended
  (kill -9 included), instead of leaving it decoding for nobody."""
  del worker_index, worker_count

  def watch():
    while os.getppid() == trainer_pid:
      time.sleep(0.5)
    os._exit(0)  # pylint: disable=protected-access  # nothing to flush: a data worker

  threading.Thread(target=watch, name="die-with-trainer", daemon=True).start()


def _train_example(example: Example, rng: np.random.Generator, *, flip_probability: float,
                   **preprocess_kwargs) -> Example:
  return preprocess(example, flip=bool(rng.random() < flip_probability), **preprocess_kwargs)


def make_train_iterator(
    data_source: Sequence[Example], *, batch_size: int, image_size: int,
    tokenizer: Tokenizer, mean: Sequence[float], std: Sequence[float], seed: int,
    num_epochs: int | None = None, flip_probability: float = 0.0,
    shard_index: int | None = None, shard_count: int | None = None,
    worker_count: int = 0, read_threads: int = 8, prefetch_buffer_size: int = 64,
) -> grain.DatasetIterator:
  """Iterator over train batches (module docstring). `batch_size` is per process; the
  shuffle is global and seeded, different in every epoch; process k takes every
  shard_count-th element of it (defaults: jax.process_index() / process_count()).
  num_epochs=None repeats forever. worker_count > 0 decodes in that many processes."""
  shard_index, shard_count = _process_defaults(shard_index, shard_count)
  if len(data_source) < batch_size * shard_count:
    raise ValueError(f"{len(data_source)} examples cannot fill one global batch of "
                     f"{batch_size} x {shard_count} processes; lower batch_size.")
  dataset = grain.MapDataset.source(data_source).seed(seed).shuffle().repeat(num_epochs)
  dataset = dataset[shard_index::shard_count]
  dataset = dataset.random_map(functools.partial(
      _train_example, flip_probability=flip_probability, image_size=image_size,
      tokenizer=tokenizer, mean=tuple(mean), std=tuple(std)))
  dataset = dataset.batch(batch_size, drop_remainder=True)
  return _to_iterator(dataset, worker_count, read_threads, prefetch_buffer_size)


def _eval_example(position: int, *, data_source: Sequence[Example], shard_index: int,
                  shard_count: int, original_size: tuple[int, int] | None,
                  **preprocess_kwargs) -> Example:
  """Example at `position` of this process's padded shard."""
  index = shard_index + position * shard_count
  valid = index < len(data_source)
  if valid:
    example = data_source[index]
    features = preprocess(example, **preprocess_kwargs)
    ids = {key: np.int64(example[key]) for key in ("sent_id", "ref_id", "image_id")}
  else:
    size = preprocess_kwargs["image_size"]
    tokens = preprocess_kwargs["tokenizer"]([""])
    features = {"image": np.zeros((size, size, 3), np.float32),
                "mask": np.zeros((size, size), np.float32),
                "input_ids": tokens["input_ids"][0].astype(np.int32),
                "attention_mask": np.zeros_like(tokens["attention_mask"][0], np.int32)}
    ids = {key: np.int64(-1) for key in ("sent_id", "ref_id", "image_id")}
  features.update(ids, valid=np.bool_(valid), index=np.int64(index if valid else -1))
  if original_size is not None:
    canvas = np.zeros(original_size, np.uint8)  # (H, W)
    height = width = 0
    if valid:
      mask = _decode_mask(example["mask"])
      height, width = mask.shape
      if height > original_size[0] or width > original_size[1]:
        raise ValueError(f"Example {index} has a {height}x{width} mask, larger than "
                         f"original_size={original_size}; pass a larger original_size.")
      canvas[:height, :width] = mask
    features.update(mask_original=canvas, original_height=np.int32(height),
                    original_width=np.int32(width))
  return features


def make_eval_iterator(
    data_source: Sequence[Example], *, batch_size: int, image_size: int,
    tokenizer: Tokenizer, mean: Sequence[float], std: Sequence[float],
    original_size: tuple[int, int] | None = None,
    shard_index: int | None = None, shard_count: int | None = None,
    worker_count: int = 0, read_threads: int = 8, prefetch_buffer_size: int = 64,
) -> grain.DatasetIterator:
  """One pass over eval batches (module docstring): every example once over all
  processes, in data-source order, the last batches padded (valid=False) so that every
  process yields `eval_batch_count(...)` batches."""
  shard_index, shard_count = _process_defaults(shard_index, shard_count)
  num_batches = eval_batch_count(len(data_source), batch_size, shard_count)
  dataset = grain.MapDataset.range(num_batches * batch_size).map(functools.partial(
      _eval_example, data_source=data_source, shard_index=shard_index,
      shard_count=shard_count, original_size=original_size, image_size=image_size,
      tokenizer=tokenizer, mean=tuple(mean), std=tuple(std)))
  dataset = dataset.batch(batch_size)
  return _to_iterator(dataset, worker_count, read_threads, prefetch_buffer_size)


def eval_batch_count(num_examples: int, batch_size: int, shard_count: int) -> int:
  """Batches each process yields in one eval pass."""
  return math.ceil(math.ceil(num_examples / shard_count) / batch_size)
