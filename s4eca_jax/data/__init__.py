"""Data: the grain input pipeline (pipeline.py) over the TFDS builders of tfds_builders/."""
