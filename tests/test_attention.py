"""Attention implementations against XLA in f32: Pallas TPU flash attention in interpret
mode (also under shard_map on the 8 simulated devices), fused q/k/v, remat policies, and
the config switch reaching every encoder attention.

Every interpreted kernel call is waited for before the next dispatch: a kernel still
running its callbacks can deadlock against new work on the CPU client (seen here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tests import run_fixtures
from s4eca_jax.models import flash, layers, s4eca, vit


def _qkv(batch=8, length=29, heads=2, head_dim=8):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32)
          for _ in range(3)]


def _key_mask(batch=8, length=29):
  mask = np.ones((batch, length), bool)
  mask[1, 20:] = False  # a padded sentence
  mask[2] = False  # a padded evaluation row: no valid key at all
  return jnp.asarray(mask)


def _reference(q, k, v, key_mask, causal):
  """Plain softmax attention; a row without valid keys attends to every key."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  allowed = key_mask | ~key_mask.any(-1, keepdims=True)
  allowed = allowed[:, None, None, :]
  if causal:
    allowed = allowed & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  weights = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("causal", [False, True])
def test_xla_and_pallas_match_reference_and_padded_rows_are_finite(causal):
  q, k, v = _qkv()
  key_mask = _key_mask()
  expected = _reference(q, k, v, key_mask, causal)
  xla = layers.dot_product_attention(q, k, v, key_mask=key_mask, is_causal=causal)
  with pltpu.force_tpu_interpret_mode():
    pallas = jax.block_until_ready(layers.dot_product_attention(
        q, k, v, key_mask=key_mask, is_causal=causal, implementation="pallas"))
  assert pallas.shape == xla.shape == q.shape
  assert bool(jnp.isfinite(xla).all()) and bool(jnp.isfinite(pallas).all())
  np.testing.assert_allclose(xla, expected, atol=1e-5)
  np.testing.assert_allclose(pallas, expected, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_xla_gradients_match_reference(causal):
  """The XLA path's own softmax (normalised after the value product, shift without
  gradient) against autodiff of the plain reference."""
  q, k, v = _qkv(batch=3)
  key_mask = _key_mask(batch=3)
  sums = lambda attend: (lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v))))
  got = jax.grad(sums(lambda q, k, v: layers.dot_product_attention(
      q, k, v, key_mask=key_mask, is_causal=causal)), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(sums(lambda q, k, v: _reference(q, k, v, key_mask, causal)),
                  argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_xla_bfloat16_inputs_stay_close_to_f32():
  q, k, v = _qkv()
  key_mask = _key_mask()
  half = layers.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)),
                                      key_mask=key_mask)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32), _reference(q, k, v, key_mask, False),
                             atol=3e-2)


@pytest.fixture(params=["own", "jax"])
def pallas_kernel(request, monkeypatch):
  """Both TPU kernels behind implementation="pallas": the project's (flash.py, up to
  flash.PALLAS_MAX_LENGTH keys) and jax's (longer sequences; forced here by a 0 limit)."""
  if request.param == "jax":
    monkeypatch.setattr(flash, "PALLAS_MAX_LENGTH", 0)
  return request.param


