"""TFDS builder for RefSegRS read from its published layout (see layout_reader.py).

The release carries no category labels (only `<id> <expression>` lines), so unlike
rrsis_d this builder has no `category` feature rather than one guessed from the text.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from tfds_builders import layout_reader
from tfds_builders.common import ReferringBuilder, referring_features

REQUIRED_FILES = [layout_reader.REFSEGRS_IMAGES, layout_reader.REFSEGRS_MASKS,
                  *layout_reader.REFSEGRS_PHRASES.values()]


class Builder(ReferringBuilder):
  """RefSegRS: 4,420 (image, expression, mask) triplets at 512x512."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: one example per phrase-file line, TIFF images re-encoded "
               "as RGB PNG, masks = grayscale > 50, quirks counted in the build summary.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
RefSegRS (Yuan et al., IEEE TGRS 2024, "RRSIS: Referring Remote Sensing Image
Segmentation") is a manual download: follow the dataset link in
https://github.com/zhu-xlab/rrsis (README). Unpack it so that the manual_dir holds exactly:

  <manual_dir>/images/<id>.tif              RGB images, 512x512
  <manual_dir>/masks/<id>.tif               grayscale masks, 0/255 (foreground > 50)
  <manual_dir>/output_phrase_train.txt      lines "<id> <expression>"
  <manual_dir>/output_phrase_val.txt
  <manual_dir>/output_phrase_test.txt

then run:  python -m s4eca_jax.prepare refsegrs --manual_dir <manual_dir> --data_dir <data_dir>
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=referring_features(categories=None),
        homepage="https://github.com/zhu-xlab/rrsis")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = dl_manager.manual_dir
    layout_reader.require_files(self.name, root, REQUIRED_FILES, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    triplets = layout_reader.read_refsegrs_phrases(root)
    return {split: self._generate_examples(root, triplets, split)
            for split, split_triplets in triplets.items() if split_triplets}

  def _generate_examples(self, root, triplets, split):
    yield from layout_reader.refsegrs_examples(root, triplets, split, self.quirks)
