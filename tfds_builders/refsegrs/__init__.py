"""RefSegRS: referring segmentation of remote sensing images (manual download)."""

from tfds_builders.refsegrs.refsegrs_dataset_builder import Builder
