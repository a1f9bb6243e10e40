"""Benchmark of the trainer's train step and the eval forward on synthetic batches.

    python -m s4eca_jax.bench --config configs/rrsisd.py --batch_size 32 [--steps 20]
    python -m s4eca_jax.bench --config configs/rrsisd.py:variant=tiny --batch_size 8 \
        --matmul_size 512                                         # a CPU smoke run

Weights are stand-ins of the right shapes made on the host (run_setup.stand_in_params:
the model's own init compiles longer than the train step), so no checkpoint and no dataset
are needed. Compiles each step once, warms up, then times --steps steps each
with device synchronisation and prints images/s (median, min, max), model FLOPs per
image, MFU against a bf16 matmul rate measured in the same run on the same devices, and
peak device memory. Model FLOPs are XLA's count of the same step lowered with XLA
attention, so fused kernels (cuDNN, Pallas) are counted by the work they replace.
--json PATH also writes the numbers there.

--skeleton times only our image encoder as the train step's cost skeleton (bench.
skeleton_step: no adapters, frozen weights, forward + input gradient through every block),
the work the shared encoder probe times, with its FLOPs (XLA's count) and MFU.

--torch also times the PyTorch reference (s4eca_jax.torch_reference: the HF encoders and
our adapters and decoder in torch, random weights, AdamW on the same trainable parts) on
the same config and batch, eager and torch.compile'd (--notorch_compile: eager only), in
the same run, and prints JAX's images/s over torch's. On CUDA it runs under bf16
autocast where the config computes in bf16. Needs the test extra (torch, transformers).
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from s4eca_jax import cli, metrics, partition, roofline, run_setup, sharding
from s4eca_jax.models import layers, s4eca


def host_batch(config, batch_size: int) -> dict:
  """A random batch of the config's shapes, numpy (the same one for JAX and torch)."""
  rng = np.random.default_rng(0)
  side, length = config.image_size, config.max_length
  return {
      "image": rng.standard_normal((batch_size, side, side, 3), np.float32),
      "mask": (rng.random((batch_size, side, side)) > 0.7).astype(np.float32),
      "input_ids": rng.integers(1, 1000, (batch_size, length), dtype=np.int32),
      "attention_mask": np.ones((batch_size, length), np.int32),
  }


def timed(fn, args_fn, steps: int, warmup: int) -> tuple[list[float], object]:
  """(seconds per call, the last call's output); each call synchronised, args_fn(out)
  feeds the next call (the train step donates its state)."""
  out = None
  for _ in range(warmup):
    out = fn(*args_fn(out))
    jax.block_until_ready(out)
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    out = fn(*args_fn(out))
    jax.block_until_ready(out)
    seconds.append(time.perf_counter() - start)
  return seconds, out


def matmul_rate(size: int, steps: int) -> float:
  """bf16 FLOP/s of a size^3 matmul on one device, median of `steps` timed calls."""
  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = (jax.random.normal(k, (size, size), jnp.bfloat16) for k in keys)
  matmul = jax.jit(lambda a, b: a @ b)
  seconds, _ = timed(matmul, lambda _: (a, b), steps, 2)
  return 2 * size**3 / statistics.median(seconds)


def _for_flop_count(config: ml_collections.ConfigDict, mesh):
  """(config with XLA attention, a mesh of one CPU device where there is one) for XLA's
  FLOP count: fused kernels (cuDNN, Pallas) then count as the work they replace, and a
  GPU's lowered module gives no cost analysis (jax 0.11.2 counted 0 FLOPs on an H200);
  the count does not depend on the backend."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.attention = "xla"
  try:
    cpu = jax.devices("cpu")[:1]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the run's own devices
    cpu = None
  if cpu:
    mesh = sharding.make_mesh([(axis, 1) for axis in mesh.axis_names], devices=cpu)
  return config, mesh


def model_flops(config: ml_collections.ConfigDict, mesh, batch) -> float:
  """FLOPs of one train step (all devices) from XLA's cost analysis (_for_flop_count)."""
  config, mesh = _for_flop_count(config, mesh)
  data = sharding.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data), batch)
  setup = run_setup.build(config, mesh, total_steps=1000, abstract=True,
                          backend=mesh.devices.flat[0].platform)
  lowered = run_setup.make_train_step(setup, config).lower(setup.state, setup.frozen, batch)
  cost = lowered.cost_analysis() or {}
  return float(cost.get("flops", 0.0))


