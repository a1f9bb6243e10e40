"""The demo, end to end on a CPU: synthetic scenes -> RRSIS-D layout -> rrsis_d build ->
train configs/demo.py -> evaluate on val -> predictions and pictures.

    python -m s4eca_jax.demo                      # workdirs/demo, data/
    python -m s4eca_jax.demo --ablate             # also the language-blind run, side by side
    python -m s4eca_jax.demo --config_arg variant=tiny --workdir /tmp/w --data_dir /tmp/d

Data: `tfds_builders.layout_writer` writes the scenes of config.synthetic in the RRSIS-D
on-disk layout (DATA_DIR/downloads/synthetic_rrsis/<name>/<version>/), which the real
`rrsis_d` builder then reads into DATA_DIR/rrsis_d_synthetic/<name>/<version>/: the demo
goes through the same reading path as RRSIS-D. Each run lives in WORKDIR/<run>/ (s4eca, and
language_blind with --ablate): checkpoints, metrics.jsonl, training_curve.png,
overlays/val_step*.png (fixed val examples: image | truth | prediction),
adapter_selection.png (the adapters' spatial maps and scale weights for one example),
predictions/ (masks and overlays from s4eca_jax.predict). WORKDIR/results.md holds the
metrics tables (overall and per expression type). A second call reuses the data and the
trained runs (an interrupted run resumes from its last checkpoint) and the compiled
steps (WORKDIR/jax_cache).
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from pathlib import Path

from s4eca_jax import presets


def cpu_devices(num_cores: int, batch_sizes) -> int:
  """The most XLA CPU devices (at most one per core) that split every batch evenly."""
  divisor = math.gcd(*batch_sizes)
  return max(d for d in range(1, max(1, num_cores) + 1) if divisor % d == 0)


# Before jax is imported: the CPU as one XLA device per core, the batch split over them as
# over GPUs. Small ops then keep every core busy (2 cores: 0.33 -> 0.28 s/step, see
# bench/DEMO.md). A device count already in XLA_FLAGS is kept; GPUs are not affected.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  _config = presets.demo_config()
  _count = cpu_devices(len(os.sched_getaffinity(0)), (_config.batch_size, _config.eval_batch_size))
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_count}").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from s4eca_jax import (cli, drawing, evaluate, metric_writer, metrics, predict, prepare,  # pylint: disable=g-import-not-at-top,wrong-import-position
                       train)
from s4eca_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfds_builders import layout_reader, synthetic_rrsis  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfds_builders.synthetic_rrsis import expressions  # pylint: disable=g-import-not-at-top,wrong-import-position

RUNS = {"s4eca": True, "language_blind": False}  # run name -> config language_guidance
NUM_PREDICTIONS = 4  # val examples written by the predictor
COLUMNS = ("mIoU", "oIoU", "P@0.5", "P@0.7", "P@0.9")


def progress(message: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------
# Data: the RRSIS-D layout, built by the rrsis_d builder.
# ---------------------------------------------------------------------------------------


def prepare_data(config: ml_collections.ConfigDict, data_dir: Path) -> dict:
  """Writes (once) the synthetic RRSIS-D layout and builds it with `rrsis_d`; returns the
  prepare report (name, tfds_data_dir, examples) plus "layout_dir" and
  "expression_types" (sent_id -> type)."""
  s = config.synthetic
  scenes = synthetic_rrsis.synthetic_config(s.num_train, s.num_val, s.num_test, s.image_size,
                                            s.seed)
  layout_dir = synthetic_rrsis.write_layout_once(  # versioned folder, reused when complete
      data_dir / "downloads", scenes,
      announce=lambda folder: progress(
          f"writing {s.num_train}/{s.num_val}/{s.num_test} synthetic scenes in the RRSIS-D "
          f"layout to {folder}"))
  report = prepare.prepare(
      "rrsis_d", data_dir / "rrsis_d_synthetic" / scenes.name / layout_dir.name,
      manual_dir=layout_dir)
  state = "reused" if report["reused"] else "built"
  progress(f"rrsis_d {state} from the layout: {report['examples']} in {report['data_dir']}")
  return dict(report, layout_dir=str(layout_dir), expression_types=expression_types(layout_dir))


def expression_types(layout_dir: str | Path) -> dict[int, str]:
  """sent_id -> expression type, as the generator recorded it in refs(unc).p."""
  refs = layout_reader.load_builtin_pickle(Path(layout_dir) / layout_reader.RRSISD_REFS)
  return {int(s["sent_id"]): s["type"] for ref in refs for s in ref["sentences"]}


# ---------------------------------------------------------------------------------------
# One run: train (or reuse), evaluate, pictures.
# ---------------------------------------------------------------------------------------


def run_config(config_arg: str, language_guidance: bool,
               data: dict) -> ml_collections.ConfigDict:
  arg = ",".join(filter(None, [config_arg, f"language_guidance={language_guidance}"]))
  config = presets.demo_config(arg)
  config.data_dir = data["tfds_data_dir"]
  return config


def per_type(rows, source, types: dict[int, str]) -> dict[str, dict[str, float]]:
  """Metrics per expression type from the evaluator's (index, intersection, union) rows."""
  groups = collections.defaultdict(list)
  for index, intersection, union in rows:
    groups[types[int(source[index]["sent_id"])]].append((intersection, union))
  ordered = [t for t in expressions.EXPRESSION_TYPES if t in groups]
  return {t: metrics.metrics_from_counts(*np.asarray(groups[t]).T) for t in ordered}


