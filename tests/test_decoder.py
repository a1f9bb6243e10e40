"""Decoder on tiny sizes: shapes, padding mask, sentence-generated kernel, switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from s4eca_jax.models import decoder, layers

BATCH, GRID, DIM, LENGTH, NUM_QUERIES, OUT = 2, (6, 5), 24, 7, 4, (42, 35)


def _inputs(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  maps = [jax.random.normal(k, (BATCH, *GRID, DIM)) for k in keys[:3]]
  sentence = jax.random.normal(keys[3], (BATCH, 16))
  words = jax.random.normal(keys[4], (BATCH, LENGTH, 20))
  word_mask = jnp.array([[1] * LENGTH, [1] * 3 + [0] * (LENGTH - 3)])
  proxies = jax.random.normal(keys[5], (BATCH, NUM_QUERIES, DIM))
  return maps, sentence, words, word_mask, proxies


MODULE = decoder.Decoder(width=32, num_layers=2, num_heads=4, mlp_dim=64,
                         projector_dims=(16, 8), norm_groups=4)


@pytest.fixture(scope="module")
def decoder_fn():
  maps, sentence, words, word_mask, proxies = _inputs()
  params = jax.jit(lambda: MODULE.init(
      jax.random.PRNGKey(0), maps, sentence, words, word_mask, proxies, OUT))()["params"]
  apply = jax.jit(lambda *args: MODULE.apply({"params": params}, *args, OUT))
  return params, apply


def test_decoder_shapes(decoder_fn):
  params, apply = decoder_fn
  out = apply(*_inputs())
  assert out["logits"].shape == (BATCH, *OUT) and out["logits"].dtype == jnp.float32
  assert out["low_res_logits"].shape == (BATCH, 4 * GRID[0], 4 * GRID[1])  # two x2 stages
  assert np.all(np.isfinite(out["logits"]))
  assert params["dynamic_kernel"]["kernel"].shape == (16, 8 + 1)  # sentence -> 1x1 kernel
  assert {f"layer_{i}" for i in range(2)} <= set(params)


def test_decoder_ignores_padded_words_and_reads_language(decoder_fn):
  _, apply = decoder_fn
  maps, sentence, words, word_mask, proxies = _inputs()
  logits = apply(maps, sentence, words, word_mask, proxies)["logits"]
  padded = apply(maps, sentence, words.at[1, 3:].set(50.0), word_mask, proxies)["logits"]
  np.testing.assert_allclose(padded, logits, atol=1e-5)
  for changed in (
      apply(maps, sentence, words.at[1, 1].set(50.0), word_mask, proxies),
      apply(maps, sentence.at[1].set(-sentence[1]), words, word_mask, proxies),
      apply(maps, sentence, words, word_mask, proxies.at[1].set(0.0))):
    assert not np.allclose(changed["logits"][1], logits[1], atol=1e-4)
    np.testing.assert_allclose(changed["logits"][0], logits[0], atol=1e-5)


def test_sentence_gate_switch():
  args = _inputs()
  shapes = lambda module: jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), *args, OUT))["params"]
  assert {f"tap_{i}_gate" for i in range(3)} <= set(shapes(MODULE))
  assert not any("gate" in name for name in shapes(MODULE.clone(sentence_gate=False)))


def test_sine_position_encoding():
  enc = decoder.sine_position_encoding(4, 6, 16)
  assert enc.shape == (4, 6, 16) and np.abs(enc).max() <= 1.0
  assert len({enc[i, j].tobytes() for i in range(4) for j in range(6)}) == 24  # all distinct
  with pytest.raises(ValueError, match="divisible by 4"):
    decoder.sine_position_encoding(4, 6, 18)


def test_coordinate_channels():
  coords = decoder.coordinate_channels(4, 6, 3)
  assert coords.shape == (4, 6, 6) and np.abs(coords).max() <= 1.0
  x_ramp, y_ramp = coords[..., 0], coords[..., 3]  # cos(pi u): 1 at left/top, -1 far side
  assert np.all(np.diff(x_ramp, axis=1) < 0) and np.all(np.diff(x_ramp, axis=0) == 0)
  assert np.all(np.diff(y_ramp, axis=0) < 0) and np.all(np.diff(y_ramp, axis=1) == 0)
  np.testing.assert_allclose(coords[:, :, 1], coords[:, ::-1, 1], atol=1e-6)  # centre bump


def test_coordinates_and_pixel_path():
  module = MODULE.clone(coordinate_freqs=2, pixel_dim=8)
  args = _inputs()
  images = jax.random.normal(jax.random.PRNGKey(7), (BATCH, *OUT, 3))
  params = module.init(jax.random.PRNGKey(0), *args, OUT, images=images)["params"]
  assert params["dynamic_kernel"]["kernel"].shape == (16, 8 + 4 + 1)  # + 2 x 2 coordinates
  assert params["upsample_0"]["conv"]["kernel"].shape[2] == 32 + 4  # width + coordinates
  apply = lambda p, imgs: module.apply({"params": p}, *args, OUT, images=imgs)["logits"]
  other = images[::-1]
  # The pixel query starts at zero: the path is a no-op until it trains.
  np.testing.assert_allclose(apply(params, images), apply(params, other), atol=1e-6)
  query = jax.random.normal(jax.random.PRNGKey(1), params["pixel_query"]["kernel"].shape)
  trained = {**params, "pixel_query": {**params["pixel_query"], "kernel": query}}
  changed = apply(trained, other)
  assert np.all(np.isfinite(changed))
  assert not np.allclose(apply(trained, images), changed, atol=1e-4)  # it reads the pixels
  with pytest.raises(ValueError, match="pixel_dim"):
    module.apply({"params": params}, *args, OUT)


@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_group_norm_matches_flax(offset):
  """layers.GroupNorm (sums mapped to groups by a matmul) against nn.GroupNorm: same
  parameter names and init, same outputs and input gradients."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 12)) * 2.0 + offset
  ours, theirs = layers.GroupNorm(num_groups=3), nn.GroupNorm(num_groups=3)
  params = theirs.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == jax.tree.map(
      jnp.shape, params)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=2e-5)
  grads = [jax.grad(lambda x, m=m: jnp.sum(jnp.sin(m.apply(params, x))))(x)
           for m in (ours, theirs)]
  np.testing.assert_allclose(grads[0], grads[1], atol=2e-4)
