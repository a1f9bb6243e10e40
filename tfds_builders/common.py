"""What the three builders share: the feature spec (one example per sentence, image and
mask at the original size as encoded bytes) and ArrayRecord output, so that neither
writing nor reading needs TensorFlow."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import layout_reader


def referring_features(categories: tuple[str, ...] | None) -> tfds.features.FeaturesDict:
  """image: RGB uint8 (H, W, 3), stored as the source JPEG or as PNG after conversion;
  mask: uint8 (H, W, 1) PNG, 1 = referred object; `category` only when the dataset has
  category labels."""
  features = {
      "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
      "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                  encoding_format="png"),
      "expression": tfds.features.Text(),
      "ref_id": np.int64,
      "sent_id": np.int64,
      "image_id": np.int64,
      "height": np.int64,
      "width": np.int64,
  }
  if categories is not None:
    features["category"] = tfds.features.ClassLabel(names=list(categories))
  return tfds.features.FeaturesDict(features)


class ReferringBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes ArrayRecord unless told otherwise; `quirks` collects what the build skipped
  or repaired (read it after download_and_prepare)."""

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self.quirks = layout_reader.QuirkLog()