def skeleton_encoder(config: ml_collections.ConfigDict, backend: str | None = None):
  """The config's image encoder without its adapters."""
  return s4eca.build_model(config, backend).image_encoder.clone(adapter=None,
                                                                adapter_blocks=())


def skeleton_step(config: ml_collections.ConfigDict, mesh, backend: str | None = None):
  """Our image encoder as the cost skeleton of a train step, the work the shared encoder
  probe (ANCHOR.md) times: the config's encoder without adapters, its weights frozen (no
  weight gradients, stored in config.frozen_dtype, computed in the compute dtype), the
  forward pass and the input gradient back through every block.
  -> (jit(images, params) -> d loss / d images, abstract params, their shardings)."""
  encoder = skeleton_encoder(config, backend)
  side = config.image_size
  abstract = layers.abstract_params(encoder, jnp.zeros((1, side, side, 3), jnp.float32))
  frozen_dtype = run_setup.frozen_dtype(config, backend)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype), abstract)
  shardings = sharding.param_shardings(abstract, mesh, config.get("fsdp_min_size", 2**18))

  def loss(images, params):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # Pallas maps over it
      tokens = encoder.apply({"params": params}, images)["tokens"]
    return jnp.sum(jnp.square(tokens.astype(jnp.float32)))

  data = sharding.batch_sharding(mesh)
  step = jax.jit(jax.grad(loss), in_shardings=(data, shardings), out_shardings=data)
  return step, abstract, shardings


def run_skeleton(config: ml_collections.ConfigDict, batch_size: int, steps: int, warmup: int,
                 matmul_size: int) -> dict:
  """Times skeleton_step; prints images/s, XLA's FLOPs per image and MFU against a bf16
  matmul measured in the same run (the shared probe's measures, for our encoder)."""
  config.batch_size = batch_size
  mesh = sharding.make_mesh(config.mesh)
  devices = mesh.devices.size
  data = sharding.batch_sharding(mesh)
  step, abstract, shardings = skeleton_step(config, mesh)
  params = jax.device_put(run_setup.stand_in_values(abstract, config.seed), shardings)
  images = sharding.global_batch({"image": host_batch(config, batch_size)["image"]},
                                 data)["image"]
  print(f"bench --skeleton: our image encoder without adapters, frozen, forward + input "
        f"gradient; batch {batch_size}, image {config.image_size}, {devices} x "
        f"{jax.devices()[0].device_kind}, attention {config.model.attention}", flush=True)
  start = time.perf_counter()
  compiled = step.lower(images, params).compile()
  results = {"batch_size": batch_size, "devices": devices, "compile_s":
             time.perf_counter() - start, "device_kind": jax.devices()[0].device_kind}
  seconds, _ = timed(compiled, lambda _: (images, params), steps, warmup)
  results["skeleton"] = summary(seconds, batch_size)

  count_config, count_mesh = _for_flop_count(config, mesh)
  count_step, _, count_shardings = skeleton_step(count_config, count_mesh, "cpu")
  count_data = sharding.batch_sharding(count_mesh)
  cost = count_step.lower(
      jax.ShapeDtypeStruct(images.shape, images.dtype, sharding=count_data),
      run_setup.with_shardings(abstract, count_shardings)).cost_analysis() or {}
  mfu = add_mfu(results, float(cost.get("flops", 0.0)), results["skeleton"], batch_size,
                devices, matmul_size, steps)
  print(f"skeleton: {timed_text(results['skeleton'], steps, results['compile_s'])}")
  print(f"skeleton: {results['gflop_per_image']:.1f} GFLOP/image (XLA's count); {mfu}")
  return results


def summary(seconds: list[float], batch_size: int) -> dict:
  rates = [batch_size / s for s in seconds]
  return {"images_per_s_median": statistics.median(rates), "images_per_s_min": min(rates),
          "images_per_s_max": max(rates), "step_ms_median": 1e3 * statistics.median(seconds)}


def rates_text(timing: dict) -> str:
  """"X images/s median (min A, max B" of a summary(), the caller closes the bracket."""
  return (f"{timing['images_per_s_median']:.1f} images/s median (min "
          f"{timing['images_per_s_min']:.1f}, max {timing['images_per_s_max']:.1f}")


def timed_text(timing: dict, steps: int, compile_s: float) -> str:
  return (f"{rates_text(timing)}; {timing['step_ms_median']:.1f} ms/step over {steps} steps; "
          f"compile {compile_s:.0f} s)")


