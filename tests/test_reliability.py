"""Reliability on the tiny config: damaged checkpoints, a workdir's config kept, metrics
rows once per step, outputs checked before the model loads, and (as real processes) no
hang on a failed checkpoint write and no worker left after kill -9 of the trainer."""

import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import pytest

from s4eca_jax import checkpoint, metric_writer, predict, run_setup, train
from tests import run_fixtures

STEPS = 6  # as test_train.py and the trained_workdir fixture: compilations are cached


def _copy_run(trained_workdir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  return workdir


def _flip_one_byte(step_dir: Path) -> str:
  """Flips a byte in the middle of the largest array data file; returns its name."""
  data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  content = bytearray(data.read_bytes())
  content[len(content) // 2] ^= 0x01
  data.write_bytes(bytes(content))
  return data.relative_to(step_dir).as_posix()


def test_damaged_newest_checkpoint_is_refused_and_the_run_resumes_from_the_previous(
    trained_workdir, tiny_dataset, tmp_path, capsys):
  workdir = _copy_run(trained_workdir, tmp_path)  # checkpoints at steps 3 and 6
  damaged = _flip_one_byte(workdir / "checkpoints" / "6")
  config = run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS, eval_every=3)
  ckpt = checkpoint.Checkpointer(workdir)
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=rf"step 6 .*file {damaged} differs"):
    checkpoint.verify_manifest(ckpt.directory / "6")
  ckpt.close()

  result = train.train(config, workdir)
  out = capsys.readouterr().out
  assert "skipping damaged checkpoint step 6" in out and damaged in out
  assert "restored the previous intact checkpoint, step 3" in out
  assert result["step"] == STEPS
  assert (workdir / "checkpoints_damaged" / "6").is_dir()
  checkpoint.verify_manifest(workdir / "checkpoints" / "6")  # saved again, sealed
  # The first attempt logged steps 4-6 before the damage; the resume logged them again.
  steps = [row["step"] for row in metric_writer.read_metrics(workdir) if "train/loss" in row]
  assert steps == list(range(1, STEPS + 1))


def test_changed_shape_rerun_is_refused_and_schedule_change_recorded(
    trained_workdir, tiny_dataset, tmp_path, capsys):
  workdir = _copy_run(trained_workdir, tmp_path)
  stored = (workdir / "config.json").read_bytes()
  config = run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS, eval_every=3)
  config.model.decoder.width = 48
  with pytest.raises(run_setup.ConfigError, match=r"model.decoder.width: 32 -> 48.*new --workdir"):
    train.train(config, workdir)
  assert (workdir / "config.json").read_bytes() == stored

  config = run_fixtures.tiny_config(tiny_dataset, total_steps=8, eval_every=3)
  config.optimizer.lr = 1e-3
  run_setup.check_workdir_config(config, workdir)
  out = capsys.readouterr().out
  assert "config.total_steps changed from 6 to 8" in out and "config.optimizer.lr" in out
  assert (workdir / "config.json").read_bytes() == stored
  history = [json.loads(line) for line in
             (workdir / run_setup.HISTORY).read_text().splitlines()]
  assert history[-1]["event"] == "rerun"
  assert history[-1]["changed"]["total_steps"] == [6, 8]


@pytest.mark.parametrize("field, value", [("total_steps", 0), ("batch_size", 0),
                                          ("eval_batch_size", 0)])
def test_unusable_config_values_are_refused(tiny_dataset, tmp_path, field, value):
  config = run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS)
  config[field] = value
  with pytest.raises(run_setup.ConfigError, match=f"config.{field}={value}"):
    train.train(config, tmp_path / "w")
  assert not (tmp_path / "w" / "config.json").exists()


def test_outputs_and_checkpoint_choice_are_checked_before_the_model(trained_workdir,
                                                                     tmp_path):
  batch = tmp_path / "pairs.jsonl"
  batch.write_text(json.dumps({"image": "a.png", "expression": "a ship",
                               "out": "../../escaped.png"}) + "\n")
  with pytest.raises(predict.PredictionError, match=r"pairs.jsonl:1: .*outside --out_dir"):
    predict.read_batch_file(batch, tmp_path / "out")
  (tmp_path / "folder.png").mkdir()
  with pytest.raises(predict.PredictionError, match="is a folder"):
    predict.check_writable(tmp_path / "folder.png")
  (tmp_path / "file").write_text("")
  with pytest.raises(predict.PredictionError, match="cannot write into"):
    predict.check_writable(tmp_path / "file" / "mask.png")  # a parent that is a file
  config = run_setup.load_config(trained_workdir)
  for which, message in (("nope", "use best, latest or a step"),
                         ("4", r"no checkpoint for step 4.*available: \[3, 6\]")):
    with pytest.raises(run_setup.ConfigError, match=message):
      run_setup.checkpoint_step(trained_workdir, config, which)
  assert run_setup.checkpoint_step(trained_workdir, config, "latest") == 6


