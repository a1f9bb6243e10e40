"""Performance switches of the trainer's set-up: frozen params stored in bf16, the
abstract (weightless) build that the AOT tool compiles from, donation; the benchmark, its
stand-in weights and its profile summary."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import run_fixtures
from s4eca_jax import run_setup, sharding
from s4eca_jax.models import s4eca


def _dtypes(tree):
  return {leaf.dtype for leaf in jax.tree.leaves(tree)}


def test_frozen_bf16_and_abstract_build():
  config = run_fixtures.config("rrsisd", "variant=tiny")
  config.frozen_dtype = "bfloat16"
  mesh = sharding.make_mesh((("data", 1),))
  real = run_setup.build(config, mesh, total_steps=10)
  abstract = run_setup.build(config, mesh, total_steps=10, abstract=True)
  assert _dtypes(real.frozen) == {jnp.dtype(jnp.bfloat16)}
  assert _dtypes(real.state["params"]) == {jnp.dtype(jnp.float32)}  # trainable stays f32
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(
      (abstract.frozen, abstract.state)))
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(abstract.frozen) == shapes(real.frozen)
  assert shapes(abstract.state) == shapes(real.state)


def test_frozen_dtype_auto_is_the_compute_dtype():
  """Default "auto": frozen weights in bf16 where the step computes in bf16 (GPU, TPU), in
  f32 on CPU; the abstract TPU build (what aot compiles) carries them in bf16."""
  config = run_fixtures.config("rrsisd", "variant=tiny")
  assert config.frozen_dtype == "auto"
  assert run_setup.frozen_dtype(config, "cpu") == jnp.float32
  assert run_setup.frozen_dtype(config, "tpu") == jnp.bfloat16
  assert run_setup.frozen_dtype(config, "gpu") == jnp.bfloat16
  mesh = sharding.make_mesh((("data", 1),))
  tpu = run_setup.build(config, mesh, total_steps=10, abstract=True, backend="tpu")
  assert _dtypes(tpu.frozen) == {jnp.dtype(jnp.bfloat16)}
  assert _dtypes(tpu.state["params"]) == {jnp.dtype(jnp.float32)}
  config.model.compute_dtype = "float32"  # f32 compute keeps f32 weights
  assert run_setup.frozen_dtype(config, "tpu") == jnp.float32
  config.frozen_dtype = "float32"
  config.model.compute_dtype = "auto"
  assert run_setup.frozen_dtype(config, "tpu") == jnp.float32
  config.frozen_dtype = "half"
  with pytest.raises(ValueError, match="frozen_dtype='half'; use 'auto'"):
    run_setup.frozen_dtype(config, "cpu")


def test_norm_residuals_auto_is_compact_on_tpu_at_bf16():
  """model.norm_residuals: "auto" gives the image encoder "compact" norms (layers.LayerNorm
  for every norm over the stream) on TPU at bf16 compute only; "stream", "shared" and
  "compact" hold on any backend."""
  config = run_fixtures.config("rrsisd", "variant=tiny")
  assert config.model.norm_residuals == "auto"
  resolved = lambda backend: s4eca.build_model(config, backend).image_encoder.norm_residuals
  assert (resolved("tpu"), resolved("gpu"), resolved("cpu")) == ("compact", "stream", "stream")
  config.model.compute_dtype = "float32"
  assert resolved("tpu") == "stream"
  for name in ("stream", "shared", "compact"):
    config.model.norm_residuals = name
    assert resolved("cpu") == resolved("tpu") == name
  config.model.norm_residuals = "bf16"
  with pytest.raises(ValueError, match="norm_residuals='bf16'; use 'auto'"):
    resolved("cpu")


def test_donation_switch():
  config = run_fixtures.config("rrsisd", "variant=tiny")
  mesh = sharding.make_mesh((("data", 1),))
  setup = run_setup.build(config, mesh, total_steps=10, abstract=True)
  batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in {
      "image": ((2, 64, 64, 3), jnp.float32), "mask": ((2, 64, 64), jnp.float32),
      "input_ids": ((2, 22), jnp.int32), "attention_mask": ((2, 22), jnp.int32)}.items()}
  donated = lambda: "tf.aliasing_output" in run_setup.make_train_step(setup, config).lower(
      setup.state, setup.frozen, batch).as_text()
  assert donated()
  config.donate_state = False
  assert not donated()


def test_bench_times_train_and_eval_steps(capsys, tmp_path):
  # The train step donates its state: the eval timed after it must use the last step's
  # output, not the donated input (which raised "Array has been deleted").
  from s4eca_jax import bench  # pylint: disable=g-import-not-at-top

  config = run_fixtures.config("rrsisd", "variant=tiny")
  config.mesh = (("data", 2), ("fsdp", 1))
  results = bench.run(config, batch_size=4, steps=2, warmup=1, matmul_size=64,
                      torch_modes=("eager",), profile_dir=str(tmp_path / "profile"))
  out = capsys.readouterr().out
  for line in ("train step: ", "eval forward: ", "GFLOP/image", "MFU", "peak memory: ",
               "torch eager train (cpu, f32): ", "torch eager eval (cpu, f32): ", "JAX / torch"):
    assert line in out, line
  assert results["train"]["images_per_s_median"] > 0 and results["eval"]["images_per_s_min"] > 0
  assert results["gflop_per_image"] > 0 and results["devices"] == 2
  # The PyTorch peer ran the same batch (eager only here: torch.compile takes a minute).
  torch_eager = results["torch"]["eager"]
  assert torch_eager["train"]["images_per_s_median"] > 0 and "compiled" not in results["torch"]
  assert torch_eager["train"]["jax_over_torch"] == pytest.approx(
      results["train"]["images_per_s_median"] / torch_eager["train"]["images_per_s_median"])
  # The traced steps, summarised by op and by the model scope their HLO op_name names.
  summary = subprocess.run(
      [sys.executable, str(run_fixtures.REPO / "bench" / "profile_summary.py"),
       str(tmp_path / "profile")],
      capture_output=True, text=True, check=True).stdout
  assert "HLO names found" in summary, summary
  assert re.search(r"bwd image_encoder/block_\*/adapter", summary), summary
  assert re.search(r"fwd decoder", summary), summary


def test_stand_in_params_have_the_model_shapes_and_shardings():
  config = run_fixtures.config("rrsisd", "variant=tiny")
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 2)))
  model = s4eca.build_model(config)
  params, shardings = run_setup.stand_in_params(config, model, mesh)
  abstract, expected = run_setup.abstract_sharded_params(config, model, mesh)
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    want = abstract
    for key in path:
      want = want[key.key]
    assert (leaf.shape, leaf.dtype, leaf.sharding) == (want.shape, want.dtype, want.sharding)
    name = path[-1].key
    values = np.asarray(leaf)
    if name == "scale":
      assert (values == 1).all(), path
    elif name == "bias":
      assert (values == 0).all(), path
    else:  # drawn: normal / sqrt(fan-in)
      assert values.std() > 0, path
  assert shardings == expected


def test_bench_skeleton_is_our_frozen_encoder_forward_and_input_gradient(capsys):
  from s4eca_jax import bench  # pylint: disable=g-import-not-at-top

  config = run_fixtures.config("rrsisd", "variant=tiny")
  config.mesh = (("data", 2), ("fsdp", 1))
  mesh = sharding.make_mesh(config.mesh)
  step, abstract, shardings = bench.skeleton_step(config, mesh)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)]
  assert any("block_1" in p for p in paths) and not any("adapter" in p for p in paths)
  params = jax.device_put(run_setup.stand_in_values(abstract, 0), shardings)
  side = config.image_size
  images = jax.random.normal(jax.random.PRNGKey(0), (4, side, side, 3))
  grad = step(images, params)  # d loss / d images: back through every block
  assert grad.shape == images.shape and bool(jnp.isfinite(grad).all())
  assert float(jnp.abs(grad).max()) > 0

  # XLA's FLOPs: the input gradient through the blocks costs about as much again as the
  # forward pass (no weight gradients), so the skeleton is about twice the forward alone.
  encoder = bench.skeleton_encoder(config)
  forward = jax.jit(lambda i, p: encoder.apply({"params": p}, i)["tokens"])
  forward_flops = forward.lower(images, params).cost_analysis()["flops"]
  skeleton_flops = step.lower(images, params).cost_analysis()["flops"]
  assert 1.7 < skeleton_flops / forward_flops < 2.6, (skeleton_flops, forward_flops)

  results = bench.run_skeleton(config, batch_size=4, steps=2, warmup=1, matmul_size=64)
  out = capsys.readouterr().out
  assert "skeleton: " in out and "MFU" in out
  assert results["skeleton"]["images_per_s_median"] > 0 and results["gflop_per_image"] > 0
