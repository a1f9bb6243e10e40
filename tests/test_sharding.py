"""Mesh construction and parameter sharding rules (8 simulated CPU devices)."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from s4eca_jax import checkpoint, sharding


def test_mesh_from_config():
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 2)))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert dict(sharding.make_mesh((("data", 1), ("fsdp", 1))).shape) == {"data": 1, "fsdp": 1}
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.make_mesh((("data", -1), ("fsdp", 3)))
  with pytest.raises(ValueError, match="needs 16 devices, found 8"):
    sharding.make_mesh((("data", 4), ("fsdp", 4)))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh((("data", -1), ("fsdp", -1)))


def test_param_spec_shards_largest_divisible_axis():
  assert sharding.param_spec((768, 3072), 4, 1000) == P(None, "fsdp")
  assert sharding.param_spec((3, 5, 768), 4, 1000) == P(None, None, "fsdp")
  assert sharding.param_spec((7, 9), 4, 10) == P()  # nothing divisible
  assert sharding.param_spec((768,), 4, 10_000) == P()  # below min_size
  assert sharding.param_spec((768, 768), 1, 10) == P()  # no fsdp axis


def test_global_batch_is_split_over_all_devices():
  mesh = sharding.make_mesh((("data", 4), ("fsdp", 2)))
  batch = sharding.global_batch({"x": np.arange(16).reshape(8, 2)},
                                sharding.batch_sharding(mesh))
  assert batch["x"].shape == (8, 2)
  assert len({shard.device for shard in batch["x"].addressable_shards}) == 8
  np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16).reshape(8, 2))


def test_distributed_init_is_optional():
  config = ml_collections.ConfigDict({"distributed": False})
  sharding.initialize_distributed(config)  # a no-op on one host
  assert jax.process_count() == 1


def test_checkpoint_data_state_roundtrip(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1, best_metric="val/oIoU")
  state = {"w": jax.numpy.arange(4.0)}
  ckpt.save(1, state, b'{"pos": 3}', {"val/oIoU": 0.5})
  ckpt.save(2, state, b'{"pos": 6}', {"val/oIoU": 0.2})
  with caplog.at_level("WARNING"):
    ckpt.save(3, state, {"pos": 9})  # no evaluation: kept as the latest, without a warning
    ckpt.wait()
  assert not [r for r in caplog.records if "tracked_metric" in r.getMessage()]
  assert ckpt.all_steps() == [1, 3]  # latest 1, plus the best by val/oIoU
  assert ckpt.best_step() == 1
  restored, data = ckpt.restore(1, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  assert data == b'{"pos": 3}'
  np.testing.assert_array_equal(restored["w"], state["w"])
  ckpt.close()
