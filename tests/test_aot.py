"""The AOT tool: topology names, the tiny config compiled for a 2x2 v5e slice, the HBM
traffic estimate, and Pallas attention's layout on TPU."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import run_fixtures
from s4eca_jax import aot, kernel_profile, roofline
from s4eca_jax.models import flash, layers


def test_topology_names():
  assert aot.topology_shape("v5e-4") == ("v5e", "2x2")
  assert aot.topology_shape("v5e-256") == ("v5e", "16x16")
  assert aot.topology_shape("v5p-128") == ("v5p", "4x4x4")  # 128 TensorCores = 64 chips
  assert aot.topology_shape("v5p-8") == ("v5p", "2x2x1")  # 4 chips: one host's 2x2x1
  assert aot.topology_shape("v5p-32") == ("v5p", "2x2x4")
  assert aot.topology_shape("v5e:2x4") == ("v5e", "2x4")
  with pytest.raises(ValueError, match="GEN-COUNT"):
    aot.topology_shape("tpu-4")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 's4eca-jax[tpu]'): no XLA "
                    "TPU compiler on this host")
def test_tiny_train_step_compiles_for_v5e_2x2(capsys):
  config = run_fixtures.config("rrsisd", "variant=tiny")
  results = aot.run(config, "v5e:2x2", batch_size=8, with_eval=False, traffic_top=5,
                    time_top=3)
  out = capsys.readouterr().out
  assert "4 x TPU v5 lite (v5e)" in out
  for line in ("memory per chip: arguments", "roofline: compute", "collectives: ",
               "HBM traffic per chip", "roofline with the HBM estimate: compute",
               "largest per-chip batch (estimate", "backward Pallas flash kernels (flash.py)"):
    assert line in out, line
  train = results["train"]
  # "auto" keeps XLA for the 22-token text tower; every image block runs the project's
  # Pallas flash kernels (the decoder's layers add theirs), whose cost estimates XLA counts:
  # nothing is added analytically. The first block's backward is not needed (no trainable
  # parameter before it).
  depth = config.image_encoder.depth
  assert train["own"]["forward"] >= depth and train["own"]["backward"] >= depth - 1
  assert train["added"]["kernels"] == 0
  assert "all-reduce" in train["collectives"]  # gradients summed over the data axis
  assert 0 < train["memory"]["total"] < 16 * 2**30
  # XLA keeps most of the tiny step's arrays in VMEM: HBM traffic is a part of "accessed".
  assert 0 < train["hbm_bytes"] < train["bytes"]
  # The traffic ranking names module paths of both passes.
  ranking = out.split("traffic by module", 1)[1].splitlines()[1:6]
  assert any("backward decoder/" in line for line in ranking), ranking
  assert all(" GB " in line for line in ranking), ranking
  # The compiler's per-op cycles plus the kernels at their roofline: a step time that is
  # at least the compute roofline, with the kernels a part of it.
  assert "XLA's per-op cost model:" in out
  assert 0 < train["model_kernel_seconds"] < train["model_seconds"]
  assert train["model_seconds"] >= train["flops"] / roofline.CHIPS["v5e"].bf16_flops
  timing = out.split("time by module", 1)[1].splitlines()[1:4]
  assert all(" ms " in line for line in timing), timing
  # The adapters' depthwise kernels (3x3, 5x5, 7x7 branches, forward and input gradient)
  # record themselves; each is compiled alone in a child process with the static profiler
  # on, and priced. The tiny config's flash kernels (heads of 16 in a 32-lane block:
  # matmuls over partial tiles, on which the profiler aborts) do not record themselves
  # and keep their roofline; the rrsisd ones (128-lane blocks) are recorded and priced
  # (test_kernel_profile_prices_kernels_alone_and_survives_an_abort).
  priced = re.search(r"static profile, each compiled alone: (\d+) of (\d+) recorded", out)
  assert priced and priced.groups() == ("6", "6") and "not priced" not in out, out
  assert 0 < train["model_profiled_kernel_seconds"] < train["model_kernel_seconds"]


HLO = """\
HloModule step

%fused_add (a: f32[256], b: f32[256]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  %b = f32[256]{0} parameter(1)
  ROOT %add = f32[256]{0} add(%a, %b)
}

