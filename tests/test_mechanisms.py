"""Each adapter mechanism of SPEC.md "Model" against a hand computation in numpy (f64),
written from the spec's formulas with the module's parameters: scale weights, spatial
maps, their product on the branches, dense branch widths, the cross-attention residual,
the adapter's place in the ViT block, and the textual adapter's query updates; then the
encoders' f32 residual stream at bf16 compute and the normed decoder taps.

Every weight is random and non-zero (also the zero-initialised ones), so a mechanism that
is skipped or rewired changes the numbers.
"""

import functools
import math
import re

import flax
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from s4eca_jax.models import adapters, layers, text, vit

BATCH, DIM, WIDTH, PREFIX, GRID, NUM_QUERIES, HEADS = 2, 24, 8, 2, (5, 4), 3, 2
KERNELS = (3, 5, 7)
TOKENS = PREFIX + GRID[0] * GRID[1]
# f32 module against f64 numpy, through attention logits of a few units: ~1e-4 apart.
# A skipped or rewired mechanism moves the outputs by 1e-2 to 1.
RTOL, ATOL = 1e-3, 1e-4


def _numpy(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _random_params(module, *args, seed=0, **kwargs):
  """Parameters of `module` drawn at random, none zero: kernels ~ N(0, 1/fan_in), norm
  scales and LayerScale ~ 1 + N(0, 0.3^2), biases ~ N(0, 0.3^2). The zero-initialised
  leaves ("up", the spatial conv, biases) then take part too. Shapes from eval_shape: no
  init to compile."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(layers.abstract_params(module, *args, **kwargs))
  for path, leaf in sorted(flat.items()):
    noise = rng.normal(size=leaf.shape)
    if len(leaf.shape) > 1:
      flat[path] = noise / math.sqrt(math.prod(leaf.shape[:-1]))
    else:
      flat[path] = (1.0 if path[-1] in ("scale", "lambda1") else 0.0) + 0.3 * noise
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


# --------------------------------------------------------------------------------------
# The formulas, in numpy.
# --------------------------------------------------------------------------------------


def gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


def dense(p, x):
  return x @ p["kernel"] + p.get("bias", 0.0)


def layer_norm(p, x, eps):
  centred = x - x.mean(-1, keepdims=True)
  return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def softmax(x, axis):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def attention(p, queries, keys_values, heads, key_mask=None):
  """Multi-head attention; key_mask (B, Tk) 1 = valid."""
  split = lambda x: x.reshape(*x.shape[:2], heads, -1).transpose(0, 2, 1, 3)  # (B, h, T, d)
  q, k, v = (split(dense(p[name], x)) for name, x in
             (("query", queries), ("key", keys_values), ("value", keys_values)))
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])  # (B, h, Tq, Tk)
  if key_mask is not None:
    logits = np.where(key_mask[:, None, None, :] > 0, logits, -np.inf)
  out = softmax(logits, -1) @ v  # (B, h, Tq, d)
  return dense(p["out"], out.transpose(0, 2, 1, 3).reshape(*queries.shape[:2], -1))


def conv_same(x, kernel, bias=0.0):
  """Stride-1 "SAME" convolution: x (B, H, W, Ci), kernel (k, k, Ci, Co)."""
  k = kernel.shape[0]
  padded = np.pad(x, ((0, 0), ((k - 1) // 2, k // 2), ((k - 1) // 2, k // 2), (0, 0)))
  height, width = x.shape[1:3]
  return sum(padded[:, i:i + height, j:j + width] @ kernel[i, j]
             for i in range(k) for j in range(k)) + bias


def depthwise_same(x, kernel, bias):
  """kernel (k, k, 1, C): each channel convolved with its own k x k filter."""
  channels = x.shape[-1]
  full = np.zeros(kernel.shape[:2] + (channels, channels))
  full[:, :, np.arange(channels), np.arange(channels)] = kernel[:, :, 0]
  return conv_same(x, full, bias)


def branches_reference(p, patches):
  """Step 2: branch k reads [input ; b_1 .. b_{k-1}], 1x1 conv, depthwise conv, GELU."""
  branches = []
  for i in range(len(KERNELS)):
    inputs = np.concatenate([patches] + branches, axis=-1)
    y = dense(p[f"branch_{i}_pointwise"], inputs)
    dw = p[f"branch_{i}_depthwise"]
    branches.append(gelu(depthwise_same(y, dw["kernel"], dw["bias"])))
  return np.stack(branches, axis=3)  # (B, h, w, K, r)


def scale_weights_reference(p, branches, proxies_r):
  """Step 3: z = [GAP(sum_k b_k) ; mean_q Linear(P)] -> MLP -> softmax over k, per channel."""
  z = np.concatenate([branches.sum(3).mean((1, 2)), proxies_r.mean(1)], axis=-1)
  logits = dense(p["scale_fc2"], gelu(dense(p["scale_fc1"], z)))
  return softmax(logits.reshape(BATCH, len(KERNELS), WIDTH), axis=1)  # (B, K, r)


def spatial_maps_reference(p, branches, proxies_r, standardize):
  """Step 4: [cosine(features, each proxy) ; channel mean and max of each b_k] -> 7x7 conv
  -> sigmoid, one map per scale."""
  fused = branches.sum(3)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  cosine = np.einsum("bhwc,bqc->bhwq", unit(fused), unit(proxies_r))
  maps_in = np.concatenate([cosine, branches.mean(-1), branches.max(-1)], axis=-1)
  if standardize:
    maps_in = (maps_in - maps_in.mean((1, 2), keepdims=True)) / maps_in.std((1, 2), keepdims=True)
  conv = p["spatial_conv"]
  return 1.0 / (1.0 + np.exp(-conv_same(maps_in, conv["kernel"], conv["bias"])))  # (B, h, w, K)


def visual_adapter_reference(p, n, proxies, cross_attention=True, standardize=True):
  """A(n, P) of SPEC.md steps 1-6. Returns (output, {intermediate name: value})."""
  x = gelu(dense(p["down"], n))
  prefix, patches = x[:, :PREFIX], x[:, PREFIX:].reshape(BATCH, *GRID, WIDTH)
  proxies_r = dense(p["proxy_proj"], proxies)
  branches = branches_reference(p["multi_scale"], patches)
  alpha = scale_weights_reference(p, branches, proxies_r)
  maps = spatial_maps_reference(p, branches, proxies_r, standardize)
  u = np.einsum("bkc,bhwk,bhwkc->bhwc", alpha, maps, branches).reshape(BATCH, -1, WIDTH)
  if cross_attention:
    u = u + attention(p["cross_attn"], u, proxies_r, HEADS)
  out = dense(p["up"], np.concatenate([prefix, u], axis=1))
  return out, {"branches": branches, "scale_weights": alpha, "spatial_maps": maps}


# --------------------------------------------------------------------------------------
# The visual adapter.
# --------------------------------------------------------------------------------------


def _inputs(seed=0):
  rng = np.random.default_rng(100 + seed)
  return (jnp.asarray(rng.normal(size=(BATCH, TOKENS, DIM)), jnp.float32),
          jnp.asarray(rng.normal(size=(BATCH, NUM_QUERIES, DIM)), jnp.float32))


def _run_adapter(**fields):
  """Module output, its intermediates and the reference, with live parameters."""
  module = adapters.VisualAdapter(width=WIDTH, kernel_sizes=KERNELS, num_heads=HEADS, **fields)
  n, proxies = _inputs()
  kwargs = dict(context=proxies, num_prefix=PREFIX, grid=GRID)
  params = _random_params(module, n, **kwargs)
  out, state = jax.jit(lambda p: module.apply(
      {"params": p}, n, **kwargs, mutable="intermediates",
      capture_intermediates=lambda mdl, _: isinstance(mdl, adapters.DenseMultiScale)))(params)
  ours = {name: state["intermediates"][name][0] for name in ("scale_weights", "spatial_maps")}
  ours["branches"] = jnp.stack(state["intermediates"]["multi_scale"]["__call__"][0], axis=3)
  reference, parts = visual_adapter_reference(
      _numpy(params), *_numpy((n, proxies)), cross_attention=fields.get("cross_attention", True),
      standardize=fields.get("spatial_standardize", True))
  return params, (out, ours), (reference, parts)


@pytest.fixture(scope="module")
def adapter_run():
  return _run_adapter()


def test_dense_branches_read_r_2r_3r_channels(adapter_run):
  params, (_, ours), (_, parts) = adapter_run
  widths = [params["multi_scale"][f"branch_{i}_pointwise"]["kernel"].shape[0] for i in range(3)]
  assert widths == [WIDTH, 2 * WIDTH, 3 * WIDTH]
  np.testing.assert_allclose(ours["branches"], parts["branches"], rtol=RTOL, atol=ATOL)


def test_scale_weights_are_a_softmax_over_scales_per_channel(adapter_run):
  _, (_, ours), (_, parts) = adapter_run
  assert ours["scale_weights"].shape == (BATCH, len(KERNELS), WIDTH)
  np.testing.assert_allclose(ours["scale_weights"], parts["scale_weights"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("standardize", [True, False])
def test_spatial_maps(standardize):
  _, (_, ours), (_, parts) = _run_adapter(spatial_standardize=standardize)
  assert ours["spatial_maps"].shape == (BATCH, *GRID, len(KERNELS))
  np.testing.assert_allclose(ours["spatial_maps"], parts["spatial_maps"], rtol=RTOL, atol=ATOL)


def test_scale_and_space_select_the_branches():
  """u = sum_k alpha_k * m_k * b_k, up-projected (cross-attention off)."""
  _, (out, _), (reference, _) = _run_adapter(cross_attention=False)
  np.testing.assert_allclose(out, reference, rtol=RTOL, atol=ATOL)


def test_cross_attention_is_a_residual_on_the_selection(adapter_run):
  """u <- u + MHA(query=u, key/value=Linear(P)), then up-projected."""
  _, (out, _), (reference, _) = adapter_run
  np.testing.assert_allclose(out, reference, rtol=RTOL, atol=ATOL)


def test_adapter_sits_in_parallel_with_the_mlp_inside_layerscale():
  """x <- x + LS1(Attn(LN1(x))); x <- x + LS2(MLP(n) + s * A(n, P)), n = LN2(x)."""
  scale, eps = 0.2, 1e-6
  block = vit.VisionBlock(
      num_heads=HEADS, mlp_dim=2 * DIM, act="gelu", layer_norm_eps=eps, layerscale=True,
      adapter=lambda name: adapters.VisualAdapter(width=WIDTH, kernel_sizes=KERNELS,
                                                  num_heads=HEADS, name=name),
      adapter_scale=scale, num_prefix=PREFIX, grid=GRID)
  x, proxies = _inputs(seed=1)
  params = _random_params(block, x, proxies, seed=1)
  out = jax.jit(block.apply)({"params": params}, x, proxies)

  p, x, proxies = _numpy((params, x, proxies))
  x = x + p["ls1"]["lambda1"] * attention(p["attn"], *(layer_norm(p["norm1"], x, eps),) * 2,
                                          HEADS)
  n = layer_norm(p["norm2"], x, eps)
  mlp = dense(p["mlp"]["fc2"], gelu(dense(p["mlp"]["fc1"], n)))
  adapter, _ = visual_adapter_reference(p["adapter"], n, proxies)
  np.testing.assert_allclose(out, x + p["ls2"]["lambda1"] * (mlp + scale * adapter),
                             rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------
# The textual adapter.
# --------------------------------------------------------------------------------------


def test_textual_adapter_query_updates():
  """At each read block: Q <- Q + CrossAttn(LN(Q), LN(words), pad mask); Q <- Q +
  FFN(LN(Q)). Proxies = Linear(LN(Q)) after the last one."""
  blocks, eps, length, text_width = (1, 3), 1e-6, 6, 20
  module = adapters.TextualAdapter(blocks=blocks, out_dim=DIM, num_queries=NUM_QUERIES,
                                   width=8, num_heads=HEADS)
  rng = np.random.default_rng(3)
  taps = {k: jnp.asarray(rng.normal(size=(BATCH, length, text_width)), jnp.float32)
          for k in (1, 2, 3)}
  mask = jnp.array([[1] * length, [1] * 3 + [0] * (length - 3)])
  params = _random_params(module, taps, mask, seed=2)
  out = jax.jit(module.apply)({"params": params}, taps, mask)

  p, taps, mask = _numpy((params, taps, mask))
  queries = np.broadcast_to(p["queries"], (BATCH, NUM_QUERIES, text_width))
  for k in blocks:
    read = p[f"read_{k}"]
    queries = queries + attention(read["attn"], layer_norm(read["query_norm"], queries, eps),
                                  layer_norm(read["word_norm"], taps[k], eps), HEADS, mask)
    normed = layer_norm(read["ffn_norm"], queries, eps)
    queries = queries + dense(read["ffn"]["fc2"], gelu(dense(read["ffn"]["fc1"], normed)))
  expected = dense(p["proxy_proj"], layer_norm(p["out_norm"], queries, eps))
  np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------
# The encoders around the adapters: f32 residual stream, normed decoder taps.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("f32_residual", [True, False])
def test_residual_stream_dtype_at_bf16_compute(f32_residual):
  """model.f32_residual: the stream between blocks (the taps) stays f32 at bf16 compute.
  Dtypes from tracing alone (eval_shape): nothing to compile."""
  stream = jnp.float32 if f32_residual else jnp.bfloat16
  common = dict(width=16, depth=2, num_heads=2, mlp_dim=32, f32_residual=f32_residual,
                dtype=jnp.bfloat16)
  vision = vit.VisionTransformer(family="dinov2", patch_size=4, pretrain_grid=2,
                                 num_registers=1, **common)
  images = jnp.ones((1, 8, 8, 3))
  apply = lambda module, *args: jax.eval_shape(
      functools.partial(module.apply, taps=(1, 2)),
      {"params": layers.abstract_params(module, *args)}, *args)
  out = apply(vision, images)
  assert all(out["taps"][k].dtype == stream for k in (1, 2))
  ids, mask = jnp.arange(12).reshape(2, 6) + 3, jnp.ones((2, 6), jnp.int32)
  for encoder in (text.ClipTextEncoder(vocab_size=50, projection_dim=8, **common),
                  text.BertEncoder(vocab_size=50, max_positions=16, **common)):
    out = apply(encoder, ids, mask)
    assert all(out["taps"][k].dtype == stream for k in (1, 2)), type(encoder).__name__


def test_normed_taps_go_through_the_final_norm():
  encoder = vit.VisionTransformer(family="dinov2", width=16, depth=2, num_heads=2, mlp_dim=32,
                                  patch_size=4, pretrain_grid=2, num_registers=1)
  images = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 3))
  params = jax.jit(encoder.init)(jax.random.PRNGKey(1), images)["params"]
  norm = params["final_norm"] = {"scale": 1.0 + jnp.arange(16.0) / 8, "bias": jnp.arange(16.0)}
  taps = jax.jit(lambda norm_taps: encoder.apply({"params": params}, images, taps=(1,),
                                                 norm_taps=norm_taps)["taps"][1],
                 static_argnums=0)
  raw, normed = taps(False), taps(True)
  raw = np.asarray(raw, np.float64)
  centred = raw - raw.mean(-1, keepdims=True)
  expected = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(normed, expected * norm["scale"] + norm["bias"], rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compact_layer_norm_is_flax_layer_norm_forward_and_backward(dtype):
  """layers.LayerNorm (model.norm_residuals="compact"): nn.LayerNorm's output to the bit
  on an f32 stream; its gradients those of autodiff, to f32 rounding at f32 and to the bf16
  rounding of the saved normed input at bf16."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = 3.0 * jax.random.normal(keys[0], (2, 7, DIM)) + 1.5
  params = {"scale": (1.0 + 0.3 * jax.random.normal(keys[1], (DIM,))).astype(dtype),
            "bias": jax.random.normal(keys[2], (DIM,)).astype(dtype)}
  weights = jax.random.normal(keys[3], (2, 7, DIM))
  ours, flax_norm = layers.LayerNorm(1e-6, dtype=dtype), flax.linen.LayerNorm(1e-6, dtype=dtype)
  np.testing.assert_array_equal(ours.apply({"params": params}, x),
                                flax_norm.apply({"params": params}, x))
  grads = lambda module: jax.grad(lambda p, x: jnp.sum(
      module.apply({"params": p}, x).astype(jnp.float32) * weights), argnums=(0, 1))(params, x)
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  for got, want in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(flax_norm))):
    assert got.dtype == want.dtype
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tolerance,
                               atol=tolerance * np.abs(want).max())


