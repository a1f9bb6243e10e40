"""One CLI style: every command's --help exits 0, config files load by path from any
directory, and a bad flag or config value is one line and exit 2."""

import os
from pathlib import Path
import subprocess
import sys

import pytest

from s4eca_jax import cli, presets, run_setup
from tests import run_fixtures

PACKAGE = Path(cli.__file__).parent
# Every module that runs as a command (python -m s4eca_jax.NAME) goes through cli.run.
COMMANDS = sorted(p.stem for p in PACKAGE.glob("*.py")
                  if "\n  cli.run(main)" in p.read_text() and p.stem != "cli")


def _run(*args, cwd=None, timeout=300):
  env = dict(os.environ, PYTHONPATH="")  # nothing of the repository on sys.path
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False,
                        cwd=cwd, env=env, timeout=timeout)


def test_the_commands_are_found():
  assert {"train", "evaluate", "predict", "prepare", "demo", "param_table",
          "inspect_checkpoint"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0(command, tmp_path):
  result = _run("-m", f"s4eca_jax.{command}", "--help", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert f"s4eca_jax.{command}" in result.stdout  # the module docstring's usage line
  assert "  --" in result.stdout and "--debug" in result.stdout  # its flags are listed


def test_config_loads_by_path_from_another_directory(tmp_path):
  config_file = run_fixtures.CONFIGS / "rrsisd.py"
  result = _run("-m", "s4eca_jax.param_table", f"--config={config_file}:variant=tiny",
                cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "adapters as % of encoder params" in result.stdout
  demo = _run("-c", "from s4eca_jax import run_setup; c = run_setup.config_from_file("
              f"'{run_fixtures.CONFIGS / 'demo.py'}:variant=tiny'); print(c.text_encoder.checkpoint)",
              cwd=tmp_path)
  assert demo.returncode == 0, demo.stderr
  assert Path(demo.stdout.strip()) == presets.minilm_folder()


@pytest.mark.parametrize("args, message", [
    (["--config.batch_size=abc"], "batch_size"),
    (["--config.no_such_field=1"], "no_such_field"),
    (["--config.total_steps=0"], "config.total_steps=0"),  # refused before the workdir
    (["--config.tokenizer=/no/such/folder"], "config.tokenizer='/no/such/folder'"),
    (["--config.seed=1"], "No tokenizer"),  # the tiny config names none: refused before too
    ([], "workdir"),  # a required flag missing
])
def test_bad_flags_are_one_line_and_exit_2(args, message, tmp_path):
  config_file = run_fixtures.CONFIGS / "rrsisd.py"
  workdir = [] if not args else [f"--workdir={tmp_path / 'w'}"]
  result = _run("-m", "s4eca_jax.train", f"--config={config_file}:variant=tiny", *workdir,
                *args, cwd=tmp_path)
  assert result.returncode == cli.EXIT_USAGE, result.stderr
  assert message in result.stderr and "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not (tmp_path / "w").exists()


def test_unprepared_data_is_one_line_and_exit_2(tmp_path):
  config_file = run_fixtures.CONFIGS / "rrsisd.py"
  result = _run("-m", "s4eca_jax.train", f"--config={config_file}:variant=tiny",
                f"--workdir={tmp_path / 'w'}", f"--config.tokenizer={run_fixtures.MINILM}",
                f"--config.data_dir={tmp_path / 'nodata'}", cwd=tmp_path)
  assert result.returncode == cli.EXIT_USAGE, result.stderr
  assert "is not prepared" in result.stderr and "s4eca_jax.prepare rrsis_d" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_parse_arg_is_strict():
  parsed = presets.parse_arg("language_guidance=False,steps=3", language_guidance=True,
                             steps=1)
  assert parsed.language_guidance is False and parsed.steps == 3
  assert presets.parse_arg("language_guidance=0", language_guidance=True).language_guidance is False
  with pytest.raises(ValueError, match="expected an integer"):
    presets.parse_arg("steps=abc", steps=1)
  with pytest.raises(ValueError, match="expected a boolean"):
    presets.parse_arg("language_guidance=maybe", language_guidance=True)
  with pytest.raises(ValueError, match="key=value with key in"):
    presets.parse_arg("variant", variant="full")


def test_path_fields_expand_home_and_variables(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("S4ECA_TEST_DATA", "/data/here")
  config = run_fixtures.config("rrsisd", "variant=tiny")
  config.data_dir = "~/tfds"
  config.tokenizer = "$S4ECA_TEST_DATA/tok"
  config.text_encoder.checkpoint = "~/clip"
  run_setup.expand_paths(config)
  assert config.data_dir == str(tmp_path / "tfds")
  assert config.tokenizer == "/data/here/tok"
  assert config.text_encoder.checkpoint == str(tmp_path / "clip")