ENTRY %main (p0: f32[256], p1: f32[1024]) -> f32[256] {
  %p0 = f32[256]{0:T(256)} parameter(0)
  %p1 = f32[1024]{0:T(256)} parameter(1)
  %copy-start = (f32[256]{0:T(256)S(1)}, f32[256]{0:T(256)}, u32[]{:S(2)}) copy-start(%p0)
  %copy-done = f32[256]{0:T(256)S(1)} copy-done(%copy-start)
  %slice-start = ((f32[1024]{0:T(256)}), f32[256]{0:T(256)S(1)}, s32[]{:S(2)}) slice-start(%p1), slice={[0:256]}
  %slice-done = f32[256]{0:T(256)S(1)} slice-done(%slice-start)
  %fusion = f32[256]{0:T(256)S(1)} fusion(%copy-done, %slice-done), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/decoder/add"}
  %fusion.1 = f32[256]{0:T(256)} fusion(%fusion, %p0), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/decoder/add"}
  %copy-start.1 = (f32[256]{0:T(256)}, f32[256]{0:T(256)S(1)}, u32[]{:S(2)}) copy-start(%fusion)
  ROOT %copy-done.1 = f32[256]{0:T(256)} copy-done(%copy-start.1)
}
"""


def test_hbm_traffic_counts_only_arrays_outside_vmem():
  """1 KiB arrays: a prefetch and a sliced prefetch read HBM once each, the fusion on VMEM
  operands moves no HBM bytes, the second fusion reads p0 and writes its result in HBM
  (its VMEM operand is free), the eviction writes HBM once."""
  kib = 1024
  hbm = roofline.traffic_by_source(HLO, hbm_only=True)
  assert hbm["memory-space copies (copy-start, slice-start)"] == 3 * kib
  assert hbm["forward decoder/add"] == 2 * kib
  every = roofline.traffic_by_source(HLO)
  assert every["memory-space copies (copy-start, slice-start)"] == 6 * kib
  assert every["forward decoder/add"] == 6 * kib


TIMED_HLO = """\
ENTRY %main (p0: bf16[512,512]) -> bf16[512,512] {
  %p0 = bf16[512,512]{1,0} parameter(0)
  %fusion = bf16[512,512]{1,0} fusion(%p0), kind=kOutput, calls=%f, metadata={op_name="jit(step)/jvp(step)/decoder/ffn/dot_general"}, backend_config={"window_config":{"estimated_cycles":"3000000","iteration_bounds":["4"]}}
  %fusion.1 = bf16[512,512]{1,0} fusion(%fusion), kind=kLoop, calls=%g, metadata={op_name="jit(step)/transpose(jvp(step))/decoder/ffn/dot_general"}, backend_config={"window_config":{"estimated_cycles":"1500000"}}
  %copy-start = (bf16[512,512]{1,0:S(1)}, bf16[512,512]{1,0}, u32[]{:S(2)}) copy-start(%fusion.1)
  %kernel = bf16[512,512]{1,0} custom-call(%p0), custom_call_target="tpu_custom_call", metadata={op_name="jit(step)/jvp(step)/decoder/attn/pallas_call"}, backend_config={"custom_call_config":{"body":"x","cost_estimate":{"flops":"197000000000","transcendentals":"5","bytes_accessed":"1638000000"}}}
  ROOT %concat = bf16[512,512]{1,0} custom-call(%kernel), custom_call_target="ConcatBitcast"
}
"""


def test_time_by_source_reads_the_compilers_cycles_and_prices_kernels_at_their_roofline():
  """v5e: 1.5 GHz, 197 TFLOP/s, 819 GB/s. The kernel's 0.197 TFLOP take 1 ms, its 1.638 GB
  2 ms: it is charged 2 ms; the copy and the custom call without an estimate nothing."""
  chip = roofline.CHIPS["v5e"]
  times = roofline.time_by_source(TIMED_HLO, chip)
  assert times == pytest.approx({
      "forward decoder/ffn/dot_general": 2e-3, "backward decoder/ffn/dot_general": 1e-3,
      "forward decoder/attn/pallas_call" + roofline.KERNEL_ROOFLINE: 2e-3})
  with pytest.raises(ValueError, match="clock"):
    roofline.time_by_source(TIMED_HLO, roofline.CHIPS["H100"])
  # A kernel priced by its static profile (kernel_profile.key: its name, which the HLO
  # instruction's name contains, and its operand types): 750,000 cycles, 0.5 ms. Another
  # kernel of the same name and other operands keeps its roofline.
  priced = {kernel_profile.key("kernel", [((512, 512), "bfloat16")]): 750_000}
  times = roofline.time_by_source(TIMED_HLO, chip, kernel_cycles=priced)
  assert times["forward decoder/attn/pallas_call" + roofline.KERNEL_PROFILED] == pytest.approx(
      0.5e-3)
  assert roofline.kernel_seconds(times) == roofline.kernel_seconds(times, profiled=True)
  other = {kernel_profile.key("kernel", [((512, 256), "bfloat16")]): 750_000}
  assert roofline.kernel_seconds(roofline.time_by_source(
      TIMED_HLO, chip, kernel_cycles=other), profiled=False) == pytest.approx(2e-3)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 's4eca-jax[tpu]'): no XLA "
                    "TPU compiler on this host")
def test_kernel_profile_prices_kernels_alone_and_survives_an_abort():
  """The child compiles each call alone with libtpu's static profiler on and reports its
  cycles. The profiler aborts the process on a kernel with a bf16 select feeding a matmul
  (tests/profiler_abort.py): that kernel is reported as not priced, the child restarts,
  and the kernels after it are priced. A flash forward recorded per image (two images)
  is compiled for one and counted twice."""
  kernel_profile.CALLS.clear()
  q = jnp.zeros((2, 128, 128), jnp.bfloat16)
  valid = jnp.ones((2, 1, 128), jnp.int32)
  forward = lambda q, valid: flash._forward(q, q, q, valid, 0.125, False, 2)
  jax.eval_shape(forward, q, valid)
  jax.eval_shape(forward, q[..., :32], valid)  # heads of 16: a 32-lane block, not recorded
  (flash_key, flash_call), = kernel_profile.CALLS.items()
  assert flash_call.shapes[0] == ((1, 128, 128), "bfloat16") and flash_call.times == 2
  one_image = flash_call._replace(times=1)
  aborts = kernel_profile.Call("tests.profiler_abort", "masked_gram", {},
                               [((128, 128), "bfloat16")], 1)
  depthwise_call = kernel_profile.Call(
      "s4eca_jax.models.depthwise", "_conv", {"k": 3, "before": 1},
      [((2, 8, 8, 128), "bfloat16"), ((9, 1, 128), "float32")], 1)
  calls = {("aborts", 0): aborts, ("depthwise", 0): depthwise_call, flash_key: flash_call,
           ("one image", 0): one_image}
  cycles, failures = kernel_profile.cycles("v5e:2x2", calls)
  kernel_profile.CALLS.clear()
  assert set(cycles) == {("depthwise", 0), flash_key, ("one image", 0)}, (cycles, failures)
  assert cycles[("depthwise", 0)] > 0 and cycles[("one image", 0)] > 0
  assert cycles[flash_key] == 2 * cycles[("one image", 0)]
  assert len(failures) == 1 and failures[0].startswith("aborts"), failures


def test_time_ranking_says_when_the_target_has_no_cycle_model():
  """On CPU (or a GPU) there are no cycle estimates: --time_top says so instead of
  printing nothing, and the step time is left out."""
  compiled = jax.jit(lambda x: jnp.tanh(x) * 2).lower(jnp.zeros((4, 8))).compile()
  lines, numbers = aot.describe("train", compiled, 4, 1, None, time_top=3)
  assert any("no cycle model for this target" in line for line in lines), lines
  assert "model_seconds" not in numbers


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 's4eca-jax[tpu]'): no XLA "
                    "TPU compiler on this host")
@pytest.mark.parametrize("generation", ["v5e", "v5p"])
def test_chip_clocks_match_the_compilers_cycles_for_a_big_matmul(generation):
  """A 4096^3 bf16 matmul on one chip: the compiler's estimated cycles at the table's clock
  are within 15% above the matmul's time at the public peak (the MXUs nearly full). A
  clock off by a generation's ratio (1.5 against 1.75 GHz) falls outside."""
  devices = aot.target_devices(f"{generation}:2x2" + ("x1" if generation == "v5p" else ""))
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=sharding)
  hlo = jax.jit(jnp.matmul).lower(x, x).compile().as_text()
  chip = roofline.CHIPS[generation]
  seconds = sum(roofline.time_by_source(hlo, chip).values())
  peak_seconds = 2 * 4096**3 / chip.bf16_flops
  assert 1.0 <= seconds / peak_seconds <= 1.15, seconds / peak_seconds


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 's4eca-jax[tpu]'): no XLA "
                    "TPU compiler on this host")
