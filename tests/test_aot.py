"""The AOT tool: topology names, and the tiny config compiled for a 2x2 v5e slice."""

import importlib.util

import pytest

from tests import run_fixtures
from s4eca_jax import aot


def test_topology_names():
  assert aot.topology_shape("v5e-4") == ("v5e", "2x2")
  assert aot.topology_shape("v5e-256") == ("v5e", "16x16")
  assert aot.topology_shape("v5p-128") == ("v5p", "4x4x4")  # 128 TensorCores = 64 chips
  assert aot.topology_shape("v5e:2x4") == ("v5e", "2x4")
  with pytest.raises(ValueError, match="GEN-COUNT"):
    aot.topology_shape("tpu-4")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 's4eca-jax[tpu]'): no XLA "
                    "TPU compiler on this host")
def test_tiny_train_step_compiles_for_v5e_2x2(capsys):
  config = run_fixtures.config("rrsisd", "variant=tiny")
  results = aot.run(config, "v5e:2x2", batch_size=8, with_eval=False, traffic_top=5)
  out = capsys.readouterr().out
  assert "4 x TPU v5 lite (v5e)" in out
  for line in ("memory per chip: arguments", "roofline: compute", "collectives: ",
               "largest per-chip batch (estimate", "Pallas flash-attention kernels"):
    assert line in out, line
  train = results["train"]
  # "auto" keeps XLA for the 22-token text tower; every image block runs Pallas flash
  # attention, a forward and two backward kernels each (the decoder's layers add theirs).
  assert train["added"]["kernels"] >= 3 * config.image_encoder.depth
  assert train["added"]["flops"] > 0 and train["flops"] > train["added"]["flops"]
  assert "all-reduce" in train["collectives"]  # gradients summed over the data axis
  assert 0 < train["memory"]["total"] < 16 * 2**30
  # The traffic ranking names module paths of both passes.
  ranking = out.split("traffic by module", 1)[1].splitlines()[1:6]
  assert any("backward decoder/" in line for line in ranking), ranking
  assert all(" GB " in line for line in ranking), ranking
