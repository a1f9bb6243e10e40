"""Where a traced train step spends its device time, by op and by the model code behind it.

    python bench/profile_summary.py DIR [--steps 3] [--top 25] [--depth 3]

DIR is what `python -m s4eca_jax.bench ... --profile DIR` wrote: a jax.profiler trace of
3 train steps and the step's optimised HLO (train_step.hlo.txt). Device ops are the
events of the accelerator's "XLA Ops" line where the trace has one, else of all its lines
(a GPU's streams), or of XLA's compute threads on a CPU (there, "Rendezvous" and "Wait"
events are one device waiting for the other). Each op is attributed through its HLO
op_name metadata to a scope of the model (image_encoder/block_*/adapter, decoder, ...;
block numbers folded) and to forward or backward (the name stack holds transpose(...) for
the backward pass). An op without metadata (a layout copy, a convolution XLA rewrote)
takes its first operand's, so a kernel gradient can show as forward. Prints milliseconds
per step. On GPU, XLA runs most of the step as CUDA graphs (command buffers): kernels
keep the names of their HLO fusions, but cuBLAS / cuDNN kernels only their library's
names, so those are grouped by library.
"""

import argparse
import collections
import glob
import os
import re

from jax.profiler import ProfileData

_COMPUTATION = re.compile(r"^%?([\w.\-]+) [^=]*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPERAND = re.compile(r"= [^(]*\(%?([\w.\-]+)")


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the op_name (JAX name stack) of its metadata. A fusion
  without its own takes the one of its fused computation's root (or first op that has
  one); an op XLA added (a layout copy, a convolution it rewrote) that of its first
  operand's producer."""
  names, calls, inside, operand = {}, {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    op_name = _OP_NAME.search(line)
    if op_name:
      names[match.group(2)] = op_name.group(1)
      if computation and (match.group(1) or computation not in inside):
        inside[computation] = op_name.group(1)
    called = _CALLS.search(line)
    if called:
      calls[match.group(2)] = called.group(1)
    first = _OPERAND.search(line)
    if first:
      operand[match.group(2)] = first.group(1)
  for name, computation in calls.items():
    if name not in names and computation in inside:
      names[name] = inside[computation]
  for name in operand:
    source, hops = name, 0
    while source not in names and source in operand and hops < 20:
      source, hops = operand[source], hops + 1
    if name not in names and source in names:
      names[name] = names[source]
  # GPU traces name an op's kernels with '_' for the '.' of its HLO name (fusion_22).
  names.update({name.replace(".", "_"): op for name, op in list(names.items())
                if name.replace(".", "_") not in names})
  return names


def scope(op_name: str, depth: int) -> tuple[str, str]:
  """(model scope, 'fwd' | 'bwd') of a JAX name stack such as
  jit(train_step)/transpose(jvp(S4ECA))/image_encoder/block_3/adapter/dot_general."""
  direction = "bwd" if "transpose(" in op_name else "fwd"
  if ":" in op_name:  # XLA combined several ops, e.g. the gradients' all-reduces
    return "(several ops combined: " + op_name.split(":")[0].split("/")[-1] + ", ...)", direction
  parts = [p for p in op_name.split("/")[1:] if not re.match(r"^\w+\(", p)]
  parts = [re.sub(r"_\d+$", "_*", p) for p in parts[:-1]]  # the last part is the primitive
  return "/".join(parts[:depth]) or "(outside the model)", direction


_LIBRARY_KERNELS = (  # GPU kernels that carry no HLO name (cuBLAS / cuDNN calls, copies)
    ("(cuDNN attention)", ("sdpa", "flash", "cudnn::fusion")),
    ("(cuDNN convolution)", ("xmma_fprop", "xmma_dgrad", "xmma_wgrad", "wgrad", "dgrad",
                             "nhwc", "nchw", "conv")),
    ("(cuBLAS matmul)", ("nvjet", "gemm", "cutlass", "cublas")),
    ("(memset / copy)", ("memset", "memcpy")),
    ("(waiting for another device)", ("rendezvous", "wait:")),
)


def library(kernel: str) -> str:
  """The group of a kernel or event name that maps to no HLO op."""
  lower = kernel.lower()
  for group, patterns in _LIBRARY_KERNELS:
    if any(pattern in lower for pattern in patterns):
      return group
  return "(no HLO op_name)"


def device_events(data: ProfileData):
  """(name, duration_ns) of the device ops in a trace."""
  planes = [p for p in data.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
  if planes:
    for plane in planes:
      lines = [l for l in plane.lines if l.name == "XLA Ops"] or list(plane.lines)
      for line in lines:
        for event in line.events:
          yield event.name, event.duration_ns
    return
  for plane in data.planes:  # CPU: XLA's compute threads
    if plane.name == "/host:CPU":
      for line in plane.lines:
        if line.name.startswith("tf_XLAEigen"):
          for event in line.events:
            if not event.name.startswith("ThunkExecutor"):
              yield event.name, event.duration_ns


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dir", help="the --profile folder of s4eca_jax.bench")
  parser.add_argument("--steps", type=int, default=3, help="steps the trace holds")
  parser.add_argument("--top", type=int, default=25, help="ops and scopes to list")
  parser.add_argument("--depth", type=int, default=3, help="scope depth (path parts)")
  args = parser.parse_args()
  traces = sorted(glob.glob(os.path.join(args.dir, "**", "*.xplane.pb"), recursive=True),
                  key=os.path.getmtime)
  if not traces:
    raise SystemExit(f"no *.xplane.pb under {args.dir}: run s4eca_jax.bench --profile first")
  hlo = os.path.join(args.dir, "train_step.hlo.txt")
  names = op_names(open(hlo).read()) if os.path.exists(hlo) else {}
  by_op, by_scope = collections.Counter(), collections.Counter()
  count = collections.Counter()
  for name, ns in device_events(ProfileData.from_file(traces[-1])):
    by_op[name] += ns
    count[name] += 1
    by_scope[scope(names[name], args.depth) if name in names else (library(name), "")] += ns
  total = sum(by_op.values())
  if not total:
    raise SystemExit(f"{traces[-1]}: no device ops found")
  per_step = lambda ns: ns / args.steps / 1e6
  print(f"{traces[-1]}: {per_step(total):.1f} ms of device ops per step "
        f"({len(by_op)} distinct ops; HLO names {'found' if names else 'missing'})")
  print(f"\n{'ms/step':>8} {'share':>6}  scope (depth {args.depth})")
  for (where, direction), ns in by_scope.most_common(args.top):
    print(f"{per_step(ns):8.2f} {ns / total:6.1%}  {direction:3} {where}")
  print(f"\n{'ms/step':>8} {'share':>6} {'calls':>5}  op  [scope]")
  for name, ns in by_op.most_common(args.top):
    where = (" ".join(scope(names[name], args.depth)[::-1]) if name in names else
             library(name))
    print(f"{per_step(ns):8.2f} {ns / total:6.1%} {count[name] // args.steps:5d}  "
          f"{name[:60]}  [{where}]")


if __name__ == "__main__":
  main()
