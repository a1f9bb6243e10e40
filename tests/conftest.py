"""Test setup: 8 simulated CPU devices (must be set before jax is imported)."""

import os

# XLA:CPU's LLVM passes at -O0: the tests' programs are tiny and compiled once or twice
# each, so compiling is most of the suite's time; -O0 takes about a quarter off it
# (test_model.py and test_sweep.py on 2 cores: 126 s against 173 s). Processes that tests
# start inherit the flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  import jax  # pylint: disable=g-import-not-at-top

  # Tests that train compile the same tiny steps several times: a persistent cache makes
  # the repeats cheap (per test session, in a temp folder). The commands that tests start
  # as subprocesses, and pytest-xdist's workers (-n 2), inherit it through the
  # environment: the folder is made once, by the process that is not a worker.
  import tempfile  # pylint: disable=g-import-not-at-top

  if not hasattr(config, "workerinput"):
    os.environ["S4ECA_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="s4eca_jax_cache_")
  cache = {"JAX_COMPILATION_CACHE_DIR": os.environ["S4ECA_JAX_TEST_CACHE"],
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  os.environ.update(cache)
  jax.config.update("jax_compilation_cache_dir", cache["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  from tests import run_fixtures  # pylint: disable=g-import-not-at-top

  return run_fixtures.build_tiny_dataset(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def trained_workdir(tiny_dataset, tmp_path_factory):
  """A tiny run trained for 6 steps with evaluations at steps 3 and 6."""
  from s4eca_jax import train  # pylint: disable=g-import-not-at-top
  from tests import run_fixtures  # pylint: disable=g-import-not-at-top

  workdir = tmp_path_factory.mktemp("run")
  train.train(run_fixtures.tiny_config(tiny_dataset, total_steps=6, eval_every=3), workdir)
  return workdir
