"""Benchmark: the trainer's jitted train step on synthetic batches (no dataset needed).

    python bench/train_step.py --config configs/rrsisd.py --batch_size 2 --steps 3
    python bench/train_step.py --config configs/rrsisd.py:variant=tiny --batch_size 16

Builds the step exactly as s4eca_jax.train does (frozen encoders random-initialised, the
trainable split, AdamW, donation, the config's mesh) and prints: compile time,
`compiled.memory_analysis()`, mean step time over --steps timed steps after one warm-up,
and images/s (--compile_only: stop after the memory analysis).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from s4eca_jax import run_setup, sharding


def load_config(spec: str):
  config = run_setup.config_from_file(spec)
  config.random_init_encoders = True
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/rrsisd.py", help="config[:arg]")
  parser.add_argument("--batch_size", type=int, default=2, help="global batch size")
  parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
  parser.add_argument("--compute_dtype", default=None, help="override model.compute_dtype")
  parser.add_argument("--remat", action="store_true",
                      help="rematerialise encoder blocks (image_encoder/text_encoder.remat)")
  parser.add_argument("--compile_only", action="store_true",
                      help="stop after compile and memory_analysis (sizes too big to run)")
  args = parser.parse_args()

  config = load_config(args.config)
  config.batch_size = args.batch_size
  if args.compute_dtype:
    config.model.compute_dtype = args.compute_dtype
  config.image_encoder.remat = config.text_encoder.remat = args.remat
  mesh = sharding.make_mesh(config.mesh)
  print(f"{args.config}: batch {args.batch_size}, image {config.image_size}, "
        f"compute {config.model.compute_dtype}, remat {args.remat}, "
        f"{jax.device_count()} {jax.default_backend()} device(s) "
        f"({jax.devices()[0].device_kind}), mesh {dict(mesh.shape)}", flush=True)
  setup = run_setup.build(config, mesh, total_steps=1000)
  step_fn = run_setup.make_train_step(setup, config)

  rng = np.random.default_rng(0)
  side, length = config.image_size, config.max_length
  batch = {
      "image": rng.standard_normal((args.batch_size, side, side, 3), np.float32),
      "mask": (rng.random((args.batch_size, side, side)) > 0.7).astype(np.float32),
      "input_ids": rng.integers(1, 1000, (args.batch_size, length), dtype=np.int32),
      "attention_mask": np.ones((args.batch_size, length), np.int32),
  }
  batch = sharding.global_batch(batch, sharding.batch_sharding(mesh))

  start = time.perf_counter()
  compiled = step_fn.lower(setup.state, setup.frozen, batch).compile()
  compile_s = time.perf_counter() - start
  print(f"compile: {compile_s:.1f} s", flush=True)
  memory = compiled.memory_analysis()
  if memory is not None:
    gib = lambda b: b / 2**30
    print(f"memory_analysis: arguments {gib(memory.argument_size_in_bytes):.2f} GiB, "
          f"outputs {gib(memory.output_size_in_bytes):.2f} GiB, temporaries "
          f"{gib(memory.temp_size_in_bytes):.2f} GiB, aliased "
          f"{gib(memory.alias_size_in_bytes):.2f} GiB, generated code "
          f"{memory.generated_code_size_in_bytes / 2**20:.1f} MiB", flush=True)

  if args.compile_only:
    return
  state = setup.state
  state, metrics = compiled(state, setup.frozen, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, setup.frozen, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = statistics.mean(times)
  print(f"step time: {step_s:.3f} s (mean of {args.steps}; min {min(times):.3f}, max "
        f"{max(times):.3f}); {args.batch_size / step_s:.2f} images/s; loss "
        f"{float(jnp.asarray(metrics['loss'])):.4f}")


if __name__ == "__main__":
  main()
