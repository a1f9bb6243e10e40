"""TFDS builder for RRSIS-D read from its RMSIN on-disk layout (see layout_reader.py)."""

from __future__ import annotations

import tensorflow_datasets as tfds

from tfds_builders import layout_reader
from tfds_builders.common import ReferringBuilder, referring_features

REQUIRED_FILES = [layout_reader.RRSISD_REFS, layout_reader.RRSISD_INSTANCES, layout_reader.RRSISD_IMAGES]


class Builder(ReferringBuilder):
  """RRSIS-D: 17,402 (image, expression, mask) triplets; one example per sentence."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: one example per sentence, image as the source JPEG, "
               "mask (RLE == 1) at the image size, quirks counted in the build summary.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
RRSIS-D (Liu et al., CVPR 2024, RMSIN) is a manual download: follow the dataset links in
https://github.com/Lsan2401/RMSIN (README, "Datasets"). Put (copy or symlink) the files so
that the manual_dir holds exactly:

  <manual_dir>/refs(unc).p            pickled list of ref dicts (RMSIN/LAVT refs format)
  <manual_dir>/instances.json         COCO-style: images[{id,file_name,height,width}],
                                      annotations[{id,image_id,bbox,segmentation,...}],
                                      segmentation = [one RLE dict]
  <manual_dir>/JPEGImages/NNNNN.jpg   the 17,402 images (RMSIN ships them under
                                      images/rrsisd/JPEGImages/)

then run:  python -m s4eca_jax.prepare rrsis_d --manual_dir <manual_dir> --data_dir <data_dir>
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=referring_features(layout_reader.RRSISD_CATEGORIES),
        homepage="https://github.com/Lsan2401/RMSIN")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = dl_manager.manual_dir
    layout_reader.require_files(self.name, root, REQUIRED_FILES, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    annotations = layout_reader.read_rrsisd_annotations(root)
    layout_reader.record_unknown_splits(annotations, self.quirks)
    present = {ref["split"] for ref in annotations.refs}
    return {split: self._generate_examples(root, annotations, split)
            for split in layout_reader.RRSISD_SPLITS if split in present}

  def _generate_examples(self, root, annotations, split):
    yield from layout_reader.rrsisd_examples(root, annotations, split, self.quirks)
