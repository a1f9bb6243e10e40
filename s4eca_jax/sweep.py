"""Sweeps: the points of a config file's `get_sweep(arg)`, one workdir each.

    # run the points one after another on this machine
    python -m s4eca_jax.sweep --config configs/rrsisd.py --root R [--config.FIELD=VALUE]
    # print one train command per point (a SLURM array, a TPU pod queue) and run nothing
    python -m s4eca_jax.sweep --config configs/rrsisd.py --root R --print
    # tabulate each point's overrides with its best val oIoU / mIoU, draw the val curves
    python -m s4eca_jax.sweep --config configs/rrsisd.py --root R --summary

Point i trains in R/<i>_<field=value,...> (s4eca_jax.hyper.point_name) with the config
file's config, the command line's --config overrides, then the point's overrides.
R/sweep.json lists the points; the summary writes R/summary.txt and R/val_curves.png.
A point that finished is skipped on a rerun; one that was stopped resumes (training
resumes a workdir). A stop request ends the sweep with exit 75: rerun to go on.
"""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

from absl import flags
from etils import epath
from ml_collections import config_flags

from s4eca_jax import cli, drawing, hyper, metric_writer, run_setup, train

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: modules import each other)."""
  cli.define_config()
  flags.DEFINE_string("root", None, "Folder of the sweep: one workdir per point, "
                      "sweep.json, summary.txt, val_curves.png. Local or gs://.",
                      required=True)
  flags.DEFINE_bool("print", False, "Print one train command per point; run nothing.")
  flags.DEFINE_bool("summary", False, "Tabulate the points' best val oIoU / mIoU from their "
                    "workdirs and draw their val curves; run nothing.")


def points_of(config_spec: str) -> list[dict[str, Any]]:
  """The config file's get_sweep(arg) points ("path.py[:arg]")."""
  module, arg = run_setup.config_module(config_spec)
  if not hasattr(module, "get_sweep"):
    raise cli.UsageError(f"{config_spec.partition(':')[0]} defines no get_sweep(arg); add "
                         "one returning s4eca_jax.hyper points (see s4eca_jax/hyper.py).")
  return module.get_sweep(arg) if arg else module.get_sweep()


def _flag_value(value: Any) -> str:
  return value if isinstance(value, str) else repr(value)


def commands(config_spec: str, base_overrides: dict[str, Any], root: epath.Path,
             points: list[dict[str, Any]]) -> list[str]:
  """One `python -m s4eca_jax.train` command per point."""
  lines = []
  for index, point in enumerate(points):
    args = [sys.executable, "-m", "s4eca_jax.train", f"--config={config_spec}",
            f"--workdir={root / hyper.point_name(index, point)}"]
    args += [f"--config.{k}={_flag_value(v)}" for k, v in {**base_overrides, **point}.items()]
    lines.append(shlex.join(args))
  return lines


def run_points(config, root: epath.Path, points: list[dict[str, Any]]) -> list[dict]:
  """Trains the points one after another; -> each one's train() result."""
  results = []
  for index, point in enumerate(points):
    name = hyper.point_name(index, point)
    run_setup.log(f"=== point {index + 1}/{len(points)}: {name}")
    result = train.train(hyper.apply(config, point), root / name)
    results.append(result)
    if result["stopped_by"]:
      break
  return results


def write_plan(root: epath.Path, points: list[dict[str, Any]]) -> None:
  root.mkdir(parents=True, exist_ok=True)
  plan = [{"name": hyper.point_name(i, p), "overrides": p} for i, p in enumerate(points)]
  (root / "sweep.json").write_text(json.dumps(plan, indent=1, default=repr))


def summary(root: epath.Path, split: str = "val") -> str:
  """Table of each point's overrides, best oIoU and mIoU (and their steps) on `split`;
  writes root/summary.txt and root/<split>_curves.png (oIoU against step, one curve per
  point)."""
  plan_path = root / "sweep.json"
  if not plan_path.exists():
    raise cli.UsageError(f"{plan_path} not found: run the sweep (or --print) first.")
  plan = json.loads(plan_path.read_text())
  rows, curves = [], {}
  for point in plan:
    logged = [r for r in metric_writer.read_metrics(root / point["name"])
              if f"{split}/oIoU" in r]
    curves[point["name"]] = ([r["step"] for r in logged], [r[f"{split}/oIoU"] for r in logged])
    best = {}
    for metric in ("oIoU", "mIoU"):
      if logged:
        top = max(logged, key=lambda r, m=metric: r[f"{split}/{m}"])
        best[metric] = f"{100 * top[f'{split}/{metric}']:.2f} @{top['step']}"
      else:
        best[metric] = "-"
    overrides = ", ".join(f"{k}={v}" for k, v in point["overrides"].items())
    rows.append((point["name"], overrides, best["oIoU"], best["mIoU"]))
  header = ("point", "overrides", f"best {split} oIoU", f"best {split} mIoU")
  widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header))]
  lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
           for row in [header, *rows]]
  table = "\n".join(lines)
  (root / "summary.txt").write_text(table + "\n")
  drawing.curves_png(curves, root / f"{split}_curves.png", title=f"{split} oIoU per point")
  return table


def main(argv) -> None:
  del argv
  spec = config_flags.get_config_filename(FLAGS["config"])
  root = epath.Path(run_setup.expand_path(FLAGS.root))
  if FLAGS.summary:
    run_setup.log(summary(root, FLAGS.config.get("eval_split", "val")))
    return
  points = points_of(spec)
  if not points:
    raise cli.UsageError(f"get_sweep of {spec} returned no points.")
  for point in points:
    hyper.apply(FLAGS.config, point)  # every field exists: fail before training any
  write_plan(root, points)  # the same file from every process of a multi-host sweep
  if FLAGS.print:
    base = config_flags.get_override_values(FLAGS["config"])  # flat {"a.b": value}
    print("\n".join(commands(spec, base, root, points)))
    return
  results = run_points(run_setup.expand_paths(FLAGS.config), root, points)
  if results and results[-1]["stopped_by"]:
    raise cli.Stopped(f"sweep stopped by {results[-1]['stopped_by']} in point "
                      f"{len(results)}; rerun the same command to go on.")
  run_setup.log(summary(root, FLAGS.config.get("eval_split", "val")))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
