"""Builds a dataset's TFDS ArrayRecord files from its manual download (or generates it).

  python -m s4eca_jax.prepare rrsis_d --manual_dir ~/data/rrsisd --data_dir ~/tfds
  python -m s4eca_jax.prepare refsegrs --manual_dir ~/data/RefSegRS --data_dir ~/tfds
  python -m s4eca_jax.prepare synthetic_rrsis --data_dir ~/tfds --num_train 2000 \\
      --num_val 250 --num_test 250 --image_size 256 --seed 0

Prints a progress bar, then a summary: examples per split and every skipped or repaired
item with the reason (also saved as prepare_report.json next to the dataset files).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys

import tensorflow_datasets as tfds

import tfds_builders
from s4eca_jax.data import layouts

_REPORT = "prepare_report.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m s4eca_jax.prepare", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=sorted(tfds_builders.BUILDERS),
                      help="which builder to run")
  parser.add_argument("--data_dir", required=True, type=Path,
                      help="TFDS data dir; the dataset lands in "
                           "DATA_DIR/<name>/[<config>/]<version>/")
  parser.add_argument("--manual_dir", type=Path,
                      help="folder with the manual download (rrsis_d, refsegrs; required "
                           "there). The expected layout is printed when files are missing.")
  synthetic = parser.add_argument_group(
      "synthetic_rrsis", "scene counts and size; the RRSIS-D layout is written to "
      "DATA_DIR/downloads/synthetic_rrsis/<config>/<version>/ (it also builds with rrsis_d)")
  synthetic.add_argument("--num_train", type=int, default=2000, help="train scenes (2000)")
  synthetic.add_argument("--num_val", type=int, default=250, help="val scenes (250)")
  synthetic.add_argument("--num_test", type=int, default=250, help="test scenes (250)")
  synthetic.add_argument("--image_size", type=int, default=256, help="square side (256)")
  synthetic.add_argument("--seed", type=int, default=0, help="generator seed (0)")
  args = parser.parse_args(argv)
  if args.dataset == "synthetic_rrsis" and args.manual_dir is not None:
    parser.error("synthetic_rrsis generates its own RRSIS-D layout under "
                 "DATA_DIR/downloads/synthetic_rrsis/; drop --manual_dir.")
  if args.dataset != "synthetic_rrsis" and args.manual_dir is None:
    parser.error(f"{args.dataset} needs --manual_dir (the unpacked manual download).\n"
                 + tfds_builders.BUILDERS[args.dataset].MANUAL_DOWNLOAD_INSTRUCTIONS)
  return args


def make_builder(args: argparse.Namespace) -> tfds.core.DatasetBuilder:
  builder_cls = tfds_builders.BUILDERS[args.dataset]
  if args.dataset == "synthetic_rrsis":
    config = tfds_builders.synthetic_config(args.num_train, args.num_val, args.num_test,
                                            args.image_size, args.seed)
    return builder_cls(config=config, data_dir=str(args.data_dir))
  module = sys.modules[builder_cls.__module__]
  layouts.require_files(args.dataset, args.manual_dir, module.REQUIRED_FILES,
                        builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS)
  return builder_cls(data_dir=str(args.data_dir))


def prepare(args: argparse.Namespace) -> dict:
  """Builds (unless already built) and returns the report that main() prints."""
  builder = make_builder(args)
  report_path = Path(builder.data_dir) / _REPORT
  if report_path.exists():
    return dict(json.loads(report_path.read_text()), reused=True)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(args.manual_dir) if args.manual_dir else None))
  name = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
  report = {
      "name": name,
      "data_dir": str(builder.data_dir),
      "tfds_data_dir": str(args.data_dir),
      "examples": {split: info.num_examples for split, info in builder.info.splits.items()},
      "quirks": builder.quirks.to_json(),
      "summary": builder.quirks.summary(),
  }
  if args.dataset == "synthetic_rrsis":
    report["layout_dir"] = str(builder.layout_dir)
  report_path.write_text(json.dumps(report, indent=1))
  return dict(report, reused=False)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  try:
    report = prepare(args)
  except FileNotFoundError as error:  # missing manual files: the message says what to do
    raise SystemExit(f"error: {error}") from None
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
  main()