def test_pallas_attention_on_tpu_is_token_major_with_compact_statistics():
  """Compiled for v5e, Pallas attention's forward and backward run on the projections'
  own (B, T, heads * head_dim) arrays: no array with a 64-wide minor dimension (a
  heads-first (B, heads, T, 64) layout, half-empty 128-lane tiles), no 4-D copy or
  transpose between layouts; and the project's kernels keep one statistic per row and
  head. With jax's kernel (heads-first, forced by a 0 length limit) the first check
  fails: bf16[2,4,256,64] and the like."""
  devices = aot.target_devices("v5e:2x2")
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1), ("data",))
  placed = lambda tree, spec: jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=jax.sharding.NamedSharding(mesh, spec)), tree)
  module = layers.MultiHeadAttention(4, attention="pallas", dtype=jnp.bfloat16)
  tokens = jnp.zeros((8, 200, 256), jnp.float32)  # 4 heads of 64: two per kernel step
  params = placed(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens)),
                  jax.sharding.PartitionSpec())

  def input_grad(params, x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jax.grad(lambda y: jnp.sum(module.apply(params, y).astype(jnp.float32)**2))(x)

  hlo = jax.jit(input_grad).lower(
      params, placed(tokens, jax.sharding.PartitionSpec("data"))).compile().as_text()
  assert "s4eca_flash_backward" in hlo
  heads_first = re.findall(r"(?:bf16|f32)\[\d+,\d+,\d+,64\]", hlo)
  assert not heads_first, heads_first[:4]
  moves = re.findall(r"= (?:bf16|f32)\[\d+,\d+,\d+,\d+\]\S* (copy|transpose)\(", hlo)
  assert not moves, moves
  # The row statistics are lane-dense (B, heads, 1, T), not repeated over 128 lanes as in
  # jax's kernel: no f32 (B, heads, T, 128) array anywhere.
  repeated = re.findall(r"f32\[\d+,\d+,\d+,128\]", hlo)
  assert not repeated, repeated


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 's4eca-jax[tpu]'): no XLA "
                    "TPU compiler on this host")
