"""The visual adapter's depthwise convolutions compiled for one TPU chip on this host: the
Pallas kernel (models/depthwise.py) against XLA's grouped convolution, by the compiler's
cycle estimates, forward plus input and kernel gradients.

    JAX_PLATFORMS=cpu python bench/depthwise_aot.py [--chip v5e] [--batch 8] [--grid 32]
        [--channels 112] [--sizes 3,5,7]

Defaults: one adapter's three branches in the rrsisd model at 8 images per chip (bf16).
XLA's ops carry the compiler's per-op estimates (as in `s4eca_jax.aot`); a Mosaic kernel
carries none unless libtpu's static LLO profiler runs, which this script switches on
(LIBTPU_INIT_ARGS=--xla_jf_dump_static_llo_profile_to=DIR, set before jax starts). That
profiler aborts on the full train step (on the text encoder's embedding gather), so
`s4eca_jax.aot` prices kernels at their roofline instead. Needs the `tpu` extra.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

_PROFILE_DIR = tempfile.mkdtemp(prefix="s4eca_static_llo_")
os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") +
                                  f" --xla_jf_dump_static_llo_profile_to={_PROFILE_DIR}")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from s4eca_jax import aot, roofline  # pylint: disable=g-import-not-at-top,wrong-import-position
from s4eca_jax.models import layers  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--chip", default="v5e", choices=("v5e", "v5p"))
  parser.add_argument("--batch", type=int, default=8, help="images on the chip")
  parser.add_argument("--grid", type=int, default=32, help="patch grid side")
  parser.add_argument("--channels", type=int, default=112, help="adapter width r")
  parser.add_argument("--sizes", default="3,5,7", help="kernel sizes")
  args = parser.parse_args()
  chip = roofline.CHIPS[args.chip]
  device = aot.target_devices({"v5e": "v5e-4", "v5p": "v5p-8"}[args.chip])[0]
  placed = jax.sharding.SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct((args.batch, args.grid, args.grid, args.channels), jnp.bfloat16,
                           sharding=placed)
  totals = {}
  print(f"{args.chip}, x {x.shape} bf16; forward + input and kernel gradients, by the "
        f"compiler's cycle estimates at {chip.clock_hz / 1e9:.2f} GHz")
  for size in (int(s) for s in args.sizes.split(",")):
    kernel = jax.ShapeDtypeStruct((size, size, args.channels), jnp.bfloat16, sharding=placed)
    for name in ("grouped", "pallas"):
      conv = layers.DEPTHWISE_CONVS[name]

      def step(x, kernel, conv=conv):
        out, vjp = jax.vjp(conv, x, kernel)
        return out, vjp(out)

      start = time.time()
      hlo = jax.jit(step).lower(x, kernel).compile().as_text()
      times = roofline.time_by_source(hlo, chip, depth=1)
      priced = sum(v for k, v in times.items() if not k.endswith(roofline.KERNEL_ROOFLINE))
      unpriced = [k for k in times if k.endswith(roofline.KERNEL_ROOFLINE)]
      totals[name] = totals.get(name, 0.0) + priced
      print(f"  {size}x{size} {name:8s} {priced * 1e6:7.1f} us  (compile {time.time() - start:.1f} s)"
            + (f"  NOT PRICED by the compiler: {unpriced}" if unpriced else ""))
  print("  all sizes: " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in totals.items()))


if __name__ == "__main__":
  main()