def write_curve(workdir: Path) -> Path:
  points = [(m["step"], m["train/loss"]) for m in metric_writer.read_metrics(workdir)
            if "train/loss" in m]
  steps, losses = zip(*points) if points else ((), ())
  smoothed = []  # the logged losses are single batches: an EMA shows the trend
  for loss in losses:
    smoothed.append(loss if not smoothed else 0.8 * smoothed[-1] + 0.2 * loss)
  return drawing.curve_png(steps, smoothed, workdir / "training_curve.png", size=(560, 320),
                        title=f"training loss (BCE + Dice, EMA 0.8), {workdir.name}")


def pick_attention_example(rows, source, types: dict[int, str]) -> int:
  """The first val example with a location expression (the hardest type) segmented with
  IoU >= 0.5, else the first with IoU >= 0.5, else the first."""
  hits = [index for index, intersection, union in sorted(rows)
          if union and intersection / union >= 0.5]
  located = [i for i in hits if types[int(source[i]["sent_id"])] == "location"]
  return (located or hits or [0])[0]


def attention_picture(predictor: predict.Predictor, source, index: int, path: Path) -> Path:
  config = predictor.config
  example = source[index]
  tokenizer = predictor.tokenizer
  features = pipeline.preprocess(example, image_size=config.image_size, tokenizer=tokenizer,
                                 mean=config.image_mean, std=config.image_std)
  selections, logits = drawing.adapter_selections(
      predictor.setup.model, predictor.params, features["image"], features["input_ids"],
      features["attention_mask"])
  image = drawing.to_uint8_image(features["image"], config.image_mean, config.image_std)
  prediction = np.asarray(metrics.masks_from_logits(logits[None], config.mask_probability))[0]
  return drawing.selection_png(
      image, features["mask"] > 0.5, prediction, pipeline.example_text(example["expression"]),
      selections, config.model.visual_adapter.kernel_sizes, path)


def write_predictions(predictor: predict.Predictor, source, layout_dir: str,
                      out_dir: Path) -> list[Path]:
  """Masks and overlays for the first val examples, read from the layout's JPEGs."""
  written = []
  for index in range(min(NUM_PREDICTIONS, len(source))):
    example = source[index]
    image_path = Path(layout_dir) / layout_reader.RRSISD_IMAGES / f"{int(example['image_id']):05d}.jpg"
    image = predict.read_image(image_path)
    expression = pipeline.example_text(example["expression"])
    mask = predictor(image, expression)
    written.append(drawing.prediction_outputs(image, mask, expression,
                                         out_dir / f"val{index:03d}_{image_path.stem}.png"))
  return written


