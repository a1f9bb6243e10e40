"""Multi-host training on one machine: two JAX processes (CPU, 2 devices each, a
localhost coordinator) against the single-process 4-device run; resuming on another mesh
or process count; a SIGTERM to one of two processes.

One two-process run (3 of 6 steps, evaluated at step 3) and one single-process reference
(6 steps, evaluated at 3 and 6) are shared by the tests; each later run starts from a
copy of the two-process workdir. The processes run `python -m s4eca_jax.train`, so the
command line, its exit codes and config.distributed are what is tested.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from s4eca_jax import checkpoint, metric_writer, run_setup, sharding, train
from tests import run_fixtures

STEPS = 6
TIMEOUT = 1800  # seconds for one two-process run; a hang (processes that disagree) fails


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, dataset, arg, cache_dir):
  """Starts the two processes of one run; -> list of (Popen, log path)."""
  port = _free_port()
  # The session's XLA flags (conftest's), with 2 devices per process.
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {flags}".strip(),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(run_fixtures.REPO),
             JAX_COMPILATION_CACHE_DIR=str(cache_dir))  # conftest sets the cache's bounds
  processes = []
  for index in range(2):
    log = workdir.parent / f"{workdir.name}.p{index}.{time.monotonic_ns()}.log"
    command = [
        sys.executable, "-m", "s4eca_jax.train",
        f"--config={run_fixtures.REPO / 'tests' / 'multihost_config.py'}:{arg}",
        f"--workdir={workdir}", f"--config.dataset={dataset['name']}",
        f"--config.data_dir={dataset['tfds_data_dir']}", "--config.distributed=True",
        f"--config.coordinator_address=localhost:{port}", "--config.num_processes=2",
        f"--config.process_id={index}"]
    with open(log, "w") as out:
      processes.append((subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, cwd=run_fixtures.REPO), log))
  return processes


def _wait(processes) -> list[tuple[int, str]]:
  """(exit code, output) of each process; kills both if either hangs."""
  deadline = time.monotonic() + TIMEOUT
  results = []
  try:
    for process, log in processes:
      process.wait(timeout=max(1.0, deadline - time.monotonic()))
      results.append((process.returncode, open(log).read()))
  except subprocess.TimeoutExpired:
    outputs = "\n".join(f"--- {log}:\n{open(log).read()[-3000:]}" for _, log in processes)
    pytest.fail(f"a two-process run did not finish in {TIMEOUT} s:\n{outputs}")
  finally:
    for process, _ in processes:
      if process.poll() is None:
        process.kill()
  return results


def _run_two(workdir, dataset, arg, cache_dir) -> list[tuple[int, str]]:
  return _wait(_start(workdir, dataset, arg, cache_dir))


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in metric_writer.read_metrics(workdir)
          if "train/loss" in r}


def _evals(workdir) -> dict[int, dict]:
  return {r["step"]: {k: v for k, v in r.items() if k.startswith("val/")}
          for r in metric_writer.read_metrics(workdir) if "val/oIoU" in r}


def _params(workdir, step):
  config = run_setup.load_config(workdir)
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 1)))
  setup = run_setup.build(config, mesh, total_steps=STEPS)
  ckpt = checkpoint.Checkpointer(workdir)
  state, _ = setup.restore(ckpt, step)
  ckpt.close()
  return jax.device_get(state)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("multihost_cache")


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
  """The single-process 4-device run: 6 steps, evaluated at steps 3 and 6."""
  workdir = tmp_path_factory.mktemp("multihost") / "reference"
  config = run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS,
                                    mesh=(("data", 4), ("fsdp", 1)), eval_every=3)
  assert train.train(config, workdir)["step"] == STEPS
  return workdir


@pytest.fixture(scope="module")
def two_process(tiny_dataset, tmp_path_factory, cache_dir, request):
  """Two processes x 2 devices (mesh data=4): steps 1-3 of 6, evaluated and stopped at 3."""
  workdir = tmp_path_factory.mktemp("multihost") / "two"
  processes = _start(workdir, tiny_dataset, "stop=3,eval_every=3", cache_dir)
  request.getfixturevalue("reference")  # trains meanwhile, in this process
  results = _wait(processes)
  for code, output in results:
    assert code == 75, output[-3000:]  # stopped by config.stop_after_steps, resumable
  return workdir


def test_two_processes_match_one(two_process, reference):
  losses, expected = _losses(two_process), _losses(reference)
  assert sorted(losses) == [1, 2, 3]
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [expected[s] for s in (1, 2, 3)],
                             rtol=0, atol=1e-5)
  ours, theirs = _params(two_process, 3), _params(reference, 3)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  evaluated, expected_eval = _evals(two_process)[3], _evals(reference)[3]
  assert evaluated["val/n"] == expected_eval["val/n"] == 8  # each example once, not twice
  assert evaluated.keys() == expected_eval.keys()
  for key, value in expected_eval.items():
    assert evaluated[key] == pytest.approx(value, abs=1e-6), key


def _data_states(workdir, step) -> dict[str, dict]:
  """{file name: data iterator state} of each process in checkpoint `step`."""
  data = workdir / "checkpoints" / str(step) / "data"
  return {p.name: json.loads(p.read_text()) for p in data.glob("process_*.json")}


def test_each_process_saves_its_data_position(two_process):
  states = _data_states(two_process, 3)
  assert sorted(states) == ["process_0-of-2.json", "process_1-of-2.json"]
  assert all(state["next_index"] == 3 for state in states.values())  # 3 batches taken


def test_resume_on_another_mesh_continues_exactly(two_process, reference, tiny_dataset,
                                                  tmp_path, cache_dir):
  workdir = tmp_path / "resumed"
  shutil.copytree(two_process, workdir)
  # data x fsdp as a hybrid mesh: fsdp over each process's 2 devices, data across the
  # processes (mesh_utils.create_hybrid_device_mesh, as for multi-slice TPU).
  results = _run_two(workdir, tiny_dataset, "data=1,dcn=2,fsdp=2", cache_dir)
  for code, output in results:
    assert code == 0, output[-3000:]
  assert "resumed from step 3" in results[0][1]
  # Steps 4-6 see the batches the uninterrupted run saw only if both positions restored.
  losses, expected = _losses(workdir), _losses(reference)
  np.testing.assert_allclose([losses[s] for s in (4, 5, 6)], [expected[s] for s in (4, 5, 6)],
                             rtol=0, atol=1e-5)


def test_resume_with_one_process_and_two_devices(two_process, reference, tiny_dataset,
                                                 tmp_path):
  workdir = tmp_path / "single"
  shutil.copytree(two_process, workdir)
  config = run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS,
                                    mesh=(("data", 2), ("fsdp", 1)))
  result = train.train(config, workdir)
  assert result["step"] == STEPS and result["stopped_by"] is None
  # Params, optimizer state and the data position all carry over (orbax reshards to 2
  # devices; the data state of 2 processes maps onto 1): the losses go on as without
  # the interruption.
  losses, expected = _losses(workdir), _losses(reference)
  np.testing.assert_allclose([losses[s] for s in (4, 5, 6)], [expected[s] for s in (4, 5, 6)],
                             rtol=0, atol=1e-5)
  resumed, straight = _params(workdir, STEPS), _params(reference, STEPS)
  for a, b in zip(jax.tree.leaves(resumed["opt_state"]), jax.tree.leaves(straight["opt_state"])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_sigterm_to_one_process_stops_both(tiny_dataset, tmp_path, cache_dir):
  workdir = tmp_path / "preempted"
  processes = _start(workdir, tiny_dataset, "steps=6", cache_dir)
  deadline = time.monotonic() + TIMEOUT
  # config.json appears once both processes have joined the coordinator (each inside
  # train(), its signal handler installed).
  while not (workdir / "config.json").exists() and time.monotonic() < deadline:
    if any(process.poll() is not None for process, _ in processes):
      break
    time.sleep(0.05)
  processes[1][0].send_signal(signal.SIGTERM)  # one host preempted
  results = _wait(processes)
  steps = []
  for code, output in results:
    assert code == 75, output[-3000:]
    steps.append(int(output.split("with a checkpoint")[0].rsplit("at step", 1)[1]))
  assert steps[0] == steps[1] < STEPS
  for _, output in results:
    assert "stopped by a preemption notice (SIGTERM or Ctrl-C to one of the 2" in output
  ckpt = checkpoint.Checkpointer(workdir)
  assert ckpt.all_steps() == [steps[0]]
  ckpt.close()
  # The checkpoint is whole: the state restores, and each process saved its data position.
  # (Resuming a two-process checkpoint is test_resume_on_another_mesh_continues_exactly's.)
  assert int(_params(workdir, steps[0])["step"]) == steps[0]
  assert sorted(_data_states(workdir, steps[0])) == ["process_0-of-2.json",
                                                     "process_1-of-2.json"]