def test_attention_aot_script_compares_the_kernels():
  """bench/attention_aot.py at DINOv2's length, 4 heads, 2 images per chip: both kernels
  compile for v5e, and ours moves fewer bytes (no statistics repeated over 128 lanes, no
  padding, one backward kernel)."""
  moved = {}
  for kernel in ("own", "jax"):
    out = subprocess.run(
        [sys.executable, "bench/attention_aot.py", "--kernel", kernel, "--batch", "8",
         "--heads", "4", "--length", "1029"], capture_output=True, text=True, check=True,
        cwd=pathlib.Path(__file__).parents[1]).stdout
    moved[kernel] = float(re.search(r"XLA bytes accessed ([\d.]+) GB", out).group(1))
  assert 0 < moved["own"] < moved["jax"], moved


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 's4eca-jax[tpu]'): no XLA "
                    "TPU compiler on this host")
def test_depthwise_aot_script_prices_both_convolutions():
  """bench/depthwise_aot.py on a small 3x3 case: both convolutions compile for v5e and
  are priced by the compiler (the kernel by its static profile, nothing at a roofline),
  and the kernel on the vector unit takes fewer cycles than the grouped convolution."""
  out = subprocess.run(
      [sys.executable, "bench/depthwise_aot.py", "--sizes", "3", "--batch", "2", "--grid",
       "16", "--channels", "128"], capture_output=True, text=True, check=True,
      cwd=pathlib.Path(__file__).parents[1]).stdout
  assert "NOT PRICED" not in out, out
  times = {name: float(us) for name, us in re.findall(r"3x3 (\w+)\s+([\d.]+) us", out)}
  assert set(times) == {"grouped", "pallas"}, out
  assert 0 < times["pallas"] < times["grouped"], times
