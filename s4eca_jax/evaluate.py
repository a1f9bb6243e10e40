"""Evaluation: the jitted eval step, the loop over a split, and the CLI.

    python -m s4eca_jax.evaluate --workdir W --split test [--checkpoint best|latest|STEP]

`Evaluator` takes what it needs as arguments (a predict function, the params' shardings,
the mesh, the config and a tokenizer), as big_vision's evaluators do; the trainer passes
its own and the CLI restores them from a workdir.

Both protocols of SPEC.md: `input` (at the network input size, the LAVT/RMSIN protocol
of published tables) and `original` (logits resized to each image's original size). With
`--per_category` (default on) a per-category table follows. Results are printed and saved
to W/eval_<split>_step<N>.json. Multi-host: run the same command on every host (the run's
config.distributed and mesh apply); metrics are sums over global arrays, exact across
processes, and process 0 prints and writes. The trainer uses `Evaluator` for its periodic
evaluations.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath
from jax.experimental import multihost_utils

import tfds_builders  # registers the builders whose category names the tables use
from s4eca_jax import cli, drawing, metrics, run_setup, sharding, text_tokenizer
from s4eca_jax.data import pipeline

PROTOCOLS = ("input", "original")


def _original_size(source) -> tuple[int, int]:
  """Largest (height, width) in the split: one padded shape for the jitted step."""
  heights = [int(source[i]["height"]) for i in range(len(source))]
  widths = [int(source[i]["width"]) for i in range(len(source))]
  return max(heights), max(widths)


def category_names(config) -> list[str] | None:
  """Category names of a ClassLabel feature (rrsis_d, synthetic_rrsis), else None."""
  feature = tfds.builder(config.dataset, data_dir=config.data_dir).info.features["category"]
  return list(feature.names) if hasattr(feature, "names") else None


class Evaluator:
  """Evaluates params on one split with `predict(params, batch) -> logits (B, S, S)`;
  writes an overlay grid per call."""

  def __init__(self, predict, param_shardings, mesh: jax.sharding.Mesh, config,
               tokenizer: text_tokenizer.TextTokenizer, split: str = "val", *,
               num_overlays: int = 8):
    self.config, self.split, self.mesh = config, split, mesh
    self.tokenizer = tokenizer
    self.source = pipeline.open_split(config.dataset, split, config.data_dir)
    self.original_size = _original_size(self.source)
    self.num_overlays = num_overlays
    self.batch_size = run_setup.per_process_batch(config.eval_batch_size, mesh)
    self.data_sharding = sharding.batch_sharding(mesh)
    self.threshold = config.get("mask_probability", 0.5)
    self._step = self._make_step(predict, param_shardings)
    self._compiled = None

  def _make_step(self, predict, param_shardings):
    probability, original_size = self.threshold, self.original_size

    def eval_step(params, batch, accumulators):
      logits = predict(params, batch)
      valid = batch["valid"]
      pred = metrics.masks_from_logits(logits, probability)  # (B, S, S)
      pred_original = metrics.masks_from_logits(metrics.resize_logits_to_original(
          logits, batch["original_height"], batch["original_width"], original_size),
                                                probability)  # (B, H, W)
      gt = batch["mask"] > 0.5
      gt_original = batch["mask_original"] > 0
      accumulators = {
          "input": metrics.update_accumulator(accumulators["input"], pred, gt, valid),
          "original": metrics.update_accumulator(accumulators["original"], pred_original,
                                                 gt_original, valid)}
      counts = {"intersection": jnp.sum(pred_original & gt_original, axis=(1, 2)),
                "union": jnp.sum(pred_original | gt_original, axis=(1, 2))}
      return accumulators, counts, pred

    replicated = sharding.replicated(self.mesh)
    return jax.jit(eval_step,
                   in_shardings=(param_shardings, self.data_sharding, replicated),
                   out_shardings=(replicated, replicated, replicated))

  def iterator(self):
    return pipeline.make_eval_iterator(
        self.source, batch_size=self.batch_size, image_size=self.config.image_size,
        tokenizer=self.tokenizer, mean=self.config.image_mean, std=self.config.image_std,
        original_size=self.original_size, worker_count=self.config.get("data_workers", 0))

  def run(self, params: Any, *, step: int, workdir: str | Path | None = None,
          details: bool = False) -> dict[str, Any]:
    """{"<split>/<metric>": value} for the input protocol and "<split>/original/<metric>";
    with details=True also per-example rows (index, intersection, union) at original size."""
    accumulators = {p: metrics.init_accumulator() for p in PROTOCOLS}
    rows, overlay = [], None
    for batch in self.iterator():
      host_batch = batch
      batch = sharding.global_batch(batch, self.data_sharding)
      if self._compiled is None:  # every process compiled before any runs it
        self._compiled = sharding.compile_together(self._step, (params, batch, accumulators),
                                                   "eval_step")
      accumulators, counts, pred = self._compiled(params, batch, accumulators)
      if details:
        gathered = multihost_utils.process_allgather(
            {"index": batch["index"], "valid": batch["valid"], **counts}, tiled=True)
        rows.extend(
            (int(i), int(inter), int(union))
            for i, v, inter, union in zip(gathered["index"], gathered["valid"],
                                          gathered["intersection"], gathered["union"]) if v)
      if overlay is None and workdir is not None and jax.process_index() == 0:
        overlay = self._overlay(host_batch, np.asarray(jax.device_get(pred)), workdir, step)
    results = {}
    for protocol in PROTOCOLS:
      summary = metrics.finalize_accumulator(jax.device_get(accumulators[protocol]))
      prefix = self.split if protocol == "input" else f"{self.split}/original"
      results.update({f"{prefix}/{k}": v for k, v in summary.items()})
    if details:
      results["rows"] = rows
    return results

  def _overlay(self, host_batch, pred, workdir, step) -> Path:
    """Overlay grid of the split's first examples (the same ones at every evaluation)."""
    count = min(self.num_overlays, int(np.sum(host_batch["valid"])))
    images = [drawing.to_uint8_image(host_batch["image"][i], self.config.image_mean,
                                  self.config.image_std) for i in range(count)]
    gt = host_batch["mask"][:count] > 0.5
    expressions = [pipeline.example_text(self.source[int(i)]["expression"])
                   for i in host_batch["index"][:count]]
    ious = [metrics.referring_metrics([p], [g])["mIoU"] for p, g in zip(pred[:count], gt)]
    path = epath.Path(workdir) / "overlays" / f"{self.split}_step{step:07d}.png"
    return drawing.overlay_grid(images, gt, pred[:count], expressions, path,
                             ious=ious)