def test_pallas_gradients_match_xla(pallas_kernel):
  q, k, v = _qkv(batch=3)
  key_mask = _key_mask(batch=3)
  loss = lambda implementation: (lambda q, k, v: jnp.sum(jnp.sin(layers.dot_product_attention(
      q, k, v, key_mask=key_mask, implementation=implementation))))
  with pltpu.force_tpu_interpret_mode():
    pallas = jax.block_until_ready(jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v))
  for got, want in zip(pallas, jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,heads,head_dim", [(640, 4, 64), (600, 4, 64), (200, 1, 128)])
def test_flash_kernels_match_reference(causal, length, heads, head_dim):
  """flash.py on its own, token-major (B, T, heads * head_dim): 4 heads of 64 run as two
  blocks of 128 lanes, two heads each, over five blocks of 128 queries (at 600 the last one
  runs 40 rows past the end); one head of 128 fills its block (200 queries, one step of
  256). Outputs and gradients of q, k, v against autodiff of the plain reference, with a
  padded sentence."""
  assert flash.block_q(length, length) == (128 if length > 512 else 256)
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.standard_normal((2, length, heads * head_dim)), jnp.float32)
             for _ in range(3))
  valid = np.ones((2, length), bool)
  valid[1, length - 100:] = False
  valid = jnp.asarray(valid)
  split = lambda x: x.reshape(2, length, heads, head_dim)
  reference = lambda q, k, v: _reference(split(q), split(k), split(v), valid,
                                         causal).reshape(q.shape)
  sums = lambda attend: (lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v))))
  kernels = lambda q, k, v: flash.flash_attention(q, k, v, valid, num_heads=heads,
                                                  causal=causal)
  with pltpu.force_tpu_interpret_mode():
    got = jax.block_until_ready(
        (kernels(q, k, v), jax.grad(sums(kernels), argnums=(0, 1, 2))(q, k, v)))
  np.testing.assert_allclose(got[0], reference(q, k, v), atol=1e-5)
  for g, w in zip(got[1], jax.grad(sums(reference), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_flash_block_width():
  assert flash.block_width(768, 64) == 128  # DINOv2-B: two heads per kernel step
  assert flash.block_width(512, 64) == 128  # CLIP text
  assert flash.block_width(256, 128) == 128
  assert flash.block_width(1280, 80) == 640  # 8 heads: the narrowest multiple of 128
  assert flash.block_width(112, 56) == 112  # narrower than 128: the whole width, two heads
  assert flash.block_width(16, 8) == 16


def test_flash_query_blocks():
  assert flash.block_q(22, 22) == 128  # one step, the whole sequence and 106 rows past it
  assert flash.block_q(1029, 1029) == 384  # DINOv2 at 448: 3 blocks, 123 rows past the end
  assert flash.block_q(1024, 1024) == 512  # the decoder's 32 x 32 pixels
  assert flash.block_q(2048, 2048) == 256  # the scores tile stays within _SCORES_TILE


def test_pallas_block_sizes_cover_the_padded_sequence():
  assert layers.pallas_block_sizes(128, 128) == (128, 128, 128, 128)
  # DINOv2 at 448: 1,029 tokens padded to 1,152, one major block (K/V read once per head).
  assert layers.pallas_block_sizes(1152, 1152) == (1152, 1152, 384, 384)
  assert layers.pallas_block_sizes(640, 256) == (640, 256, 128, 256)
  assert layers.pallas_block_sizes(4096, 4096) == (2048, 2048, 512, 512)


def test_pallas_long_sequence_with_inner_blocks_matches_xla(pallas_kernel):
  """600 tokens (forward and grads): jax's kernel pads them to 640, in major blocks of 640
  with inner blocks of 128; the project's takes five blocks of 128 queries, the last 40
  rows past the end, over which its backward accumulates dK and dV."""
  q, k, v = _qkv(batch=3, length=600, heads=1)
  key_mask = _key_mask(batch=3, length=600)
  loss = lambda implementation: (lambda q, k, v: jnp.sum(jnp.sin(layers.dot_product_attention(
      q, k, v, key_mask=key_mask, implementation=implementation))))
  with pltpu.force_tpu_interpret_mode():
    got = jax.block_until_ready(
        layers.dot_product_attention(q, k, v, key_mask=key_mask, implementation="pallas"))
    grads = jax.block_until_ready(jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v))
  np.testing.assert_allclose(got, _reference(q, k, v, key_mask, False), atol=1e-5)
  for got, want in zip(grads, jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # sums over 600 keys


def test_pallas_runs_one_kernel_per_device_under_the_mesh():
  q, k, v = _qkv()
  key_mask = _key_mask()
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  data = NamedSharding(mesh, P(("data", "fsdp")))

  def attend(q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return layers.dot_product_attention(q, k, v, key_mask=key_mask, implementation="pallas")

  with pltpu.force_tpu_interpret_mode():
    jaxpr = str(jax.make_jaxpr(attend)(q, k, v))
    got = jax.block_until_ready(jax.jit(attend, in_shardings=(data,) * 3)(q, k, v))
  assert "shard_map" in jaxpr  # XLA does not partition Mosaic kernels
  np.testing.assert_allclose(got, _reference(q, k, v, key_mask, False), atol=1e-5)


def test_resolve_attention_by_backend():
  assert layers.resolve_attention("auto", "tpu", jnp.bfloat16) == "pallas"
  assert layers.resolve_attention("auto", "gpu", jnp.bfloat16) == "cudnn"
  assert layers.resolve_attention("auto", "gpu", jnp.float32) == "xla"  # cuDNN is 16-bit only
  assert layers.resolve_attention("auto", "cpu", jnp.bfloat16) == "xla"
  assert layers.resolve_attention("pallas", "cpu", jnp.float32) == "pallas"
  with pytest.raises(ValueError, match="flash"):
    layers.resolve_attention("flash", "tpu", jnp.float32)


def test_fused_qkv_same_params_same_output():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 16)), jnp.float32)
  separate = layers.MultiHeadAttention(4)
  fused = layers.MultiHeadAttention(4, fused_qkv=True)
  params = separate.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(fused.init(jax.random.PRNGKey(0), x))
  np.testing.assert_allclose(fused.apply(params, x), separate.apply(params, x), atol=1e-5)
  matmuls = lambda module: str(jax.make_jaxpr(lambda p: module.apply(p, x))(params)).count(
      "dot_general")
  assert (matmuls(separate), matmuls(fused)) == (6, 4)  # q, k, v in one; scores, values, out