def test_norm_residuals_keep_the_f32_stream_only_where_asked(capsys):
  """VisionTransformer(norm_residuals=...) at bf16 compute, counting what the backward
  keeps of the stream's shape in f32: autodiff of nn.LayerNorm ("stream") keeps several
  such arrays per norm; "shared" only for norm2 of a block without an adapter; "compact"
  none, and a bf16 normed input for each of the seven norms instead. Residuals from
  tracing alone (jax.ad_checkpoint)."""

  class Adapter(flax.linen.Module):  # anything that reads norm2's output
    @flax.linen.compact
    def __call__(self, x, context, num_prefix, grid):
      return flax.linen.Dense(x.shape[-1], dtype=x.dtype)(x)

  counts = {}
  for mode in layers.NORM_RESIDUALS:
    encoder = vit.VisionTransformer(
        family="dinov2", width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=4,
        pretrain_grid=2, num_registers=1, adapter=Adapter, adapter_blocks=(2,),
        norm_residuals=mode, dtype=jnp.bfloat16)
    images = jnp.ones((1, 8, 8, 3))
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                          layers.abstract_params(encoder, images))
    # The input gradient flows back through every block's norms and the final norm.
    loss = lambda images: jnp.sum(encoder.apply({"params": params}, images)["tokens"])
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, images)
    stream = re.findall(r"^(\w+)\[1,6,16\]", capsys.readouterr().out, re.MULTILINE)
    counts[mode] = stream.count("f32")
    assert mode != "compact" or stream.count("bf16") >= 7, stream  # normed: 2 per block, 1
  # Seven norms (two per block, the final one); "shared" keeps the f32 input of two of them,
  # norm2 of blocks 1 and 3 (no adapter there), as many arrays each as under autodiff.
  per_norm = counts["stream"] // 7
  assert per_norm and counts["stream"] == 7 * per_norm, counts
  assert counts["shared"] == 2 * per_norm and counts["compact"] == 0, counts
