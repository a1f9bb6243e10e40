"""Textual and visual adapters on tiny sizes: shapes, identity at init, prefix bypass,
scale weights, padding mask, zeroed proxies, ablation switches."""

import contextlib
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from s4eca_jax import presets
from s4eca_jax.models import adapters, layers, s4eca, vit

BATCH, WIDTH, PREFIX, GRID, NUM_QUERIES = 2, 32, 3, (6, 6), 4
TOKENS = PREFIX + GRID[0] * GRID[1]


def _inputs(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(k1, (BATCH, TOKENS, WIDTH)),
          jax.random.normal(k2, (BATCH, NUM_QUERIES, WIDTH)))


def _randomise(params, name, seed=1):
  """Replaces the leaves under `name` (e.g. the zero-initialised "up") with noise."""
  flat = flax.traverse_util.flatten_dict(params)
  key = jax.random.PRNGKey(seed)
  for path in flat:
    if name in path:
      key, sub = jax.random.split(key)
      flat[path] = 0.1 * jax.random.normal(sub, flat[path].shape)
  return flax.traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def visual():
  module = adapters.VisualAdapter(width=16, num_heads=2)
  tokens, proxies = _inputs()
  params = jax.jit(lambda: module.init(
      jax.random.PRNGKey(0), tokens, context=proxies, num_prefix=PREFIX, grid=GRID))()["params"]
  apply = jax.jit(lambda p, n, ctx: module.apply(
      {"params": p}, n, context=ctx, num_prefix=PREFIX, grid=GRID, mutable="intermediates"))
  return module, params, apply


def test_visual_adapter_shapes_and_scale_weights(visual):
  _, params, apply = visual
  tokens, proxies = _inputs()
  out, state = apply(params, tokens, proxies)
  assert out.shape == (BATCH, TOKENS, WIDTH)
  weights, = state["intermediates"]["scale_weights"]
  maps, = state["intermediates"]["spatial_maps"]
  assert weights.shape == (BATCH, 3, 16)  # (B, K, r)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
  assert maps.shape == (BATCH, *GRID, 3)  # (B, h, w, K)
  assert float(maps.min()) > 0 and float(maps.max()) < 1


def test_fresh_visual_adapter_outputs_zero(visual):
  _, params, apply = visual
  out, _ = apply(params, *_inputs())
  assert not np.any(np.asarray(out))


def test_fresh_adapters_leave_the_encoder_unchanged():
  kwargs = dict(family="dinov2", width=WIDTH, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                pretrain_grid=2, num_registers=2)
  plain = vit.VisionTransformer(**kwargs)
  adapted = vit.VisionTransformer(
      **kwargs, adapter=functools.partial(adapters.VisualAdapter, width=8, num_heads=2),
      adapter_blocks=(1, 2))
  images = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 24, 3))
  proxies = jax.random.normal(jax.random.PRNGKey(1), (1, NUM_QUERIES, WIDTH))
  params = jax.jit(lambda: adapted.init(jax.random.PRNGKey(2), images,
                                        adapter_context=proxies))()["params"]
  plain_params = jax.tree.map(lambda x: x, params)
  for k in (1, 2):
    del plain_params[f"block_{k}"]["adapter"]
  ours = jax.jit(adapted.apply)({"params": params}, images, adapter_context=proxies)["tokens"]
  reference = jax.jit(plain.apply)({"params": plain_params}, images)["tokens"]
  np.testing.assert_array_equal(ours, reference)


def test_prefix_tokens_bypass_the_grid(visual):
  _, params, apply = visual
  params = _randomise(params, "up")
  tokens, proxies = _inputs()
  out, _ = apply(params, tokens, proxies)
  out_other, _ = apply(params, tokens.at[:, PREFIX:].add(1.0), 2.0 * proxies)
  # Prefix tokens depend on their own value only; patch tokens see patches and proxies.
  np.testing.assert_array_equal(out[:, :PREFIX], out_other[:, :PREFIX])
  assert not np.allclose(out[:, PREFIX:], out_other[:, PREFIX:])


