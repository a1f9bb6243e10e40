"""RRSIS-D: referring remote sensing image segmentation (manual download)."""

from tfds_builders.rrsis_d.rrsis_d_dataset_builder import Builder
