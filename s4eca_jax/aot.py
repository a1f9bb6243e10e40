"""Ahead-of-time compilation of the real train and eval steps for a TPU slice or the local
backend, with per-chip memory, cost, roofline and collectives. No weights, no data.

    JAX_PLATFORMS=cpu python -m s4eca_jax.aot --config configs/rrsisd.py --topology v5e-4 \
        [--batch_size 32] [--config.frozen_dtype=float32] [--fit=search]
    python -m s4eca_jax.aot --config configs/rrsisd.py --topology local   # this machine

--topology: `local` (jax's devices), a Cloud TPU name `v5e-256`, `v6e-8` (chips) or
`v5p-128`, `v4-8` (TensorCores, two per chip), or a shape `v5e:2x2`, `v5p:4x4x4`. TPU
targets need libtpu (`pip install s4eca-jax[tpu]`); XLA's TPU compiler then runs on this
host. The steps are the trainer's own (run_setup.build(abstract=True), make_train_step) on
the config's mesh; "auto" dtype and attention resolve for the target (bf16, Pallas flash
attention on TPU). The eval step is the forward pass to thresholded masks (the metric
sums on top are negligible).

The project's Pallas flash kernels (models/flash.py, sequences up to 2,048 keys) hand XLA
a cost estimate (FLOPs, transcendentals, bytes), so XLA's counts include them; the tool
says how many there are. Of jax's Pallas flash kernel (longer sequences) XLA counts the
forward once by the kernel's own estimate (its inputs and outputs, no re-reads) and the
two backward kernels as nothing: the tool adds the rest analytically from the kernels'
shapes in the compiled HLO and says so. Bytes are reported twice: XLA's "bytes accessed"
(operands in any memory space, TPU VMEM included) and an HBM estimate from the optimised
HLO's layouts (roofline.traffic_by_source(hbm_only=True)), each with its roofline. On v5e
and v5p the tool also sums the compiler's own per-op cycle estimates (`estimated_cycles` in
the optimised HLO) into a step time, our Pallas kernels by the compiler's static profile
of each compiled alone (kernel_profile), any it cannot price at their roofline
(roofline.time_by_source; `--time_top N` ranks the module paths by it). The
largest per-chip batch: `--fit=estimate` scales the temporaries linearly from this compile (one
compile); `--fit=search` bisects on real compiles.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from typing import Any

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server on a CPU host
# Compiling touches no TPU: several compiles (a test beside a run) may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from s4eca_jax import cli, kernel_profile, metrics, partition, roofline, run_setup, sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from s4eca_jax.roofline import GiB, Chip  # pylint: disable=g-import-not-at-top,wrong-import-position

def topology_shape(name: str) -> tuple[str, str]:
  """`v5e-256` or `v5e:16x16` -> ("v5e", "16x16")."""
  if ":" in name:
    generation, shape = name.split(":", 1)
    return generation, shape
  match = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
  if not match:
    raise ValueError(f"--topology={name!r}: use local, GEN-COUNT (v5e-4, v5e-256, v5p-128, "
                     "v6e-8, v4-8) or GEN:SHAPE (v5e:2x2, v5p:4x4x4).")
  generation, count = match.group(1), int(match.group(2))
  chips = count if generation in roofline.TWO_D else count // 2
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"--topology={name!r}: {chips} chips is not a power of two.")
  dims = [1, 1] if generation in roofline.TWO_D else [1, 1, 1]
  i = 0
  while math.prod(dims) < chips:  # grow the axes in turn: 2x2, 2x4, 4x4, ...
    dims[i % len(dims)] *= 2
    i += 1
  # Ascending, as slices are named (2x2x4, 4x4x8), with a 1 last (2x2x1): the shape must
  # divide by the hosts' 2x2x1 chips.
  dims = sorted(d for d in dims if d > 1) + [d for d in dims if d == 1]
  return generation, "x".join(map(str, dims))


def target_devices(topology: str):
  """Devices to compile for: jax's own, or a TPU slice's from libtpu's topology."""
  if topology == "local":
    return jax.devices()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top  # libtpu only

  generation, shape = topology_shape(topology)
  try:
    return topologies.get_topology_desc(
        platform="tpu", topology_name=f"{generation}:{shape}", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
  except Exception as error:  # pylint: disable=broad-except
    raise SystemExit(f"error: no TPU topology {generation}:{shape} ({error}). TPU targets "
                     "need libtpu: pip install 's4eca-jax[tpu]'.") from None


# --------------------------------------------------------------------------------------
# Compiling the steps
# --------------------------------------------------------------------------------------


def abstract_batch(config, batch_size: int, mesh, train_batch: bool) -> dict:
  side, length = config.image_size, config.max_length
  data = sharding.batch_sharding(mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct((batch_size,) + shape, dtype, sharding=data)
  batch = {"image": spec((side, side, 3), jnp.float32),
           "input_ids": spec((length,), jnp.int32), "attention_mask": spec((length,), jnp.int32)}
  if train_batch:
    batch["mask"] = spec((side, side), jnp.float32)
  return batch


def compile_steps(config, devices, batch_size: int, *, with_eval: bool = True):
  """{"train": compiled, "eval": compiled} for `batch_size` images over `devices`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  backend = devices[0].platform
  setup = run_setup.build(config, mesh, total_steps=1000, abstract=True, backend=backend)
  compiled = {}
  start = time.perf_counter()
  step = run_setup.make_train_step(setup, config)
  compiled["train"] = step.lower(setup.state, setup.frozen,
                                 abstract_batch(config, batch_size, mesh, True)).compile()
  compiled["train_seconds"] = time.perf_counter() - start
  if with_eval:
    threshold = config.get("mask_probability", 0.5)

    def eval_step(trainable, frozen, batch):
      logits = run_setup.forward(setup, partition.merge(trainable, frozen), batch)["logits"]
      return metrics.masks_from_logits(logits.astype(jnp.float32), threshold)

    start = time.perf_counter()
    data = sharding.batch_sharding(mesh)
    compiled["eval"] = jax.jit(
        eval_step, in_shardings=(setup.state_shardings["params"], setup.frozen_shardings,
                                 data), out_shardings=data).lower(
            setup.state["params"], setup.frozen,
            abstract_batch(config, batch_size, mesh, False)).compile()
    compiled["eval_seconds"] = time.perf_counter() - start
  return compiled, mesh


# --------------------------------------------------------------------------------------
# Reading the executable: memory, cost, Pallas kernels, collectives
# --------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def describe(name: str, compiled, batch_size: int, chips: int, chip: Chip | None,
             traffic_top: int = 0, hlo_dir: str | None = None,
             time_top: int = 0, kernel_cycles: dict | None = None) -> tuple[list[str], dict]:
  """Lines of the per-chip table for one compiled step, and its numbers; with `hlo_dir`,
  the step's optimised HLO is also written there. kernel_cycles: kernel_profile.cycles's
  prices of the Pallas kernels (others: their roofline)."""
  memory, cost = roofline.memory_of(compiled), roofline.cost_of(compiled)
  hlo = compiled.as_text()
  lines = []
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    path = os.path.join(hlo_dir, f"{name}_step.hlo.txt")
    with open(path, "w") as f:
      f.write(hlo)
    lines.append(f"  {name} step HLO: {path}")
  kernels = roofline.flash_kernels_of(hlo)
  added = roofline.flash_addition(kernels)
  flops, traffic = cost["flops"] + added["flops"], cost["bytes"] + added["bytes"]
  per_chip_images = batch_size / chips
  lines.insert(0, f"{name} step: {batch_size} images, {per_chip_images:g} per chip")
  if memory:
    hbm = f" of {chip.hbm_bytes / GiB:.0f} GiB HBM" if chip else ""
    lines.append(
        f"  memory per chip: arguments {memory['arguments'] / GiB:.2f} GiB, temporaries "
        f"{memory['temporaries'] / GiB:.2f} GiB, outputs {memory['outputs'] / GiB:.2f} GiB "
        f"(aliased {memory['aliased'] / GiB:.2f}), total {memory['total'] / GiB:.2f} GiB{hbm}")
  lines.append(f"  per chip: {flops / 1e12:.3f} TFLOP, {traffic / 1e9:.2f} GB accessed; per "
               f"image: {flops / per_chip_images / 1e9:.1f} GFLOP, "
               f"{traffic / per_chip_images / 1e9:.2f} GB")
  own = roofline.own_kernels_of(hlo)
  if own:
    lines.append(f"  in these counts: the project's {own['forward']} forward and {own['backward']} "
                 f"backward Pallas flash kernels (flash.py), by the cost estimates they give XLA")
  if kernels:
    lines.append(f"  of which added analytically for {added['kernels']} Pallas flash-attention "
                 f"kernels (XLA's cost analysis does not see inside them): "
                 f"{added['flops'] / 1e12:.3f} TFLOP, {added['bytes'] / 1e9:.2f} GB")
  hbm_by_source = roofline.traffic_by_source(hlo, hbm_only=True)
  hbm_traffic = sum(hbm_by_source.values()) + added["bytes"]
  lines.append(f"  HBM traffic per chip (estimate from the HLO's layouts: operands and results "
               f"of top-level ops outside on-chip memory, async copies by their HBM side; a "
               f"sliced operand counts whole): {hbm_traffic / 1e9:.2f} GB; XLA's "
               f"\"accessed\" above also counts on-chip (VMEM) accesses")
  numbers = {"memory": memory, "flops": flops, "bytes": traffic, "added": added, "own": own,
             "hbm_bytes": hbm_traffic}
  if chip:
    compute_s = flops / chip.bf16_flops
    for label, moved, key in (("roofline", traffic, "roofline_images_per_s"),
                              ("roofline with the HBM estimate", hbm_traffic,
                               "hbm_roofline_images_per_s")):
      memory_s = moved / chip.hbm_bandwidth
      step_s = max(compute_s, memory_s)
      bound = "memory traffic" if memory_s > compute_s else "compute"
      lines.append(f"  {label}: compute {compute_s * 1e3:.1f} ms, memory {memory_s * 1e3:.1f} "
                   f"ms -> {step_s * 1e3:.1f} ms/step, {batch_size / step_s:.0f} images/s "
                   f"({per_chip_images / step_s:.0f} per chip), bound by {bound}")
      numbers[key] = batch_size / step_s
  times = roofline.time_by_source(hlo, chip, kernel_cycles=kernel_cycles) if (
      chip and chip.clock_hz) else None
  if times is not None:
    kernel_s, step_s = roofline.kernel_seconds(times), sum(times.values())
    profiled_s = roofline.kernel_seconds(times, profiled=True)
    lines.append(f"  XLA's per-op cost model: {(step_s - kernel_s) * 1e3:.1f} ms of ops "
                 f"(the compiler's estimated cycles at {chip.clock_hz / 1e9:g} GHz, one op "
                 f"after another) + {kernel_s * 1e3:.1f} ms of Pallas kernels ("
                 f"{profiled_s * 1e3:.1f} ms by the static profile of each kernel compiled "
                 f"alone, {(kernel_s - profiled_s) * 1e3:.1f} ms at the roofline of their "
                 f"cost estimates, a lower bound) -> {step_s * 1e3:.1f} ms/step, "
                 f"{batch_size / step_s:.0f} images/s ({per_chip_images / step_s:.0f} per chip)")
    numbers["model_seconds"], numbers["model_kernel_seconds"] = step_s, kernel_s
    numbers["model_profiled_kernel_seconds"] = profiled_s
    numbers["model_images_per_s"] = batch_size / step_s
  if cost.get("optimal_seconds", 0) > 0:  # negative where the model cannot price the step
    lines.append(f"  XLA's own estimate of the step (cost model, Pallas kernels not included): "
                 f"{cost['optimal_seconds'] * 1e3:.1f} ms")
    numbers["xla_optimal_seconds"] = cost["optimal_seconds"]
  collectives = roofline.collectives_of(hlo)
  if collectives:
    lines.append("  collectives: " + ", ".join(
        f"{kind} x{count} ({size / 2**20:.1f} MiB)" for kind, (count, size)
        in sorted(collectives.items())))
  else:
    lines.append("  collectives: none")
  numbers["collectives"] = collectives
  if traffic_top:
    for by_source, what in ((roofline.traffic_by_source(hlo), "traffic by module (operands "
                             "+ result of each top-level HLO op, any memory space"),
                            (hbm_by_source, "HBM traffic by module (the estimate above")):
      total = sum(by_source.values())
      lines.append(f"  {what}, {total / 1e9:.2f} GB in all, without Pallas re-reads), top "
                   f"{traffic_top}:")
      for source, moved in sorted(by_source.items(), key=lambda kv: -kv[1])[:traffic_top]:
        lines.append(f"    {moved / 1e9:8.2f} GB  {moved / total:5.1%}  {source}")
  if time_top and times is None:
    lines.append("  time by module: no cycle model for this target (--time_top needs TPU v5e or "
                 "v5p)")
  elif time_top:
    total = sum(times.values())
    lines.append(f"  time by module (XLA's per-op cost model, as above; {total * 1e3:.1f} ms in "
                 f"all), top {time_top}:")
    for source, seconds in sorted(times.items(), key=lambda kv: -kv[1])[:time_top]:
      lines.append(f"    {seconds * 1e3:8.2f} ms  {seconds / total:5.1%}  {source}")
  return lines, numbers


def fits(memory: dict, chip: Chip | None) -> bool:
  return chip is None or not memory or memory["total"] <= chip.hbm_bytes


def largest_batch(config, devices, per_chip: int, memory: dict, chip: Chip | None,
                  mode: str) -> str:
  """The largest per-chip batch that fits, by linear estimate or by bisection on compiles."""
  if chip is None or not memory:
    return "largest batch: unknown (no HBM size for this device)"
  chips = len(devices)
  fixed = memory["total"] - memory["temporaries"]
  per_image = memory["temporaries"] / per_chip
  estimate = int((chip.hbm_bytes - fixed) // per_image) if per_image else 0
  if mode == "estimate":
    return (f"largest per-chip batch (estimate: temporaries scaled linearly from this "
            f"compile, {per_image / 2**20:.1f} MiB/image, {fixed / GiB:.2f} GiB fixed): "
            f"{estimate}")
  def ok(n):
    try:
      compiled, _ = compile_steps(config, devices, n * chips, with_eval=False)
    except Exception as error:  # pylint: disable=broad-except  # out of HBM at compile time
      print(f"    per-chip batch {n}: does not compile ({str(error).splitlines()[0][:120]})",
            flush=True)
      return False
    total = roofline.memory_of(compiled["train"]).get("total", 0)
    print(f"    per-chip batch {n}: total {total / GiB:.2f} GiB", flush=True)
    return total <= chip.hbm_bytes
  lo, hi = (per_chip, None) if fits(memory, chip) else (0, per_chip)
  if hi is None:
    probe = max(estimate, lo + 1)
    while ok(probe):
      lo, probe = probe, probe * 2
    hi = probe
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return f"largest per-chip batch (search by compiles): {lo}"


def run(config, topology: str, batch_size: int | None, fit: str = "estimate",
        with_eval: bool = True, traffic_top: int = 0,
        hlo_dir: str | None = None, time_top: int = 0,
        profile_kernels: bool = True) -> dict[str, Any]:
  """Compiles the steps, prints the table; returns its numbers. profile_kernels: on v5e
  and v5p, price the Pallas kernels that record themselves by the compiler's static
  profile (kernel_profile: a child process, restarted after a kernel that aborts it; 76-97 s
  for the rrsisd train step's six depthwise and six flash calls on this 2-core host)."""
  if topology != "local" and not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # a CPU host compiling for TPU
  devices = target_devices(topology)
  chip_name, chip = roofline.chip_of(devices[0])
  batch_size = batch_size or config.batch_size
  chips = math.prod(dict(sharding.make_mesh(config.mesh, devices).shape).values())
  if batch_size % chips:
    raise SystemExit(f"error: batch {batch_size} is not divisible by the {chips} chips.")
  kernel_profile.CALLS.clear()  # the kernels of these steps only
  compiled, mesh = compile_steps(config, devices, batch_size, with_eval=with_eval)
  print(f"target {topology}: {chips} x {devices[0].device_kind} ({chip_name or 'unknown'}), "
        f"mesh {dict(mesh.shape)}; jax {jax.__version__}; compile: train "
        f"{compiled['train_seconds']:.0f} s" + (
            f", eval {compiled['eval_seconds']:.0f} s" if with_eval else ""))
  if chip:
    print(f"  {chip_name}: {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
          f"{chip.hbm_bandwidth / 1e9:.0f} GB/s HBM, {chip.hbm_bytes / GiB:.0f} GiB (datasheet)")
  kernel_cycles = None
  if profile_kernels and topology != "local" and chip and chip.clock_hz and (
      kernel_profile.CALLS):
    start = time.time()
    try:
      kernel_cycles, failures = kernel_profile.cycles(":".join(topology_shape(topology)))
    except (OSError, subprocess.SubprocessError, ValueError) as error:  # the child's output
      kernel_cycles, failures = {}, [f"the profiling child failed: {error}"]
    print(f"  Pallas kernels priced by the compiler's static profile, each compiled alone: "
          f"{len(kernel_cycles)} of {len(kernel_profile.CALLS)} recorded "
          f"({time.time() - start:.0f} s)" + "".join(f"; not priced: {f}" for f in failures))
  results = {"chips": chips, "chip": chip_name, "batch_size": batch_size}
  for name in ("train", "eval") if with_eval else ("train",):
    lines, numbers = describe(name, compiled[name], batch_size, chips, chip, traffic_top,
                              hlo_dir, time_top, kernel_cycles)
    print("\n".join(lines))
    results[name] = numbers
  memory = results["train"]["memory"]
  results["fit"] = largest_batch(config, devices, batch_size // chips, memory, chip, fit)
  print(results["fit"], flush=True)
  return results


FLAGS = cli.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs)."""
  cli.define_config()
  flags.DEFINE_string("topology", "local", "local, v5e-4, v5e-256, v5p-128, v5e:2x2, ...")
  flags.DEFINE_integer("batch_size", None, "global batch (default: config.batch_size)")
  flags.DEFINE_enum("fit", "estimate", ["estimate", "search"],
                    "largest per-chip batch: linear estimate or bisection on compiles")
  flags.DEFINE_bool("train_only", False, "skip the eval step")
  flags.DEFINE_string("hlo_dir", None, "also write each step's optimised HLO text there")
  flags.DEFINE_integer("traffic_top", 0, "also list the N module paths (forward/backward) "
                       "that move the most bytes, in any memory space and in HBM only")
  flags.DEFINE_integer("time_top", 0, "also list the N module paths (forward/backward) that "
                       "take the most time by XLA's per-op cost model (TPU v5e, v5p)")
  flags.DEFINE_bool("profile_kernels", True, "v5e, v5p: price the Pallas kernels that allow "
                    "it by the compiler's static profile, each compiled alone in a child "
                    "process (one to two minutes); --noprofile_kernels: all at their roofline")


def main(argv) -> None:
  del argv
  try:
    topology_shape(FLAGS.topology) if FLAGS.topology != "local" else None
  except ValueError as error:
    raise cli.UsageError(str(error)) from None
  run(FLAGS.config, FLAGS.topology, FLAGS.batch_size, FLAGS.fit, not FLAGS.train_only,
      FLAGS.traffic_top, FLAGS.hlo_dir, FLAGS.time_top, FLAGS.profile_kernels)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
