"""synthetic_rrsis: procedural RRSIS-D-style scenes, written in the RRSIS-D layout."""

from tfds_builders.synthetic_rrsis.synthetic_rrsis_dataset_builder import Builder
from tfds_builders.synthetic_rrsis.synthetic_rrsis_dataset_builder import layout_dir
from tfds_builders.synthetic_rrsis.synthetic_rrsis_dataset_builder import write_layout_once
from tfds_builders.synthetic_rrsis.synthetic_rrsis_dataset_builder import synthetic_config
