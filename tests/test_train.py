"""The trainer end to end on a tiny synthetic_rrsis set: sharding invariance, exact resume,
SIGTERM, non-finite loss, and the evaluate / predict CLIs on a trained workdir.

Runs share total_steps=6 (the LR schedule is compiled in), so the persistent compilation
cache set up in conftest.py serves the repeats.
"""

import json
import os
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from PIL import Image

from s4eca_jax import checkpoint, evaluate, metric_writer, predict, run_setup, sharding, train
from tests import run_fixtures

STEPS = 6


def _params_and_losses(workdir):
  config = run_setup.load_config(workdir)
  losses = {r["step"]: r["train/loss"] for r in metric_writer.read_metrics(workdir)
            if "train/loss" in r}
  ckpt = checkpoint.Checkpointer(workdir)
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 1)))
  setup = run_setup.build(config, mesh, total_steps=1)
  state, _ = setup.restore(ckpt, ckpt.latest_step())
  ckpt.close()
  return jax.device_get(state["params"]), losses


def test_sharded_training_matches_one_device(tiny_dataset, tmp_path):
  # Data parallel on the tests' 2-device mesh (its programs are cached from other tests),
  # and data x fsdp over all 8 devices.
  runs = {"one": (("data", 1), ("fsdp", 1)), "data": run_fixtures.MESH,
          "fsdp": (("data", 2), ("fsdp", 4))}
  for name, mesh in runs.items():
    config = run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS, mesh=mesh,
                                      stop_after_steps=3)
    assert train.train(config, tmp_path / name)["step"] == 3
  params_one, losses_one = _params_and_losses(tmp_path / "one")
  assert sorted(losses_one) == [1, 2, 3]
  for name in ("data", "fsdp"):
    params, losses = _params_and_losses(tmp_path / name)
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)],
                               [losses_one[s] for s in (1, 2, 3)], atol=1e-5)
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # see optimizer.eps in run_fixtures


def test_resume_is_exact(tiny_dataset, tmp_path):
  train.train(run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS), tmp_path / "straight")
  first = run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS, stop_after_steps=3)
  assert train.train(first, tmp_path / "resumed")["step"] == 3
  result = train.train(run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS),
                       tmp_path / "resumed")
  assert result["step"] == STEPS and result["stopped_by"] is None
  params_a, losses_a = _params_and_losses(tmp_path / "straight")
  params_b, losses_b = _params_and_losses(tmp_path / "resumed")
  assert [losses_a[s] for s in range(1, STEPS + 1)] == [losses_b[s] for s in range(1, STEPS + 1)]
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)  # bitwise on CPU


def test_sigterm_saves_and_resumes(tiny_dataset, tmp_path):
  workdir = tmp_path / "run"
  watcher = threading.Event()

  def preempt():  # as a scheduler would, once the run has started
    while not (workdir / "config.json").exists() and not watcher.wait(0.05):
      pass
    os.kill(os.getpid(), signal.SIGTERM)

  thread = threading.Thread(target=preempt, daemon=True)
  thread.start()
  result = train.train(run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS), workdir)
  watcher.set()
  thread.join()
  assert result["stopped_by"] == "SIGTERM" and result["step"] == 1
  ckpt = checkpoint.Checkpointer(workdir)
  assert ckpt.latest_step() == 1
  ckpt.close()
  resumed = train.train(run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS), workdir)
  assert resumed["step"] == STEPS and resumed["stopped_by"] is None
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path,
                                                              monkeypatch):
  original = train.pipeline.make_train_iterator

  class PoisonedIterator:  # the real iterator, with NaN pixels after the second batch
    def __init__(self, *args, **kwargs):
      self.real, self.count = original(*args, **kwargs), 0

    def __next__(self):
      batch, self.count = next(self.real), self.count + 1
      return batch if self.count <= 2 else dict(batch, image=np.full_like(batch["image"], np.nan))

    def get_state(self):
      return self.real.get_state()

    def set_state(self, state):
      self.real.set_state(state)

  monkeypatch.setattr(train.pipeline, "make_train_iterator", PoisonedIterator)
  config = run_fixtures.tiny_config(tiny_dataset, total_steps=STEPS, checkpoint_every=2)
  with pytest.raises(train.NonFiniteLossError, match=r"last good checkpoint \(step 2\)"):
    train.train(config, tmp_path / "run")
  ckpt = checkpoint.Checkpointer(tmp_path / "run")
  assert ckpt.all_steps() == [2]
  ckpt.close()


def test_evaluate_and_predict_cli(trained_workdir, tmp_path, capsys):
  results = evaluate.evaluate_run(trained_workdir, split="test")
  out = capsys.readouterr().out
  assert "per category" in out and "original" in out
  assert results["test/n"] == results["test/original/n"] == 8
  for key in ("test/mIoU", "test/oIoU", "test/P@0.5", "test/original/mIoU"):
    assert 0.0 <= results[key] <= 1.0
  assert sum(row["n"] for row in results["per_category"].values()) == 8
  assert list(trained_workdir.glob("eval_test_step*.json"))
  assert list((trained_workdir / "overlays").glob("val_step*.png"))
  assert list((trained_workdir / "tb").glob("events.out.tfevents.*"))
  logged = metric_writer.read_metrics(trained_workdir)
  assert {"train/loss", "train/lr", "train/images_per_s"} <= set(logged[0])
  assert any("val/oIoU" in row for row in logged)

  image = np.random.RandomState(0).randint(0, 255, (50, 70, 3), np.uint8)
  Image.fromarray(image).save(tmp_path / "scene.png")
  out_path = tmp_path / "pred" / "mask.png"
  predict.predict_pairs(trained_workdir, [(str(tmp_path / "scene.png"),
                                           "the red vehicle on the left", out_path)])
  mask = np.asarray(Image.open(out_path))
  assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
  assert out_path.with_name("mask_overlay.png").exists()

  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text(json.dumps({"image": str(tmp_path / "scene.png"), "expression": "a ship"})
                   + "\n")
  written = predict.predict_pairs(trained_workdir,
                                  predict.read_batch_file(pairs, tmp_path / "batch"))
  assert len(written) == 1 and written[0].exists()


def _predict_cli(*args):
  return subprocess.run([sys.executable, "-m", "s4eca_jax.predict", *args], capture_output=True,
                        text=True, check=False, timeout=300)


def test_predict_rejects_bad_inputs(trained_workdir, tmp_path):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
  (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
  (tmp_path / "bad.jsonl").write_text('{"image": "x.png", "expression": "a ship"}\nnot json\n')
  cases = {
      "expression is empty": ["--image", str(tmp_path / "ok.png"), "--expression", "   ",
                              "--out", str(tmp_path / "m.png")],
      "could not be read as an image": ["--image", str(tmp_path / "broken.jpg"),
                                        "--expression", "the ship", "--out",
                                        str(tmp_path / "m.png")],
      "bad.jsonl:2: not a JSON object": ["--batch", str(tmp_path / "bad.jsonl"), "--out_dir",
                                         str(tmp_path / "o")],
  }
  for message, args in cases.items():
    process = _predict_cli("--workdir", str(trained_workdir), *args)
    assert process.returncode == 2 and message in process.stderr, process.stderr
    assert "Traceback" not in process.stderr