def test_zeroed_proxies_give_finite_outputs_and_gradients(visual):
  module, params, _ = visual
  params = _randomise(params, "up")
  tokens, proxies = _inputs()

  def total(p):
    return module.apply({"params": p}, tokens, context=jnp.zeros_like(proxies),
                        num_prefix=PREFIX, grid=GRID).sum()

  value, grads = jax.jit(jax.value_and_grad(total))(params)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("switch,absent_params,absent_maps", [
    ("scale_selection", {"scale_fc1", "scale_fc2"}, {"scale_weights"}),
    ("spatial_selection", {"spatial_conv"}, {"spatial_maps"}),
    ("cross_attention", {"cross_attn"}, set()),
    ("dense_connectivity", set(), set()),
])
def test_ablation_switches(switch, absent_params, absent_maps):
  module = adapters.VisualAdapter(width=16, num_heads=2, **{switch: False})
  tokens, proxies = _inputs()
  variables = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), tokens, context=proxies, num_prefix=PREFIX, grid=GRID))
  names = set(variables["params"])
  assert not names & absent_params
  assert "up" in names and "multi_scale" in names
  assert not set(variables.get("intermediates", {})) & absent_maps
  if switch == "dense_connectivity":  # every branch's 1x1 conv reads only the input
    kernels = variables["params"]["multi_scale"]
    assert all(kernels[f"branch_{i}_pointwise"]["kernel"].shape == (16, 16) for i in range(3))


def test_adapter_without_language_parts_needs_no_context():
  module = adapters.VisualAdapter(width=16, scale_selection=False, spatial_selection=False,
                                  cross_attention=False)
  tokens, _ = _inputs()
  variables = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), tokens, context=None, num_prefix=PREFIX, grid=GRID))
  assert "proxy_proj" not in variables["params"]
  with pytest.raises(ValueError, match="needs language proxies"):
    adapters.VisualAdapter(width=16).init(
        jax.random.PRNGKey(0), tokens, context=None, num_prefix=PREFIX, grid=GRID)


def test_textual_adapter_reads_valid_words_only():
  module = adapters.TextualAdapter(blocks=(1, 3), out_dim=48, num_queries=NUM_QUERIES,
                                   width=16, num_heads=2)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  taps = {k: jax.random.normal(key, (BATCH, 7, WIDTH)) for k, key in zip((1, 2, 3), keys)}
  mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
  params = jax.jit(module.init)(jax.random.PRNGKey(1), taps, mask)["params"]
  apply = jax.jit(lambda t: module.apply({"params": params}, t, mask))
  proxies = apply(taps)
  assert proxies.shape == (BATCH, NUM_QUERIES, 48)
  assert set(params) == {"queries", "read_1", "read_3", "out_norm", "proxy_proj"}
  padded = {k: v.at[1, 4:].set(100.0) for k, v in taps.items()}  # only padded positions
  np.testing.assert_allclose(apply(padded), proxies, atol=1e-6)
  changed = apply({k: v.at[1, 2].set(100.0) for k, v in taps.items()})
  assert not np.allclose(changed[1], proxies[1])
  np.testing.assert_allclose(changed[0], proxies[0], atol=1e-6)
  with pytest.raises(ValueError, match="taps"):
    module.apply({"params": params}, {1: taps[1]}, mask)


def _interpreted(implementation):
  """The Pallas kernel runs in Pallas's interpreter on CPU."""
  return (pltpu.force_tpu_interpret_mode() if implementation == "pallas"
          else contextlib.nullcontext())


