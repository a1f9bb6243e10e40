"""What a compiled step costs: public chip peaks, memory, FLOPs and bytes (with jax's Pallas
flash kernels, which XLA's cost analysis does not see), collectives. Used by the AOT tool
(s4eca_jax.aot) and the benchmark (s4eca_jax.bench).
"""

from __future__ import annotations

import dataclasses
import math
import re

from s4eca_jax.models import layers

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip peaks: dense bf16 matmul FLOP/s, HBM bytes/s, HBM bytes; for TPUs
  whose compiler's cycle estimates we convert to time, the TensorCore clock."""

  bf16_flops: float
  hbm_bandwidth: float
  hbm_bytes: float
  clock_hz: float | None = None


CHIPS = {  # datasheet numbers (Cloud TPU system architecture pages; NVIDIA datasheets)
    "v4": Chip(275e12, 1228e9, 32 * GiB),
    # Clocks: the peak over the MXUs' bf16 FLOPs per cycle (128 x 128 multiply-adds each):
    # v5e 197e12 / (4 MXUs x 32,768) = 1.5 GHz; v5p 459e12 / (2 cores x 4 x 32,768) = 1.75
    # GHz. tests/test_aot.py checks them against the cycles XLA estimates for a big matmul.
    "v5e": Chip(197e12, 819e9, 16 * GiB, 1.5e9),
    "v5p": Chip(459e12, 2765e9, 95 * GiB, 1.75e9),
    "v6e": Chip(918e12, 1640e9, 32 * GiB),
    "A100": Chip(312e12, 2039e9, 80 * GiB),  # SXM 80 GB
    "H100": Chip(989e12, 3350e9, 80 * GiB),  # SXM, dense
    "H200": Chip(989e12, 4800e9, 141 * GiB),
}
_KIND_TO_CHIP = (("v6 lite", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v6e", "v6e"),
                 ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"), ("a100", "A100"),
                 ("h100", "H100"), ("h200", "H200"))
TWO_D = ("v5e", "v6e")  # 2-D tori, named by chips; v4/v5p are 3-D, named by TensorCores


def chip_of(device) -> tuple[str | None, Chip | None]:
  kind = device.device_kind.lower()
  for key, name in _KIND_TO_CHIP:
    if key in kind:
      return name, CHIPS[name]
  return None, None


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")  # a layout's memory space other than 0 (HBM)
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all")


def _arrays(text: str) -> list[tuple[int, tuple[int, ...], bool]]:
  """[(bytes, dims, on_chip)] of every array type written in `text`; on_chip: its layout
  names a memory space other than HBM (S(1) is TPU VMEM)."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(text):
    shape = tuple(int(d) for d in dims.split(",") if d)
    out.append((math.prod(shape) * _DTYPE_BYTES.get(dtype, 4), shape,
                bool(_ON_CHIP.search(layout))))
  return out


def _array_bytes(text: str) -> list[tuple[int, tuple[int, ...]]]:
  """[(bytes, dims)] of every array type written in `text`."""
  return [(size, shape) for size, shape, _ in _arrays(text)]


def memory_of(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


def cost_of(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  out = {"flops": float(cost.get("flops", 0.0)),
         "bytes": float(cost.get("bytes accessed", 0.0))}
  if "optimal_seconds" in cost:  # XLA's own cost model of the step (TPU), kernels excluded
    out["optimal_seconds"] = float(cost["optimal_seconds"])
  return out


def collectives_of(hlo: str) -> dict[str, list[float]]:
  """{kind: [count, bytes]} of the collectives in optimised HLO (async pairs once)."""
  found = {}
  for line in hlo.splitlines():
    match = re.search(r"=\s*(.*?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(", line)
    if not match:
      continue
    kind = match.group(2)
    result_type = match.group(1)
    sizes = _array_bytes(result_type)
    if match.group(3):  # async start: result is (operands, outputs[, contexts]); count outputs
      sizes = sizes[len(sizes) // 2:] if kind != "collective-permute" else sizes[:1]
    entry = found.setdefault(kind, [0, 0.0])
    entry[0] += 1
    entry[1] += sum(b for b, _ in sizes)
  return found


def own_kernels_of(hlo: str) -> dict[str, int]:
  """{"forward": n, "backward": n}: the project's flash kernels (models/flash.py) in
  optimised HLO; they carry cost estimates, so XLA's cost analysis counts them."""
  found = {"forward": 0, "backward": 0}
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%s4eca_flash_(forward|backward)[.\d]* = ", line)
    if match and "tpu_custom_call" in line:
      found[match.group(1)] += 1
  return found if any(found.values()) else {}


_FLASH_KERNELS = (("flash_mha_bwd_dkv", "dkv"), ("flash_mha_bwd_dq", "dq"),
                  ("flash_attention", "forward"))


def flash_kernels_of(hlo: str) -> list[dict]:
  """The Pallas flash-attention kernels in optimised HLO: kind, per-device operand sizes.

  Operands (from operand_layout_constraints): q, k, v (b, heads, T, d), then segment
  ids and, for the backward kernels, the row statistics and dO.
  """
  kernels = []
  for line in hlo.splitlines():
    if "tpu_custom_call" not in line:
      continue
    name = line.strip().lstrip("%").split(" ", 1)[0]
    kind = next((k for prefix, k in _FLASH_KERNELS if name.startswith(prefix)), None)
    constraints = re.search(r"operand_layout_constraints=\{(.*?\})\}", line)
    if kind is None or not constraints:
      continue
    operands = _array_bytes(re.sub(r"\{[\d,]*\}", "", constraints.group(1)))
    if len(operands) < 3:
      continue
    kernels.append({"kind": kind, "q": operands[0][1], "k": operands[1][1],
                    "q_bytes": operands[0][0], "kv_bytes": operands[1][0] + operands[2][0],
                    "rest_bytes": sum(b for b, _ in operands[3:])})
  return kernels


def flash_addition(kernels: list[dict]) -> dict[str, float]:
  """FLOPs and bytes of the flash kernels that XLA's cost analysis leaves out.

  XLA counts a kernel's operands and outputs once, and the forward kernel's FLOPs by its
  own estimate (4 Tq Tk d per batch x head); it does not see the backward kernels' FLOPs
  (jax's split backward: 8 Tq Tk d for dK and dV with the scores recomputed, 6 Tq Tk d
  for dQ) nor the blocked re-reads (layers.pallas_block_sizes): the forward and the dQ
  kernel read K and V once per major block of queries, the dK/dV kernel reads q, dO and
  the row statistics once per major block of keys.
  """
  flops = traffic = 0.0
  for kernel in kernels:
    b, h, tq, d = kernel["q"]
    tk = kernel["k"][2]
    q_major, k_major, _, _ = layers.pallas_block_sizes(tq, tk)
    q_blocks, k_blocks = tq // q_major, tk // k_major
    if kernel["kind"] == "dkv":
      flops += 8 * b * h * tq * tk * d
      traffic += (k_blocks - 1) * (kernel["q_bytes"] + kernel["rest_bytes"])
    else:
      flops += 6 * b * h * tq * tk * d if kernel["kind"] == "dq" else 0
      traffic += (q_blocks - 1) * kernel["kv_bytes"]
  return {"flops": flops, "bytes": traffic, "kernels": len(kernels)}


# One instruction of optimised HLO text: name, result type, opcode, operands, attributes.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$")
_NO_TRAFFIC = frozenset({"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
                         "while", "conditional", "call", "after-all", "partition-id",
                         "replica-id", "opt-barrier"})
# Transformation and wrapper names in op_name paths that say nothing about the module.
_PATH_NOISE = ("jvp(", "transpose(", "checkpoint", "remat", "pjit", "vmap", "jit(", "while",
               "body", "closed_call", "make_train_step", "shard_map")


def _source(attributes: str, depth: int) -> str:
  """`forward|backward module/path` from an instruction's op_name metadata."""
  match = re.search(r'op_name="([^"]*)"', attributes)
  if not match:
    return "(no source)"
  path = match.group(1)
  parts = [p for p in path.split("/") if p and not p.startswith(_PATH_NOISE)]
  return ("backward " if "transpose(" in path else "forward ") + "/".join(parts[:depth])


def _top_level(hlo: str) -> tuple[dict, list[tuple[str, str, str, str, str]]]:
  """Parses optimised HLO text: ({name: arrays of its result}, [(name, result type text,
  opcode, operands, attributes)] of every instruction outside fused computations, in
  program order)."""
  types, fused, computations = {}, set(), []
  for block in re.split(r"\n(?=\S)", hlo):
    lines = []
    for line in block.split("\n")[1:]:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      name, result, opcode, operands, attributes = match.groups()
      types[name] = _arrays(result)
      lines.append((name, result, opcode, operands, attributes))
      if opcode == "fusion":
        fused.update(re.findall(r"calls=%?([\w.\-]+)", attributes))
    head = re.match(r"(?:ENTRY )?%?([\w.\-]+)", block)
    if head:
      computations.append((head.group(1), lines))
  return types, [line for computation, lines in computations if computation not in fused
                 for line in lines]


def traffic_by_source(hlo: str, depth: int = 3, hbm_only: bool = False) -> dict[str, float]:
  """Bytes each module path moves: for every top-level instruction of optimised HLO (a
  fusion counts as one), its operands plus its result, grouped by the op_name metadata's
  first `depth` module names and by forward / backward.

  A fusion that reads a slice of a big operand is charged the whole operand here, where
  XLA's cost analysis charges what it uses. With hbm_only=False every memory space counts
  and async copies between memory spaces (copy-start, slice-start) are charged their
  destination twice: the sum approximates XLA's "bytes accessed" (50.5 of 58.5 GB for the
  rrsisd train step on v5e), and the ranking says where the traffic is. With hbm_only=True
  only arrays whose layout is in HBM count: an operand that XLA prefetched into TPU VMEM
  (layout S(1)) costs the op nothing, and an async copy costs its destination's size once
  per HBM side (a prefetch reads HBM, an eviction writes it). That is the traffic the
  roofline's bandwidth limits; XLA's "bytes accessed" counts on-chip accesses as well.
  """
  types, instructions = _top_level(hlo)
  counted = lambda arrays: sum(size for size, _, on_chip in arrays
                               if not (hbm_only and on_chip))
  out: dict[str, float] = {}
  for name, _, opcode, operands, attributes in instructions:
    if opcode in _NO_TRAFFIC or opcode in ("copy-done", "slice-done"):  # at their start
      continue
    if opcode in ("copy-start", "slice-start"):  # async copy into another memory space
      # copy-start: (destination, source, context); slice-start: ((source), destination,
      # context). The destination's bytes are read once and written once.
      arrays = types[name]
      source, destination = (arrays[1], arrays[0]) if opcode == "copy-start" else (
          arrays[0], arrays[1])
      if hbm_only:
        moved = destination[0] * ((not source[2]) + (not destination[2]))
      else:
        moved = 2 * destination[0]
      key = "memory-space copies (copy-start, slice-start)"
    else:
      moved = counted(types[name]) + sum(
          counted(types.get(o, [])) for o in re.findall(r"%([\w.\-]+)", operands))
      key = _source(attributes, depth)
    out[key] = out.get(key, 0.0) + moved
  return out


KERNEL_ROOFLINE = " [Pallas kernels: roofline of their cost estimates]"
KERNEL_PROFILED = " [Pallas kernels: static profile, each compiled alone]"


def time_by_source(hlo: str, chip: Chip, depth: int = 3,
                   kernel_cycles: dict | None = None) -> dict[str, float]:
  """Seconds each module path takes by XLA's TPU cost model, grouped like traffic_by_source.

  The TPU compiler writes an `estimated_cycles` into the backend config of every top-level
  op it schedules (fusions, convolutions, copies, reductions); at the chip's clock, ops one
  after another (a TensorCore runs them in turn; async copies overlap them and carry no
  cycles). Pallas kernels carry no cycles in a normal compile. `kernel_cycles`
  ({kernel_profile.key: cycles}, from kernel_profile.cycles) prices a kernel whose name
  and operand types match, under its module path plus KERNEL_PROFILED. Any other kernel
  that gives XLA a cost estimate is charged its roofline, max(FLOPs / peak, bytes /
  bandwidth), a lower bound on its time, under its module path plus KERNEL_ROOFLINE.
  Other custom calls are not charged.
  """
  if not chip.clock_hz:
    raise ValueError("time_by_source needs the chip's clock (Chip.clock_hz)")
  instructions = _top_level(hlo)[1]
  results = {}  # instruction -> its (first) result type without layout, "bf16[8,1029,768]"
  for name, result, *_ in instructions if kernel_cycles else ():
    array = _ARRAY.search(result)
    if array:
      results[name] = f"{array.group(1)}[{array.group(2)}]"
  out: dict[str, float] = {}
  for name, _, opcode, operands, attributes in instructions:
    cycles = re.search(r'"estimated_cycles":"(\d+)"', attributes)
    if cycles:
      key, seconds = _source(attributes, depth), int(cycles.group(1)) / chip.clock_hz
    elif opcode == "custom-call" and '"cost_estimate"' in attributes:
      types = tuple(results.get(o) for o in re.findall(r"%([\w.\-]+)", operands))
      profiled = [c for (kernel, shapes), c in (kernel_cycles or {}).items()
                  if kernel in name and shapes == types]
      if profiled:
        key, seconds = _source(attributes, depth) + KERNEL_PROFILED, profiled[0] / chip.clock_hz
      else:
        estimate = re.search(
            r'"cost_estimate":\{"flops":"(\d+)"[^}]*"bytes_accessed":"(\d+)"', attributes)
        if not estimate:
          continue
        key = _source(attributes, depth) + KERNEL_ROOFLINE
        seconds = max(int(estimate.group(1)) / chip.bf16_flops,
                      int(estimate.group(2)) / chip.hbm_bandwidth)
    else:
      continue
    out[key] = out.get(key, 0.0) + seconds
  return out


def kernel_seconds(times: dict[str, float], profiled: bool | None = None) -> float:
  """The Pallas kernels' part of time_by_source's result: all of it (profiled=None), the
  kernels priced by their static profile (True) or at their roofline (False)."""
  suffixes = {None: (KERNEL_ROOFLINE, KERNEL_PROFILED), True: (KERNEL_PROFILED,),
              False: (KERNEL_ROOFLINE,)}[profiled]
  return sum(t for source, t in times.items() if source.endswith(suffixes))
