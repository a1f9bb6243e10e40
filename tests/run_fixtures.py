"""Shared helpers for tests that train: a tiny synthetic_rrsis set and tiny run configs."""

from pathlib import Path

import ml_collections

from s4eca_jax import presets, prepare, run_setup

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
MINILM = presets.minilm_folder()
# The tests' default mesh takes 2 of the 8 simulated devices: XLA compiles the tiny train
# step for 2 devices in 37 s, for 8 in 56 s (2 cores). Tests of the mesh itself pass theirs.
MESH = (("data", 2), ("fsdp", 1))


def config(name: str, arg: str = ""):
  """configs/<name>.py[:arg], loaded by path as the --config flag loads it."""
  return run_setup.config_from_file(f"{CONFIGS / name}.py" + (f":{arg}" if arg else ""))


def build_tiny_dataset(data_dir: Path) -> dict:
  """synthetic_rrsis with 16 train / 8 val / 8 test scenes of 64x64 (about a second)."""
  return prepare.prepare("synthetic_rrsis", data_dir, num_train=16, num_val=8, num_test=8,
                         image_size=64)


def tiny_config(dataset: dict, *, total_steps: int, mesh=MESH,
                **overrides) -> ml_collections.ConfigDict:
  """configs/rrsisd.py:variant=tiny on the tiny set, batch 8, on MESH unless given."""
  config = globals()["config"]("rrsisd", "variant=tiny")
  config.dataset = dataset["name"]
  config.data_dir = dataset["tfds_data_dir"]
  config.tokenizer = str(MINILM)
  config.batch_size = config.eval_batch_size = 8
  config.total_steps = total_steps
  config.log_every = 1
  config.eval_every = -1  # no evaluation unless a test asks for it
  config.mesh = mesh
  config.fsdp_min_size = 16  # shard even the tiny model's leaves over fsdp
  # Adam divides each gradient by its own RMS + eps. Where per-example gradients cancel
  # (a sum near zero), the float32 summation order of 1 vs 8 devices decides the sign of
  # the update; a larger eps keeps such updates tiny, so that runs on different meshes
  # compare at 1e-5 (seen with eps=1e-8: 3e-5 on one element of 2048).
  config.optimizer.eps = 1e-3
  config.update(overrides)
  return config
