"""Builds a dataset's TFDS ArrayRecord files from its manual download (or generates it).

  python -m s4eca_jax.prepare rrsis_d --manual_dir ~/data/rrsisd --data_dir ~/tfds
  python -m s4eca_jax.prepare refsegrs --manual_dir ~/data/RefSegRS --data_dir ~/tfds
  python -m s4eca_jax.prepare synthetic_rrsis --data_dir ~/tfds --num_train 2000 \\
      --num_val 250 --num_test 250 --image_size 256 --seed 0

Prints a progress bar, then a summary: examples per split and every skipped or repaired
item with the reason (also saved as prepare_report.json next to the dataset files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import sys

from absl import flags
import tensorflow_datasets as tfds

import tfds_builders
from s4eca_jax import cli
from tfds_builders import layout_reader

_REPORT = "prepare_report.json"

__doc__ += "\nDatasets: " + ", ".join(sorted(tfds_builders.BUILDERS)) + ".\n" + "".join(
    f"\n{name}, manual download:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
    for name, builder in sorted(tfds_builders.BUILDERS.items())
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: modules import each other)."""
  flags.DEFINE_string("data_dir", None, "TFDS data dir; the dataset lands in "
                      "DATA_DIR/<name>/[<config>/]<version>/.", required=True)
  flags.DEFINE_string(
  "manual_dir", None, "Folder with the manual download (rrsis_d, refsegrs; required "
  "there). The expected layout is printed when files are missing.")
  flags.DEFINE_integer("num_train", 2000, "synthetic_rrsis: train scenes.")
  flags.DEFINE_integer("num_val", 250, "synthetic_rrsis: val scenes.")
  flags.DEFINE_integer("num_test", 250, "synthetic_rrsis: test scenes.")
  flags.DEFINE_integer("image_size", 256, "synthetic_rrsis: square side.")
  flags.DEFINE_integer("seed", 0, "synthetic_rrsis: generator seed. The RRSIS-D "
                       "layout is written to DATA_DIR/downloads/synthetic_rrsis/"
                       "<config>/<version>/ (it also builds with rrsis_d).")


def make_builder(dataset: str, data_dir: str | Path, manual_dir: str | Path | None = None,
                 **synthetic) -> tfds.core.DatasetBuilder:
  """The builder of `dataset`; `synthetic` (num_train, num_val, num_test, image_size,
  seed) configures synthetic_rrsis. Raises cli.UsageError for a wrong combination."""
  if dataset not in tfds_builders.BUILDERS:
    raise cli.UsageError(f"unknown dataset {dataset!r}; choose one of "
                         f"{sorted(tfds_builders.BUILDERS)}.")
  builder_cls = tfds_builders.BUILDERS[dataset]
  if dataset == "synthetic_rrsis":
    if manual_dir is not None:
      raise cli.UsageError("synthetic_rrsis generates its own RRSIS-D layout under "
                           "DATA_DIR/downloads/synthetic_rrsis/; drop --manual_dir.")
    defaults = dict(num_train=2000, num_val=250, num_test=250, image_size=256, seed=0)
    values = {**defaults, **{k: v for k, v in synthetic.items() if v is not None}}
    try:
      config = tfds_builders.synthetic_config(**values)
    except ValueError as error:
      raise cli.UsageError(str(error)) from None
    return builder_cls(config=config, data_dir=str(data_dir))
  if manual_dir is None:
    raise cli.UsageError(f"{dataset} needs --manual_dir (the unpacked manual download); "
                         "`python -m s4eca_jax.prepare --help` shows the layouts.")
  module = sys.modules[builder_cls.__module__]
  layout_reader.require_files(dataset, manual_dir, module.REQUIRED_FILES,
                              builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS)
  return builder_cls(data_dir=str(data_dir))


def remove_partial_builds(version_dir: Path) -> list[Path]:
  """Deletes what killed builds of this dataset version left behind: TFDS writes into
  `incomplete.XXXXXX_<version>/` beside the final folder and renames it at the end."""
  leftovers = sorted(version_dir.parent.glob(f"incomplete.*_{version_dir.name}"))
  for leftover in leftovers:
    shutil.rmtree(leftover, ignore_errors=True)
    print(f"removed the partial build {leftover}")
  return leftovers


def prepare(dataset: str, data_dir: str | Path, manual_dir: str | Path | None = None,
            **synthetic) -> dict:
  """Builds (unless already built) and returns the report that main() prints."""
  data_dir = Path(os.path.expanduser(os.fspath(data_dir)))
  manual_dir = None if manual_dir is None else Path(os.path.expanduser(os.fspath(manual_dir)))
  builder = make_builder(dataset, data_dir, manual_dir, **synthetic)
  report_path = Path(builder.data_dir) / _REPORT
  if report_path.exists():
    return dict(json.loads(report_path.read_text()), reused=True)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir) if manual_dir else None))
  remove_partial_builds(Path(builder.data_dir))
  name = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
  report = {
      "name": name,
      "data_dir": str(builder.data_dir),
      "tfds_data_dir": str(data_dir),
      "examples": {split: info.num_examples for split, info in builder.info.splits.items()},
      "quirks": builder.quirks.to_json(),
      "summary": builder.quirks.summary(),
  }
  if dataset == "synthetic_rrsis":
    report["layout_dir"] = str(builder.layout_dir)
  report_path.write_text(json.dumps(report, indent=1))
  return dict(report, reused=False)


@cli.positional
def main(argv) -> None:
  if len(argv) != 2:
    raise cli.UsageError(f"give one dataset: python -m s4eca_jax.prepare "
                         f"{{{','.join(sorted(tfds_builders.BUILDERS))}}} --data_dir DIR ...")
  try:
    report = prepare(argv[1], FLAGS.data_dir, FLAGS.manual_dir, num_train=FLAGS.num_train,
                     num_val=FLAGS.num_val, num_test=FLAGS.num_test,
                     image_size=FLAGS.image_size, seed=FLAGS.seed)
  except (FileNotFoundError, layout_reader.LayoutError, layout_reader.UnsafePickleError) as error:
    # missing or unreadable annotation files: the message names the file and the fix
    raise cli.UsageError(str(error)) from None
  state = "already prepared" if report["reused"] else "prepared"
  print(f"\n{report['name']} {state} in {report['data_dir']}")
  for split, count in report["examples"].items():
    print(f"  {split}: {count} examples")
  print("Skipped or repaired items:" if report["summary"] else "Nothing skipped or repaired.")
  for line in report["summary"]:
    print(f"  {line}")
  if "layout_dir" in report:
    print(f"RRSIS-D layout written to {report['layout_dir']}")
  print(f'Read it with s4eca_jax.data.pipeline.open_split("{report["name"]}", split, '
        f'"{report["tfds_data_dir"]}")')


if __name__ == "__main__":
  define_flags()
  cli.run(main)