def per_category(rows, source, names: list[str] | None) -> dict[str, dict[str, float]]:
  """Metrics per category from per-example (index, intersection, union) rows."""
  groups = collections.defaultdict(lambda: ([], []))
  for index, intersection, union in rows:
    category = source[index]["category"]
    if names is not None:
      category = names[int(category)]
    elif isinstance(category, bytes):
      category = category.decode()
    groups[str(category)][0].append(intersection)
    groups[str(category)][1].append(union)
  return {name: metrics.metrics_from_counts(np.asarray(i), np.asarray(u))
          for name, (i, u) in sorted(groups.items())}


def format_table(rows: dict[str, dict[str, float]], title: str) -> str:
  columns = ("n", "mIoU", "oIoU", "P@0.5", "P@0.7", "P@0.9")
  lines = [title, f"  {'':<28}" + "".join(f"{c:>8}" for c in columns)]
  for name, values in rows.items():
    cells = "".join(f"{values[c]:>8d}" if c == "n" else f"{100 * values[c]:>8.2f}"
                    for c in columns)
    lines.append(f"  {name:<28}{cells}")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: modules import each other)."""
  flags.DEFINE_string("workdir", None, "Run directory of s4eca_jax.train.",
                      required=True)
  flags.DEFINE_string("split", "test", "Split to evaluate.")
  flags.DEFINE_string("checkpoint", "best", "'best' (by oIoU on the run's "
                      "eval_split), 'latest' or a step number.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir, if not the one the run used.")
  flags.DEFINE_integer("batch_size", None, "Eval batch size (default: the run's).")
  flags.DEFINE_bool("per_category", True, "Print the per-category table.")


def evaluate_run(workdir: str | Path, *, split: str = "test", which: str = "best",
                 data_dir: str | None = None, batch_size: int | None = None,
                 per_category_table: bool = True) -> dict[str, Any]:
  """Evaluates checkpoint `which` of a trained workdir on `split`; prints and saves."""
  workdir = epath.Path(run_setup.expand_path(workdir))
  if batch_size is not None and batch_size < 1:
    raise run_setup.ConfigError(f"--batch_size={batch_size}: must be at least 1.")
  run_setup.checkpoint_step(workdir, run_setup.load_config(workdir), which)  # before the model
  config, setup = run_setup.load_run(workdir, {"data_dir": run_setup.expand_path(data_dir),
                                               "eval_batch_size": batch_size})
  trainable, step = run_setup.restore_trainable(setup, config, workdir, which)
  evaluator = Evaluator(setup.predict_fn(), setup.eval_param_shardings(), setup.mesh, config,
                        run_setup.load_tokenizer(config), split=split)
  results = evaluator.run(setup.eval_params(trainable), step=step, workdir=workdir,
                          details=True)
  rows = results.pop("rows")
  log = run_setup.log  # every process computes the tables; process 0 prints them
  log(f"\n{config.dataset} {split}, checkpoint step {step}")
  table = {protocol: {k.rsplit("/", 1)[-1]: v for k, v in results.items()
                      if k.startswith(f"{split}/") and
                      ("/original/" in k) == (protocol == "original")}
           for protocol in PROTOCOLS}
  log(format_table(table, "protocols (input: at the network input size; original: at "
                            "the image's size)"))
  if per_category_table:
    by_category = per_category(rows, evaluator.source, category_names(config))
    results["per_category"] = by_category
    log(format_table(by_category, "per category (original protocol)"))
  if jax.process_index() == 0:
    out = workdir / f"eval_{split}_step{step}.json"
    out.write_text(json.dumps(results, indent=1))
    log(f"saved {out}")
  return results


def main(argv) -> None:
  del argv
  evaluate_run(FLAGS.workdir, split=FLAGS.split, which=FLAGS.checkpoint,
               data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size,
               per_category_table=FLAGS.per_category)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