def run(name: str, config: ml_collections.ConfigDict, workdir: Path, data: dict) -> dict:
  """Trains (resuming or reusing) and evaluates one run; returns its results."""
  progress(f"{name}: training {workdir} (language_guidance={config.model.language_guidance})")
  started = time.perf_counter()
  result = train.train(config, workdir)
  if result["stopped_by"]:
    raise cli.Stopped(f"{name}: stopped by {result['stopped_by']} at step {result['step']}; "
                      "rerun the same command to resume.")
  train_seconds = time.perf_counter() - started

  progress(f"{name}: evaluating on val")
  predictor = predict.Predictor(workdir, "latest")
  step = predictor.step
  setup = predictor.setup
  evaluator = evaluate.Evaluator(setup.predict_fn(), setup.eval_param_shardings(), setup.mesh,
                                 predictor.config, predictor.tokenizer, "val")
  results = evaluator.run(setup.eval_params(predictor.trainable), step=step, workdir=workdir,
                          details=True)
  types = data["expression_types"]
  overall = {k.rsplit("/", 1)[1]: v for k, v in results.items()
             if k.startswith("val/") and not k.startswith("val/original/")}
  by_type = per_type(results["rows"], evaluator.source, types)

  progress(f"{name}: pictures and predictions")
  pictures = {
      "overlays": workdir / "overlays" / f"val_step{step:07d}.png",
      "curve": write_curve(workdir),
      "adapters": attention_picture(predictor, evaluator.source,
                                    pick_attention_example(results["rows"],
                                                           evaluator.source, types),
                                    workdir / "adapter_selection.png"),
      "predictions": write_predictions(predictor, evaluator.source, data["layout_dir"],
                                       workdir / "predictions")[0].parent,
  }
  summary = {"step": step, "train_seconds": round(train_seconds, 1), "val": overall,
             "val_per_type": by_type}
  (workdir / "demo_results.json").write_text(json.dumps(summary, indent=1))
  return dict(summary, pictures=pictures)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _cells(values: dict[str, float]) -> list[str]:
  return [f"{100 * values[c]:.1f}" for c in COLUMNS]


def markdown_tables(results: dict[str, dict]) -> str:
  """The overall table (one row per run) and mIoU per expression type (one column per run)."""
  lines = ["## synthetic_rrsis val (input protocol, %)", "",
           "| run | n | " + " | ".join(COLUMNS) + " | steps | train s |",
           "|---" * (len(COLUMNS) + 4) + "|"]
  for name, result in results.items():
    lines.append(f"| {name} | {int(result['val']['n'])} | " + " | ".join(_cells(result["val"]))
                 + f" | {result['step']} | {result['train_seconds']} |")
  lines += ["", "## mIoU (%) and P@0.5 (%) per expression type", "",
            "| type | n | " + " | ".join(f"{name} mIoU | {name} P@0.5" for name in results)
            + " |", "|---" * (2 + 2 * len(results)) + "|"]
  first = next(iter(results.values()))["val_per_type"]
  for kind, values in first.items():
    cells = [f"{100 * r['val_per_type'][kind]['mIoU']:.1f} | "
             f"{100 * r['val_per_type'][kind]['P@0.5']:.1f}" for r in results.values()]
    lines.append(f"| {kind} | {values['n']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: modules import each other)."""
  flags.DEFINE_string("workdir", "workdirs/demo",
                      "Where the runs and results.md go.")
  flags.DEFINE_string("data_dir", "data", "Where the synthetic layout and its "
                      "rrsis_d build go.")
  flags.DEFINE_bool("ablate", False, "Also train the language-blind run (no path "
                    "from the expression to the output) and compare.")
  flags.DEFINE_string("config_arg", "", "Argument of configs/demo.py, e.g. "
                      "variant=tiny (tests).")


def run_demo(workdir: str | Path = "workdirs/demo", data_dir: str | Path = "data", *,
             ablate: bool = False, config_arg: str = "") -> dict[str, dict]:
  """Data -> train -> evaluate -> pictures for the S4ECA run (and the blind one)."""
  # Absolute: the runs' config.json must work from any directory (evaluate, predict CLIs).
  workdir = Path(os.path.expanduser(workdir)).resolve()
  data_dir = Path(os.path.expanduser(data_dir)).resolve()
  started = time.perf_counter()
  if not jax.config.jax_compilation_cache_dir:  # a rerun skips XLA compilation
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
  progress(f"{jax.device_count()} {jax.default_backend()} device(s); config "
           f"configs/demo.py:{config_arg}")
  data = prepare_data(presets.demo_config(config_arg), data_dir)
  names = list(RUNS) if ablate else ["s4eca"]
  results = {name: run(name, run_config(config_arg, RUNS[name], data), workdir / name, data)
             for name in names}

  tables = markdown_tables(results)
  (workdir / "results.md").write_text(tables)
  print("\n" + tables)
  for name, result in results.items():
    print(f"{name} pictures:")
    for what, path in result["pictures"].items():
      print(f"  {what:<12} {path}")
  print(f"tables: {workdir / 'results.md'}")
  progress(f"done in {time.perf_counter() - started:.0f} s")
  return results


def main(argv) -> None:
  del argv
  run_demo(FLAGS.workdir, FLAGS.data_dir, ablate=FLAGS.ablate, config_arg=FLAGS.config_arg)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