@pytest.mark.parametrize("implementation", layers.DEPTHWISE_IMPLEMENTATIONS)
@pytest.mark.parametrize("size", [3, 4, 7])
def test_depthwise_conv_equals_grouped_conv(size, implementation):
  """Every depthwise conv has nn.Conv's parameters, outputs and gradients (a width of 5:
  the Pallas kernel's shifted copies wrap around and zero the wrapped columns)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 5, 8))
  ours = layers.DepthwiseConv(size, implementation=implementation)
  grouped = nn.Conv(8, (size, size), padding="SAME", feature_group_count=8)
  params = grouped.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias too
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  with _interpreted(implementation):
    assert jax.tree.map(jnp.shape, jax.eval_shape(ours.init, jax.random.PRNGKey(1), x)) == (
        jax.tree.map(jnp.shape, params))
    out = jax.block_until_ready(ours.apply(params, x))
    grads = jax.block_until_ready(jax.grad(loss(ours), argnums=(0, 1))(params, x))
  np.testing.assert_allclose(out, grouped.apply(params, x), atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads),
                  jax.tree.leaves(jax.grad(loss(grouped), argnums=(0, 1))(params, x))):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_pallas_depthwise_runs_per_device_and_sums_the_kernel_gradient():
  """Under a mesh of 8 devices the Pallas depthwise conv runs once per device on its batch
  shard (shard_map: XLA does not partition Mosaic kernels) with the kernel whole on every
  device, and the kernel's gradient is the sum over all devices' images. The numbers are
  checked through the same wrapper around XLA's grouped conv: Pallas's TPU interpreter
  runs 8 simulated devices in lockstep, which aborts on a loaded 2-core host."""
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 16))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (5, 5, 16))
  loss = lambda conv: lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel)))

  def grads(conv):
    def run(x, kernel):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.grad(loss(conv), argnums=(0, 1))(x, kernel)
    return run

  program = str(jax.make_jaxpr(grads(layers.pallas_depthwise_conv))(x, kernel))
  assert "shard_map" in program and "s4eca_depthwise" in program
  per_device = lambda x, kernel: layers._per_device(  # pylint: disable=protected-access
      layers.grouped_depthwise_conv, x, kernel, replicated=1)
  data = NamedSharding(mesh, P(("data", "fsdp")))
  got = jax.jit(grads(per_device), in_shardings=(data, NamedSharding(mesh, P())))(x, kernel)
  want = jax.grad(loss(layers.grouped_depthwise_conv), argnums=(0, 1))(x, kernel)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size,use_bias", [(7, True), (4, False), (3, True)])
def test_banded_conv_is_nn_conv(size, use_bias):
  """BandedConv (one matmul per kernel row against a banded matrix) has nn.Conv's
  parameters, init, outputs and gradients at stride 1, "SAME" padding, an even kernel
  included, on a map narrower than the kernel too."""
  for shape in [(2, 9, 6, 5), (1, 4, 3, 2)]:
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    ours = layers.BandedConv(3, size, use_bias=use_bias)
    conv = nn.Conv(3, (size, size), padding="SAME", use_bias=use_bias)
    params = conv.init(jax.random.PRNGKey(1), x)
    mine = ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(mine["params"]["kernel"], params["params"]["kernel"])
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias too
    np.testing.assert_allclose(ours.apply(params, x), conv.apply(params, x), atol=1e-5)
    loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
    for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(params, x)),
                    jax.tree.leaves(jax.grad(loss(conv), argnums=(0, 1))(params, x))):
      np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("conv", [layers.depthwise_conv, layers.grouped_depthwise_conv])
def test_depthwise_conv_accumulates_in_f32_at_bf16(conv):
  """bf16 inputs: the output is the exact sum (f64 of the bf16 values) rounded once to
  bf16, i.e. within 2^-8 relative; a bf16 running sum of 49 taps is off by far more.
  Same for the kernel gradient (a sum over batch and pixels)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 12, 12, 32)) + 3.0, jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(7, 7, 32)), jnp.bfloat16)
  grad = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
  out, vjp = jax.vjp(conv, x, kernel)
  _, grad_kernel = vjp(grad)
  assert out.dtype == grad_kernel.dtype == jnp.bfloat16
  # XLA:CPU accumulates a bf16 convolution in f32 anyway, so the numbers below cannot tell
  # whether the grouped conv asks for it; its program (forward and both gradients) can.
  program = str(jax.make_jaxpr(lambda x, k: jax.vjp(conv, x, k)[1](grad))(x, kernel))
  assert program.count("preferred_element_type=float32") == program.count(
      "conv_general_dilated ") + program.count("conv_general_dilated[")

  x64, k64, g64 = (np.asarray(a, np.float64) for a in (x, kernel, grad))
  views = [np.pad(x64, ((0, 0), (3, 3), (3, 3), (0, 0)))[:, i:i + 12, j:j + 12]
           for i in range(7) for j in range(7)]
  exact_out = sum(view * tap for view, tap in zip(views, k64.reshape(49, -1)))
  exact_grad_kernel = np.stack([(view * g64).sum((0, 1, 2)) for view in views]).reshape(7, 7, -1)
  for ours, exact in ((out, exact_out), (grad_kernel, exact_grad_kernel)):
    relative = np.abs(np.asarray(ours, np.float64) - exact) / np.abs(exact)
    assert relative.max() <= 2.0**-8 * 1.001, relative.max()


def test_depthwise_implementation_resolves_and_reaches_the_adapter():
  assert layers.resolve_depthwise("auto", "cpu") == "shifted"
  assert layers.resolve_depthwise("auto", "tpu") == "pallas"
  assert layers.resolve_depthwise("auto", "gpu") == "grouped"
  assert layers.resolve_depthwise("grouped", "tpu") == "grouped"
  with pytest.raises(ValueError, match="depthwise='conv'; use 'auto' or one of"):
    layers.resolve_depthwise("conv", "cpu")
  config = presets.s4eca_config("rrsis_d", "tiny")
  config.model.visual_adapter.depthwise = "grouped"
  model = s4eca.build_model(config, "cpu")
  assert model.image_encoder.adapter.keywords["depthwise"] == "grouped"