# --------------------------------------------------------------------------------------
# Real processes: the trainer CLI
# --------------------------------------------------------------------------------------


def _train_cli(tiny_dataset, workdir, *overrides):
  """The trainer as a process; its stdout and stderr go to files beside the workdir (a
  pipe nobody reads fills up and stalls the trainer)."""
  env = dict(os.environ, PYTHONPATH=str(run_fixtures.REPO))  # with conftest's cache
  config = [
      f"--config={run_fixtures.CONFIGS / 'rrsisd.py'}:variant=tiny",
      f"--config.dataset={tiny_dataset['name']}",
      f"--config.data_dir={tiny_dataset['tfds_data_dir']}",
      f"--config.tokenizer={run_fixtures.MINILM}", "--config.batch_size=8",
      "--config.eval_batch_size=8", f"--config.total_steps={STEPS}", "--config.log_every=1",
      "--config.eval_every=-1", "--config.fsdp_min_size=16", "--config.optimizer.eps=0.001",
      # tiny_config's mesh: the programs match the in-process runs' in the
      # shared compilation cache (the config's own data=-1 would take all 8 devices).
      f"--config.mesh={run_fixtures.MESH!r}",
      *overrides]
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with open(f"{workdir}.stdout", "w") as out, open(f"{workdir}.stderr", "w") as err:
    return subprocess.Popen([sys.executable, "-m", "s4eca_jax.train", f"--workdir={workdir}",
                             *config], env=env, stdout=out, stderr=err, text=True)


def _stderr(workdir) -> str:
  return Path(f"{workdir}.stderr").read_text()


def _wait_for(condition, process, what, limit=600):
  deadline = time.monotonic() + limit
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f"the trainer ended before {what} (exit {process.returncode})")
    if time.monotonic() > deadline:
      process.kill()
      raise AssertionError(f"no {what} after {limit} s")
    time.sleep(0.02)


def test_failed_checkpoint_write_ends_the_process(tiny_dataset, tmp_path):
  workdir = tmp_path / "run"
  process = _train_cli(tiny_dataset, workdir, "--config.checkpoint_every=1")
  _wait_for(lambda: (workdir / "checkpoints" / "1").is_dir(), process, "first checkpoint")
  process.send_signal(signal.SIGSTOP)
  # Unwritable from here on, for root too (a read-only folder does not stop root).
  (workdir / "checkpoints").rename(workdir / "checkpoints.gone")
  (workdir / "checkpoints").write_text("not a folder")
  process.send_signal(signal.SIGCONT)
  try:
    process.wait(timeout=180)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    raise AssertionError("the trainer did not exit after its checkpoint write failed")
  stderr = _stderr(workdir)
  assert process.returncode == 1, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "checkpoints" in last, last


def _descendants(pid: int) -> set[int]:
  found, todo = set(), [pid]
  while todo:
    parent = todo.pop()
    for task in Path(f"/proc/{parent}/task").glob("*"):
      children = (task / "children").read_text().split() if (task / "children").exists() else []
      for child in map(int, children):
        if child not in found:
          found.add(child)
          todo.append(child)
  return found


def _running(pid: int) -> bool:
  try:
    status = Path(f"/proc/{pid}/status").read_text()
  except FileNotFoundError:
    return False
  return "\nState:\tZ" not in status  # a zombie has ended; only its parent entry is left


def test_kill_9_of_the_trainer_leaves_no_worker(tiny_dataset, tmp_path):
  process = _train_cli(tiny_dataset, tmp_path / "run", "--config.data_workers=2",
                       "--config.total_steps=1000")
  workers = set()

  def two_workers():
    workers.update(_descendants(process.pid))
    return len([p for p in workers if _running(p)]) >= 2
  _wait_for(two_workers, process, "2 worker processes")
  workers = _descendants(process.pid) | workers
  process.send_signal(signal.SIGKILL)
  process.wait()
  deadline = time.monotonic() + 20
  while any(_running(p) for p in workers) and time.monotonic() < deadline:
    time.sleep(0.2)
  left = [p for p in workers if _running(p)]
  for pid in left:
    os.kill(pid, signal.SIGKILL)
  assert not left, f"processes of the killed trainer still running: {left}"


