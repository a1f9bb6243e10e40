"""The compiler's cycle estimate for each of the project's Pallas kernels, each compiled on
its own for a TPU chip.

XLA's TPU compiler writes an `estimated_cycles` into every op it schedules, but not into a
Mosaic (Pallas) kernel unless libtpu's static LLO profiler runs
(LIBTPU_INIT_ARGS=--xla_jf_dump_static_llo_profile_to=DIR, read when libtpu starts). That
profiler aborts on the whole rrsisd train step (on the text encoder's embedding gather,
"Unsupported DMA direction"), so `s4eca_jax.aot` compiles the step without it and prices
the kernels here instead:

1. a pallas_call site calls `record` as it is traced (the kernel's name, its function and
   static arguments, its array shapes), so compiling a step leaves a list of the kernel
   calls it contains, per device. depthwise.py and flash.py record their kernels (the
   flash kernels per image: `record(per_image=True)`);
2. `cycles` compiles each recorded call alone, in a child process started with the
   profiler on (`python -m s4eca_jax.kernel_profile`: JSON on stdin, a line per kernel on
   stdout, restarted after a kernel that aborts it), and reads
   the kernel's `estimated_cycles` from the compiled HLO;
3. roofline.time_by_source matches a custom call of the step's HLO to a recorded call by
   kernel name and operand shapes, `key`.

The estimate is the compiler's static model of the kernel's instruction bundles, the same
model that prices XLA's own ops (with the profiler on, XLA's ops carry the same numbers as
without it). A kernel compiled alone reads its operands from HBM, where in the step XLA may
have prefetched them into VMEM: the 3x3 depthwise call of the adapter takes 9.27 us alone
against 8.56 (forward) and 7.22 us (input gradient) in a small program compiled whole with
the profiler on (bench/depthwise_aot.py compiles that way). Nothing here has run on a TPU.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple


class Call(NamedTuple):
  """A recorded kernel call: `module.qualname(*arrays of shapes, **static)` issues it;
  its compiled cycles count `times` in the step."""

  module: str
  qualname: str
  static: dict
  shapes: list  # [(shape, dtype name)] of the arrays it is compiled for
  times: int


# (kernel name, operand shapes) -> how to compile it alone
CALLS: dict[tuple, Call] = {}


def _short(dtype) -> str:
  """numpy/jax dtype -> HLO's name: bfloat16 -> bf16, float32 -> f32, int32 -> s32."""
  name = str(dtype)
  return {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "int32": "s32",
          "int8": "s8", "uint32": "u32", "bool": "pred"}.get(name, name)


def key(name: str, shapes) -> tuple:
  """The lookup key of a kernel call: its name and its operands' HLO types."""
  return (name, tuple(f"{_short(dtype)}[{','.join(map(str, shape))}]" for shape, dtype in shapes))


def record(name: str, function, static: dict, *arrays, per_image: bool = False) -> None:
  """Note a kernel call as it is traced: `function(*arrays, **static)` is importable and
  issues exactly the one pallas_call named `name`.

  per_image: the kernel's grid runs over the leading (batch) axis of every array, one
  independent image after another; it is compiled for one image and its cycles are
  counted once per image. The profiler's time grows much faster than the grid (the flash
  forward: 10 s for one image, not done in 600 s for two), and each image repeats the same
  instructions; charging the per-image pipeline start once per image errs high."""
  shapes = [(tuple(a.shape), str(a.dtype)) for a in arrays]
  compiled, times = shapes, 1
  if per_image:
    compiled, times = [((1,) + shape[1:], dtype) for shape, dtype in shapes], shapes[0][0][0]
  CALLS[key(name, shapes)] = Call(function.__module__, function.__qualname__, dict(static),
                                  compiled, times)


def _compile_one(call: Call, device) -> int | None:
  """The kernel's estimated cycles, compiled alone for `device` (in the profiling child)."""
  import jax  # pylint: disable=g-import-not-at-top

  function = importlib.import_module(call.module)
  for part in call.qualname.split("."):
    function = getattr(function, part)
  mesh = jax.sharding.Mesh([device], ("device",))  # Pallas reads the chip from the mesh
  placed = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = [jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=placed)
          for shape, dtype in call.shapes]
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    lowered = jax.jit(lambda *a: function(*a, **call.static)).lower(*args)
  hlo = lowered.compile().as_text()
  found = [int(c) for c in re.findall(r'custom_call_target="tpu_custom_call".*?'
                                      r'"estimated_cycles":"(\d+)"', hlo)]
  return max(found) if found else None


_MARK = "kernel_profile cycles: "


def _child() -> None:
  """`python -m s4eca_jax.kernel_profile`: {"topology", "calls"} on stdin; one line per
  call on stdout as soon as it is compiled (the profiler aborts the process on some
  kernels: the parent restarts it after the one that crashed)."""
  request = json.load(sys.stdin)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top  # libtpu only

  device = topologies.get_topology_desc(
      platform="tpu", topology_name=request["topology"], chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices[0]
  for call in (Call(*entry) for entry in request["calls"]):  # JSON made the Calls lists
    try:
      found = _compile_one(call, device)
    except Exception as error:  # pylint: disable=broad-except  # reported, then roofline
      print(f"kernel_profile: {call.qualname} {call.shapes}: {error}", file=sys.stderr)
      found = None
    print(_MARK + json.dumps(found), flush=True)


def cycles(topology: str, calls: dict | None = None, timeout_s: float = 900
           ) -> tuple[dict, list[str]]:
  """({key: estimated cycles}, [why a kernel was not priced]) for the recorded kernel calls
  (default CALLS), each compiled alone for one chip of `topology` ("v5e:2x2", libtpu's
  GEN:SHAPE) in a child process with the static profiler on. Kernels it cannot price (an
  exception, or an abort of the child, which is then restarted after that kernel) are left
  out: the caller falls back to their roofline."""
  calls = CALLS if calls is None else calls
  keys, found, failures = list(calls), [], []
  with tempfile.TemporaryDirectory(prefix="s4eca_static_llo_") as profile_dir:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env["LIBTPU_INIT_ARGS"] = (env.get("LIBTPU_INIT_ARGS", "") +
                               f" --xla_jf_dump_static_llo_profile_to={profile_dir}")
    while len(found) < len(keys):
      rest = [calls[k] for k in keys[len(found):]]
      done = subprocess.run(
          [sys.executable, "-m", "s4eca_jax.kernel_profile"], env=env, capture_output=True,
          text=True, timeout=timeout_s, input=json.dumps({"topology": topology, "calls": rest}))
      lines = [json.loads(line[len(_MARK):]) for line in done.stdout.splitlines()
               if line.startswith(_MARK)]
      found += lines
      if len(found) < len(keys):  # the next kernel aborted the child
        reason = re.findall(r"Check failed[^\n]{0,200}", done.stderr) or done.stderr.strip(
            ).splitlines()[-1:]
        failures.append(f"{keys[len(found)][0]}: {reason[0] if reason else done.returncode}")
        found.append(None)
  return {k: c * calls[k].times for k, c in zip(keys, found) if c is not None}, failures


if __name__ == "__main__":
  _child()