def add_mfu(results: dict, flops: float, timing: dict, batch_size: int, devices: int,
            matmul_size: int, steps: int) -> str:
  """Sets results' gflop_per_image, matmul_tflops (a bf16 matmul timed now) and mfu (None
  without a FLOP count) for the rate in `timing`; -> "bf16 N^3 matmul ... -> MFU m"."""
  results["gflop_per_image"] = flops / batch_size / 1e9
  results["matmul_tflops"] = matmul_rate(matmul_size, max(steps, 3)) / 1e12
  achieved = timing["images_per_s_median"] * flops / batch_size
  results["mfu"] = achieved / (results["matmul_tflops"] * 1e12 * devices) if flops else None
  mfu = f"{results['mfu']:.1%}" if flops else "unknown (XLA counted no FLOPs)"
  return (f"bf16 {matmul_size}^3 matmul {results['matmul_tflops']:.1f} TFLOP/s per device "
          f"in this run -> MFU {mfu}")


def peak_memory(compiled) -> tuple[float | None, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"], "device peak_bytes_in_use"
  memory = roofline.memory_of(compiled)
  return memory.get("total"), "compiled memory_analysis (no device memory stats here)"


def run(config: ml_collections.ConfigDict, batch_size: int, steps: int, warmup: int,
        matmul_size: int, with_eval: bool = True, torch_modes: tuple[str, ...] = (),
        profile_dir: str | None = None) -> dict:
  """JAX train (and eval) steps timed; torch_modes ("eager", "compiled") also time the
  PyTorch reference (torch_reference.benchmark) on the same config and batch; profile_dir:
  3 more train steps traced there with jax.profiler."""
  config.random_init_encoders = True  # no encoder folders read (the torch reference too)
  config.batch_size = batch_size
  mesh = sharding.make_mesh(config.mesh)
  devices = mesh.devices.size
  results = {"batch_size": batch_size, "devices": devices,
             "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}
  print(f"bench: batch {batch_size}, image {config.image_size}, {devices} x "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, compute "
        f"{config.model.compute_dtype}, attention {config.model.attention}", flush=True)
  start = time.perf_counter()
  setup = run_setup.build(config, mesh, total_steps=1000, stand_in=True)
  jax.block_until_ready(setup.state)
  results["build_s"] = time.perf_counter() - start
  print(f"bench: params and optimizer state made in {results['build_s']:.1f} s", flush=True)
  host = host_batch(config, batch_size)
  batch = sharding.global_batch(host, sharding.batch_sharding(mesh))

  start = time.perf_counter()
  lowered = run_setup.make_train_step(setup, config).lower(setup.state, setup.frozen, batch)
  results["lower_s"] = time.perf_counter() - start
  print(f"bench: train step traced and lowered in {results['lower_s']:.1f} s; compiling",
        flush=True)
  start = time.perf_counter()
  train_step = lowered.compile()
  results["compile_s"] = time.perf_counter() - start
  print(f"bench: train step compiled in {results['compile_s']:.1f} s", flush=True)
  first = jax.tree.map(jnp.copy, setup.state)  # the step donates its input state
  step_args = lambda out: (first if out is None else out[0], setup.frozen, batch)
  # Each step's input state is donated: only the last step's output is alive afterwards.
  seconds, (state, _) = timed(train_step, step_args, steps, warmup)
  results["train"] = summary(seconds, batch_size)
  results["peak_bytes"], results["peak_source"] = peak_memory(train_step)
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(3):
        state, _ = train_step(state, setup.frozen, batch)
      jax.block_until_ready(state)
    # The optimised HLO maps each traced op to the model code it came from (op_name).
    with open(os.path.join(profile_dir, "train_step.hlo.txt"), "w") as out:
      out.write(train_step.as_text())
    print(f"bench: 3 train steps traced to {profile_dir} (bench/profile_summary.py "
          "lists the device ops that took the time)", flush=True)

  if with_eval:
    threshold = config.get("mask_probability", 0.5)

    def eval_step(trainable, frozen, batch):
      logits = run_setup.forward(setup, partition.merge(trainable, frozen), batch)["logits"]
      return metrics.masks_from_logits(logits.astype(jnp.float32), threshold)

    eval_batch = {k: v for k, v in batch.items() if k != "mask"}
    eval_fn = jax.jit(eval_step).lower(state["params"], setup.frozen, eval_batch).compile()
    seconds, _ = timed(eval_fn, lambda _: (state["params"], setup.frozen, eval_batch), steps,
                       warmup)
    results["eval"] = summary(seconds, batch_size)

  mfu = add_mfu(results, model_flops(config, mesh, batch), results["train"], batch_size,
                devices, matmul_size, steps)
  print(f"train step: {timed_text(results['train'], steps, results['compile_s'])}")
  if with_eval:
    print(f"eval forward: {rates_text(results['eval'])})")
  print(f"model: {results['gflop_per_image']:.1f} GFLOP/image per train step; {mfu}")
  peak = results["peak_bytes"]
  print(f"peak memory: {peak / 2**30:.2f} GiB ({results['peak_source']})" if peak else
        "peak memory: unknown")
  if torch_modes:
    results["torch"] = run_torch(config, host, steps, warmup, with_eval, torch_modes, results)
  return results


def run_torch(config, host: dict, steps: int, warmup: int, with_eval: bool,
              modes: tuple[str, ...], jax_results: dict) -> dict:
  """The PyTorch reference on the same config and (host) batch; prints its rates and JAX's
  ratio."""
  batch_size = len(host["image"])
  try:
    from s4eca_jax import torch_reference  # pylint: disable=g-import-not-at-top  # torch is optional
  except ImportError as e:
    raise cli.UsageError(f"--torch needs PyTorch and transformers ({e}); install the test "
                         "extra: bash launch/setup.sh test") from e
  print(f"torch: the PyTorch reference (HF encoders, random weights), batch {batch_size}, "
        f"modes {', '.join(modes)}", flush=True)
  out = torch_reference.benchmark(config, host, steps, warmup, with_eval,
                                  compile_model="compiled" in modes)
  precision = "bf16 autocast" if out["autocast"] else "f32"
  for mode in ("eager", "compiled"):
    if mode not in out:
      continue
    timing = out[mode]
    for kind in ("train", "eval"):
      if kind not in timing:
        continue
      timing[kind] = summary(timing[kind], batch_size)
      ratio = jax_results[kind]["images_per_s_median"] / timing[kind]["images_per_s_median"]
      timing[kind]["jax_over_torch"] = ratio
      rate = timing[kind]
      print(f"torch {mode} {kind} ({out['device']}, {precision}): {rates_text(rate)}); "
            f"JAX / torch {ratio:.2f}x")
    peak = timing.get("peak_bytes")
    print(f"torch {mode}: first train call {timing['first_call_s']:.1f} s"
          + ("  (torch.compile compiles here)" if mode == "compiled" else "")
          + (f"; peak memory {peak / 2**30:.2f} GiB" if peak else ""))
  return out


FLAGS = cli.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs)."""
  cli.define_config()
  flags.DEFINE_integer("batch_size", None, "global batch (default: config.batch_size)")
  flags.DEFINE_integer("steps", 10, "timed steps")
  flags.DEFINE_integer("warmup", 2, "untimed steps after the compile")
  flags.DEFINE_integer("matmul_size", 8192, "side of the bf16 matmul that sets the rate")
  flags.DEFINE_bool("train_only", False, "skip the eval forward")
  flags.DEFINE_string("json", None, "also write the numbers to this JSON file")
  flags.DEFINE_bool("torch", False, "also time the PyTorch reference (s4eca_jax."
                    "torch_reference, HF encoders) on the same config and batch, eager and "
                    "torch.compile'd, and print JAX's ratio (needs the test extra)")
  flags.DEFINE_string("profile", None, "after the timed steps, trace 3 train steps to this "
                      "folder with jax.profiler (bench/profile_summary.py reads it)")
  flags.DEFINE_bool("torch_compile", True, "with --torch: also the torch.compile'd model")
  flags.DEFINE_bool("skeleton", False, "time only our image encoder as the train step's cost "
                    "skeleton (no adapters, frozen, forward + input gradient), the work the "
                    "shared encoder probe times, instead of the train and eval steps")


def main(argv) -> None:
  del argv
  config = run_setup.expand_paths(FLAGS.config)
  if FLAGS.skeleton:
    results = run_skeleton(config, FLAGS.batch_size or config.batch_size, FLAGS.steps,
                           FLAGS.warmup, FLAGS.matmul_size)
  else:
    results = run(config, FLAGS.batch_size or config.batch_size, FLAGS.steps, FLAGS.warmup,
                  FLAGS.matmul_size, not FLAGS.train_only,
                  (("eager", "compiled") if FLAGS.torch_compile else ("eager",)) if FLAGS.torch
                  else (), FLAGS.profile)
  if FLAGS.json:
    with open(FLAGS.json, "w") as out:
      json.dump(results, out, indent=1)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