# --------------------------------------------------------------------------------------
# prepare: per-item failures counted, the build completes
# --------------------------------------------------------------------------------------


def test_prepare_counts_bombs_duplicates_bad_text_and_unknown_splits(tmp_path, monkeypatch):
  import pickle  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from s4eca_jax import prepare  # pylint: disable=g-import-not-at-top
  from tfds_builders import layout_reader, layout_writer  # pylint: disable=g-import-not-at-top

  root = tmp_path / "layout"
  layout_writer.write_rrsis_layout(root, num_train=4, num_val=1, num_test=1, image_size=64,
                                   seed=0)
  refs = layout_reader.load_builtin_pickle(root / layout_reader.RRSISD_REFS)
  train = [ref for ref in refs if ref["split"] == "train"]
  # A decompression bomb: above PIL's pixel limit (lowered here, so the file stays small).
  Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(
      root / layout_reader.RRSISD_IMAGES / train[0]["file_name"])
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16_000)  # 64 x 64 fits, 256 x 256 is 4x over
  train[1]["sentences"][0]["sent_id"] = train[2]["sentences"][0]["sent_id"]  # duplicate id
  train[3]["sentences"][0]["raw"] = "the ship \udcff"  # not valid Unicode
  refs.append(dict(train[3], split="testB", ref_id=999))
  with open(root / layout_reader.RRSISD_REFS, "wb") as f:
    pickle.dump(refs, f)
  data_dir = tmp_path / "tfds"
  stale = data_dir / "rrsis_d" / "incomplete.ABCDEF_1.0.0"  # left by a killed build
  stale.mkdir(parents=True)

  report = prepare.prepare("rrsis_d", data_dir, root)
  reasons = {line.split(" x ")[1].split()[0]: line for line in report["summary"]}
  assert "DecompressionBombError" in reasons["unreadable_image"]
  assert "first: train" in reasons["duplicate_sent_id"]
  assert set(reasons) == {"unreadable_image", "duplicate_sent_id", "invalid_text",
                          "unknown_split"}
  assert reasons["unknown_split"].startswith("testB: skipped 1 x")
  assert report["examples"]["train"] == 1  # 4 refs: the bomb, the duplicate, bad text
  assert not stale.exists()


def test_unreadable_annotation_files_name_the_file_and_line(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top

  from tfds_builders import layout_reader  # pylint: disable=g-import-not-at-top

  (tmp_path / layout_reader.RRSISD_REFS).write_text('[{"split": "train"}]')  # JSON, not pickle
  (tmp_path / layout_reader.RRSISD_INSTANCES).write_text('{"annotations": [\n{"id": 1},\n]}')
  with pytest.raises(layout_reader.LayoutError, match=r"refs\(unc\).p is not a readable refs"):
    layout_reader.read_rrsisd_annotations(tmp_path)
  with open(tmp_path / layout_reader.RRSISD_REFS, "wb") as f:
    pickle.dump({"not": "a list"}, f)
  with pytest.raises(layout_reader.LayoutError, match="holds a dict, not a list"):
    layout_reader.read_rrsisd_annotations(tmp_path)
  with open(tmp_path / layout_reader.RRSISD_REFS, "wb") as f:
    pickle.dump([], f)
  with pytest.raises(layout_reader.LayoutError, match=r"instances.json:3:1: not valid JSON"):
    layout_reader.read_rrsisd_annotations(tmp_path)


def test_worker_watchdog_ends_a_worker_whose_trainer_was_killed():
  # The mechanism behind the test above, alone: a stand-in trainer forks a worker that
  # runs pipeline._die_with (the worker_init_fn the trainer gives grain's workers) and then
  # blocks; kill -9 of the trainer must end the worker, however busy it is.
  script = (
      "import os, sys, time\n"
      "pid = os.fork()\n"
      "if pid == 0:\n"
      "  from s4eca_jax.data import pipeline\n"
      "  pipeline._die_with(os.getppid(), 0, 1)\n"
      "  print('ready', flush=True)\n"
      "  time.sleep(600)\n"
      "  os._exit(3)\n"
      "print(pid, flush=True)\n"
      "time.sleep(600)\n")
  trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(run_fixtures.REPO)))
  worker = int(trainer.stdout.readline())
  try:
    assert trainer.stdout.readline().strip() == "ready"
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not _running(worker), "the worker outlived its killed trainer"
  finally:
    if _running(worker):
      os.kill(worker, signal.SIGKILL)
    if trainer.poll() is None:
      trainer.kill()
