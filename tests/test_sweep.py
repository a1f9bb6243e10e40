"""Sweeps: the hyper helpers, the sweep tool on the tiny config (2 points, 2 steps each)
and the launch scripts' syntax and dry runs."""

import os
import shlex
import subprocess
import sys

import pytest

from s4eca_jax import hyper, metric_writer, sweep
from tests import run_fixtures

LAUNCH = run_fixtures.REPO / "launch"
SCRIPTS = ("local.sh", "multi_gpu.sh", "slurm.sbatch", "tpu_pod.sh")


def test_product_and_zip():
  lr = hyper.sweep("optimizer.lr", [1e-4, 3e-4])
  seeds = hyper.zipit(hyper.sweep("seed", [0, 1]), hyper.sweep("loss.dice_weight", [0.5, 1.0]))
  assert hyper.product(lr, seeds) == [
      {"optimizer.lr": 1e-4, "seed": 0, "loss.dice_weight": 0.5},
      {"optimizer.lr": 1e-4, "seed": 1, "loss.dice_weight": 1.0},
      {"optimizer.lr": 3e-4, "seed": 0, "loss.dice_weight": 0.5},
      {"optimizer.lr": 3e-4, "seed": 1, "loss.dice_weight": 1.0}]
  with pytest.raises(ValueError, match="different lengths"):
    hyper.zipit(lr, hyper.sweep("seed", [0, 1, 2]))
  with pytest.raises(ValueError, match="set twice"):
    hyper.product(lr, lr)
  config = run_fixtures.config("rrsisd", "variant=tiny")
  assert hyper.apply(config, {"optimizer.lr": 0.5}).optimizer.lr == 0.5
  assert config.optimizer.lr != 0.5  # the base config is untouched
  with pytest.raises(KeyError, match="no field 'lrr'"):
    hyper.apply(config, {"optimizer.lrr": 0.5})
  assert hyper.point_name(3, {"optimizer.lr": 3e-4, "dataset": "a/b c"}) == \
      "03_lr=0.0003,dataset=a-b-c"  # a folder name: no slashes or spaces


def test_sweep_runs_points_and_summarises(tiny_dataset, tmp_path):
  points = sweep.points_of(f"{run_fixtures.CONFIGS / 'rrsisd.py'}:variant=tiny")
  assert len(points) == 2
  config = run_fixtures.tiny_config(tiny_dataset, total_steps=2, eval_every=0)
  sweep.write_plan(tmp_path, points)
  results = sweep.run_points(config, tmp_path, points)
  assert [r["step"] for r in results] == [2, 2]
  table = sweep.summary(tmp_path)
  lines = table.splitlines()
  assert lines[0].split()[:2] == ["point", "overrides"] and len(lines) == 3
  for index, point in enumerate(points):
    name = hyper.point_name(index, point)
    logged = [r for r in metric_writer.read_metrics(tmp_path / name) if "val/oIoU" in r]
    assert [r["step"] for r in logged] == [2]  # each point trained in its own workdir
    assert f"{100 * logged[0]['val/oIoU']:.2f} @2" in lines[index + 1]
    assert f"optimizer.lr={point['optimizer.lr']}" in lines[index + 1]
  assert (tmp_path / "summary.txt").read_text().strip() == table
  assert (tmp_path / "val_curves.png").stat().st_size > 0


def test_sweep_print_gives_one_command_per_point(tmp_path):
  process = subprocess.run(
      [sys.executable, "-m", "s4eca_jax.sweep",
       f"--config={run_fixtures.CONFIGS / 'rrsisd.py'}:variant=tiny", f"--root={tmp_path}",
       "--print", "--config.total_steps=2"],
      capture_output=True, text=True, check=False, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert process.returncode == 0, process.stderr
  lines = process.stdout.strip().splitlines()
  assert len(lines) == 2
  for index, lr in enumerate(("0.0001", "0.0003")):
    assert "-m s4eca_jax.train" in lines[index] and "rrsisd.py:variant=tiny" in lines[index]
    assert f"--workdir={tmp_path}/{index:02d}_lr={lr}" in lines[index]
    assert f"--config.optimizer.lr={lr}" in lines[index]
    assert "--config.total_steps=2" in lines[index]  # the sweep's own overrides carry over
  assert (tmp_path / "sweep.json").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_syntax_and_dry_run(script):
  path = LAUNCH / script
  assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
  process = subprocess.run(["bash", str(path), "--dry-run", "configs/rrsisd.py", "/runs/x",
                            "--config.seed=1"], capture_output=True, text=True, check=False,
                           timeout=30, env=dict(os.environ, SLURM_SUBMIT_DIR="/repo"))
  assert process.returncode == 0, process.stderr
  command = " ".join(shlex.split(process.stdout))  # the dry run prints shell-quoted words
  assert "-m s4eca_jax.train" in command and "--config.seed=1" in command
  assert "--config=configs/rrsisd.py" in command and "--workdir=/runs/x" in command
  assert ("config.distributed=True" in command) == (script in ("slurm.sbatch", "tpu_pod.sh"))
  assert ("--worker=all" in command) == (script == "tpu_pod.sh")
  assert command.startswith("srun") == (script == "slurm.sbatch")
