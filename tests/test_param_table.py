"""The parameter budget of configs/rrsisd.py and the `python -m s4eca_jax.param_table` CLI."""

import pathlib
import subprocess
import sys

from s4eca_jax import param_table
from s4eca_jax.models import s4eca
from tests import run_fixtures

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_rrsisd_adapters_are_the_papers_share_of_the_encoders():
  counts = param_table.summary(s4eca.abstract_params(run_fixtures.config("rrsisd")))
  # DINOv2-B/14-reg4 (86.58M) + CLIP B/16 text with projection (63.43M), as in HF.
  assert counts["encoders"] == 150_010_880
  assert counts["adapters"] == 3_761_870  # r=112 with 2 heads (head size 56): 2.51%
  assert abs(param_table.adapter_percent(counts) - 2.4) <= 0.2, param_table.adapter_percent(counts)
  assert counts["adapters"] + counts["encoders"] + counts["decoder"] == counts["total"]


def test_refsegrs_uses_the_same_model():
  ours, theirs = run_fixtures.config("refsegrs"), run_fixtures.config("rrsisd")
  assert ours.dataset == "refsegrs" and ours.model == theirs.model
  assert ours.image_size == 448 and ours.max_length == 22


def _run(*args):
  return subprocess.run([sys.executable, "-m", "s4eca_jax.param_table", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_cli_prints_the_table():
  result = _run("--config", "configs/rrsisd.py:variant=tiny",
                "--config.model.visual_adapter.width=8")
  assert result.returncode == 0, result.stderr
  out = result.stdout
  for line in ("encoder params (frozen)", "adapter params (textual + visual)",
               "adapters as % of encoder params", "decoder params",
               "image_encoder/block_*/adapter/down (x2)", "textual_adapter/read_* (x2)"):
    assert line in out, out
  assert "trainable params (config.trainable)" in out


def test_cli_help_and_bad_arguments():
  result = _run("--help")
  assert result.returncode == 0 and "--config" in result.stdout
  assert "python -m s4eca_jax.param_table --config configs/rrsisd.py" in result.stdout
  result = _run("--config", "configs/rrsisd.py:variant=huge")
  assert result.returncode == 2 and "variant" in result.stderr
  assert "Traceback" not in result.stderr