@pytest.mark.parametrize("fused,cross", [(False, False), (True, False), (False, True)])
def test_pallas_module_matches_xla_module(fused, cross):
  """MultiHeadAttention(attention="pallas"): same parameters, same outputs and input
  gradients as the XLA route (a cross-attention with a padded sentence and an all-padding
  row included)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 29, 16)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((4, 11, 12)), jnp.float32)
  mask = np.ones((4, 11), bool)
  mask[1, 6:], mask[2] = False, False
  args, kwargs = ((x, context), {"key_mask": jnp.asarray(mask)}) if cross else ((x,), {})
  module = lambda attention: layers.MultiHeadAttention(
      4, out_features=20 if cross else None, key_bias=not cross, fused_qkv=fused,
      attention=attention)
  params = module("xla").init(jax.random.PRNGKey(0), *args, **kwargs)
  results = {}
  for attention in ("xla", "pallas"):
    apply = lambda y, m=module(attention): m.apply(params, y, *args[1:], **kwargs)
    with pltpu.force_tpu_interpret_mode():
      results[attention] = jax.block_until_ready(
          (apply(x), jax.grad(lambda y: jnp.sum(jnp.sin(apply(y))))(x)))
  for got, want in zip(results["pallas"], results["xla"]):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_policies_keep_gradients(policy):
  images = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 16, 3)), jnp.float32)

  def grad_of(remat):
    model = vit.VisionTransformer("dinov2", width=16, depth=2, num_heads=2, mlp_dim=32,
                                  patch_size=8, pretrain_grid=2, remat=remat)
    params = model.init(jax.random.PRNGKey(0), images)
    loss = lambda x: jnp.sum(model.apply(params, x)["tokens"] ** 2)
    return jax.grad(loss)(images), str(jax.make_jaxpr(jax.grad(loss))(images))

  plain, _ = grad_of("none")
  rematerialised, jaxpr = grad_of(policy)
  assert "remat" in jaxpr or "checkpoint" in jaxpr
  np.testing.assert_allclose(rematerialised, plain, rtol=1e-4, atol=1e-5)


def test_config_attention_reaches_every_encoder_attention():
  """attention="pallas" puts the kernel in every image and text block and every decoder
  pixel self-attention (numerics: the kernel tests above)."""
  config = run_fixtures.config("rrsisd", "variant=tiny")
  inputs = s4eca.example_inputs(config, batch_size=2)
  kernels = {}
  for attention in ("xla", "pallas"):
    config.model.attention = attention
    model = s4eca.build_model(config)
    jaxpr = str(jax.make_jaxpr(lambda rng: model.init(rng, *inputs))(jax.random.PRNGKey(0)))
    kernels[attention] = jaxpr.count("name=s4eca_flash_forward")
  blocks = config.image_encoder.depth + config.text_encoder.depth
  assert kernels == {"xla": 0, "pallas": blocks + config.model.decoder.num_layers}
