"""One attention call's gradient, compiled for a TPU slice on this host: our flash kernels
(models/flash.py) against jax's Pallas flash kernel, by XLA's bytes accessed, the HBM
estimate, FLOPs, temporaries and (v5e, v5p) the compiler's cost model per chip.

    JAX_PLATFORMS=cpu python bench/attention_aot.py [--kernel own|jax] [--topology v5e:2x2]
        [--batch 32] [--heads 12] [--length 1029] [--head_dim 64] [--causal]

Defaults: the rrsisd image encoder's attention (batch 32 over v5e 2x2 = 8 per chip, 1,029
tokens, 12 heads of 64, bf16), under shard_map as in the train step. Needs the `tpu` extra.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from s4eca_jax import aot, roofline  # pylint: disable=g-import-not-at-top,wrong-import-position
from s4eca_jax.models import flash, layers  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kernel", choices=("own", "jax"), default="own",
                      help="own: models/flash.py; jax: jax's Pallas flash attention")
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--batch", type=int, default=32, help="over all chips")
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--length", type=int, default=1029)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--causal", action="store_true")
  args = parser.parse_args()
  if args.kernel == "jax":
    flash.PALLAS_MAX_LENGTH = 0  # every length goes to jax's kernel
  devices = aot.target_devices(args.topology)
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jax.ShapeDtypeStruct((args.batch, args.length, args.heads, args.head_dim),
                           jnp.bfloat16, sharding=data)  # q, k, v as the projections give them

  def input_grads(q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      attend = lambda q, k, v: layers._pallas_attention(  # pylint: disable=protected-access
          q, k, v, None, args.causal)
      loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  print(f"compiling the gradient of one attention call for {args.topology} "
        f"({len(devices)} chips), kernel {args.kernel} ...", flush=True)
  compiled = jax.jit(input_grads).lower(x, x, x).compile()
  hlo = compiled.as_text()
  added = roofline.flash_addition(roofline.flash_kernels_of(hlo))
  cost = roofline.cost_of(compiled)
  hbm = sum(roofline.traffic_by_source(hlo, hbm_only=True).values()) + added["bytes"]
  print(f"per chip: XLA bytes accessed {(cost['bytes'] + added['bytes']) / 1e9:.3f} GB, HBM "
        f"estimate {hbm / 1e9:.3f} GB, {(cost['flops'] + added['flops']) / 1e12:.4f} TFLOP, "
        f"temporaries {roofline.memory_of(compiled)['temporaries'] / 2**30:.3f} GiB"
        + (f" (jax's kernels added analytically: {added['kernels']})" if added["kernels"] else ""))
  _, chip = roofline.chip_of(devices[0])
  if chip and chip.clock_hz:
    times = roofline.time_by_source(hlo, chip)
    kernels = roofline.kernel_seconds(times)
    print(f"per chip, XLA's per-op cost model: {(sum(times.values()) - kernels) * 1e3:.3f} ms "
          f"of XLA ops + {kernels * 1e3:.3f} ms of Pallas kernels (the roofline of the "
          f"cost estimates they carry)")


if __name__ == "__main__":
  main()
