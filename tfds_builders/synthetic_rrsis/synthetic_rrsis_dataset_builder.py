"""TFDS builder for synthetic_rrsis: generates the RRSIS-D on-disk layout (layout_writer.py, scenes from synthetic_rrsis/scenes.py)
under <data_dir>/downloads/synthetic_rrsis/<config>/<version>/ and reads it back through
the same code as rrsis_d (layout_reader.py). That folder also builds with the `rrsis_d` builder.

Configs are named after their parameters, e.g. `train2000_val250_test250_256px_seed0`;
read one with tfds.data_source("synthetic_rrsis/<config name>", ...).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import tensorflow_datasets as tfds

from tfds_builders import layout_reader, layout_writer
from tfds_builders.common import ReferringBuilder, referring_features


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  num_train: int = 2000
  num_val: int = 250
  num_test: int = 250
  image_size: int = 256
  seed: int = 0


def synthetic_config(num_train: int, num_val: int, num_test: int, image_size: int,
                     seed: int) -> SyntheticConfig:
  """The config for these parameters, named after them."""
  if min(num_train, num_val, num_test) < 1 or image_size < 64:
    raise ValueError("synthetic_rrsis needs at least one example per split and "
                     f"image_size >= 64, got {num_train}/{num_val}/{num_test} at {image_size}.")
  return SyntheticConfig(
      name=f"train{num_train}_val{num_val}_test{num_test}_{image_size}px_seed{seed}",
      description=f"{num_train}/{num_val}/{num_test} scenes of {image_size}x{image_size}, "
                  f"seed {seed}.",
      num_train=num_train, num_val=num_val, num_test=num_test, image_size=image_size,
      seed=seed)


def layout_dir(download_dir, name: str) -> Path:
  """Where config `name`'s RRSIS-D layout is written: one folder per generator version,
  so a layout from an older generator is never reused."""
  return Path(download_dir) / "synthetic_rrsis" / name / str(Builder.VERSION)


def write_layout_once(download_dir, config: SyntheticConfig,
                      announce: Callable[[Path], None] | None = None) -> Path:
  """`config`'s RRSIS-D layout folder (layout_dir), written unless already complete:
  refs(unc).p is written last. `announce(folder)` runs before a write."""
  root = layout_dir(download_dir, config.name)
  if not (root / layout_reader.RRSISD_REFS).exists():
    if announce is not None:
      announce(root)
    layout_writer.write_rrsis_layout(root, num_train=config.num_train, num_val=config.num_val,
                                 num_test=config.num_test, image_size=config.image_size,
                                 seed=config.seed)
  return root


class Builder(ReferringBuilder):
  """Synthetic referring segmentation scenes whose expressions need language."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: 10 RRSIS-D categories drawn with colour, size and "
               "position; template expressions that select exactly one object.",
      "1.1.0": "Balanced expression types (category, colour, size, location: a quarter "
               "each); refs(unc).p records each sentence's type.",
      "1.2.0": "3-6 objects per scene (was 2-6): at least two distractors. The layout "
               "folder is versioned: downloads/synthetic_rrsis/<config>/<version>/.",
  }
  BUILDER_CONFIGS = [
      synthetic_config(2000, 250, 250, 256, seed=0),  # demo
      synthetic_config(64, 16, 16, 128, seed=0),  # tests
  ]

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.layout_dir = None  # set when the layout is generated

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=referring_features(layout_reader.RRSISD_CATEGORIES))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    self.layout_dir = write_layout_once(dl_manager.download_dir, self.builder_config)
    annotations = layout_reader.read_rrsisd_annotations(self.layout_dir)
    layout_reader.record_unknown_splits(annotations, self.quirks)
    return {split: self._generate_examples(annotations, split)
            for split in layout_reader.RRSISD_SPLITS}

  def _generate_examples(self, annotations, split):
    yield from layout_reader.rrsisd_examples(self.layout_dir, annotations, split, self.quirks)
