"""A Pallas kernel that libtpu 0.0.42's static profiler aborts on (a bf16 select feeding a
matmul: "Expected vector-bf16packed, got vector-int16"), for the test that kernel_profile
survives an abort of its child. flash.py selects in f32 for this reason."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _kernel(x_ref, o_ref):
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, x_ref.shape[1]), 1)
  x = jnp.where(lane < 64, x_ref[...], 0).astype(x_ref.dtype)
  o_ref[...] = jax.lax.dot_general(x, x_ref[...], (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)


def masked_gram(x):
  """x (n, 128) bf16 -> (n, n) f32."""
  return pl.pallas_call(_kernel, out_shape=jax.ShapeDtypeStruct((x.shape[0],) * 2,
                                                                 jnp.float32))(x)
