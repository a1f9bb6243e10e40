"""Prediction with a trained run: image + expression -> mask PNG and overlay.

    python -m s4eca_jax.predict --workdir W --image scene.jpg \
        --expression "the white ship to the left of the bridge" --out mask.png
    python -m s4eca_jax.predict --workdir W --batch pairs.jsonl --out_dir preds/

The mask is written at the image's original size (0 / 255 PNG); the overlay beside it
(`<out>_overlay.png`) tints the prediction and prints the expression. In batch mode each
line of the JSONL file is {"image": path, "expression": text[, "out": name.png]}.
"""

from __future__ import annotations

import json
from pathlib import Path
import tempfile

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from s4eca_jax import cli, drawing, metrics, partition, run_setup
from s4eca_jax.data import pipeline
from tfds_builders import layout_reader


class PredictionError(cli.UsageError):
  """An input that cannot be predicted on (the message says why)."""


def read_image(path: str | Path) -> np.ndarray:
  """RGB uint8 (H, W, 3) from any PIL-readable file; PredictionError if it is not one."""
  path = Path(path)
  if not path.is_file():
    raise PredictionError(f"Image {path} does not exist.")
  try:
    with Image.open(path) as image:
      return layout_reader.to_rgb_uint8(image)
  except (UnidentifiedImageError, OSError) as error:
    raise PredictionError(f"Image {path} could not be read as an image ({error}); pass a "
                          "JPEG, PNG or TIFF file.") from None


def check_expression(expression: str) -> str:
  expression = (expression or "").strip()
  if not expression:
    raise PredictionError("The expression is empty: describe the object to segment, e.g. "
                          "--expression \"the white ship to the left of the bridge\".")
  return expression


class Predictor:
  """Holds a restored run and predicts masks for (image, expression) pairs."""

  def __init__(self, workdir: str | Path, which: str = "best"):
    run_setup.checkpoint_step(workdir, run_setup.load_config(workdir), which)  # before the model
    self.config, self.setup = run_setup.load_run(workdir)
    self.trainable, self.step = run_setup.restore_trainable(self.setup, self.config, workdir,
                                                            which)
    self.params = partition.merge(self.trainable, self.setup.frozen)
    self.tokenizer = run_setup.load_tokenizer(self.config)
    self._forward = jax.jit(lambda params, image, ids, mask: self.setup.model.apply(
        {"params": params}, image, ids, mask)["logits"].astype(jnp.float32))

  def __call__(self, image: np.ndarray, expression: str) -> np.ndarray:
    """uint8 RGB (H, W, 3), text -> bool mask (H, W)."""
    expression = check_expression(expression)
    size = self.config.image_size
    normalised = pipeline.normalize_image(pipeline.resize_image(image, size),
                                          self.config.image_mean, self.config.image_std)[None]
    tokens = self.tokenizer([expression])
    logits = self._forward(self.params, normalised, tokens["input_ids"],
                           tokens["attention_mask"])  # (1, S, S)
    height, width = image.shape[:2]
    logits = metrics.resize_logits_to_original(
        logits, jnp.array([height]), jnp.array([width]), (height, width))
    probability = self.config.get("mask_probability", 0.5)
    return np.asarray(metrics.masks_from_logits(logits, probability))[0]


def read_batch_file(path: str | Path, out_dir: str | Path) -> list[tuple[str, str, Path]]:
  """(image, expression, mask path) per line of a JSONL batch file; every mask path stays
  inside out_dir."""
  path, out_dir = Path(path), Path(out_dir)
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as error:
    raise PredictionError(f"--batch {path} cannot be read ({type(error).__name__}: "
                          f"{error}); pass a UTF-8 JSONL file.") from None
  pairs = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
    except json.JSONDecodeError as error:
      raise PredictionError(f"{path}:{number}: not a JSON object ({error.msg}); each line is "
                            "{\"image\": path, \"expression\": text[, \"out\": name.png]}.") from None
    if not isinstance(item, dict) or "image" not in item or "expression" not in item:
      raise PredictionError(f"{path}:{number}: each line needs \"image\" and "
                            "\"expression\" keys.")
    if not all(isinstance(item.get(key, ""), str) for key in ("image", "expression", "out")):
      raise PredictionError(f"{path}:{number}: \"image\", \"expression\" and \"out\" must be "
                            "strings.")
    name = item.get("out") or f"{number:05d}_{Path(item['image']).stem}.png"
    out = out_dir / name
    if not out.resolve().is_relative_to(out_dir.resolve()):
      raise PredictionError(f"{path}:{number}: \"out\": {name!r} points outside --out_dir "
                            f"{out_dir}; give a file name (or a sub-folder) inside it.")
    pairs.append((item["image"], item["expression"], out))
  return pairs


def check_writable(out: Path) -> None:
  """PredictionError unless a mask (and its overlay) can be written at `out`."""
  if out.is_dir():
    raise PredictionError(f"--out {out} is a folder; give the mask's file name, e.g. "
                          f"{out / 'mask.png'}.")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".write_check_"):
      pass
  except OSError as error:
    raise PredictionError(f"cannot write into {out.parent} ({error.strerror or error}); "
                          "choose another --out / --out_dir.") from None


def predict_pairs(workdir: str | Path, pairs: list[tuple[str, str, Path]],
                  which: str = "best") -> list[Path]:
  """Masks and overlays for (image, expression, mask path) pairs; inputs are checked
  before the model loads."""
  for _, expression, out in pairs:
    check_expression(expression)
    check_writable(Path(out))
  images = [read_image(image) for image, _, _ in pairs]
  predictor = Predictor(workdir, which)
  written = []
  for image, (_, expression, out) in zip(images, pairs):
    mask = predictor(image, expression)
    overlay_path = drawing.prediction_outputs(image, mask, expression, out)
    print(f"{out} ({int(mask.sum())} pixels), overlay {overlay_path}")
    written.append(out)
  return written


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: modules import each other)."""
  flags.DEFINE_string("workdir", None, "Run directory of s4eca_jax.train.",
                      required=True)
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step.")
  flags.DEFINE_string("image", None, "One image: the image file (JPEG, PNG, TIFF).")
  flags.DEFINE_string("expression", None, "One image: the referring expression.")
  flags.DEFINE_string("out", None, "One image: the mask PNG to write (overlay: "
                      "<out>_overlay.png).")
  flags.DEFINE_string("batch", None, "Batch: JSONL of {\"image\", \"expression\"[, "
                      "\"out\"]} per line.")
  flags.DEFINE_string("out_dir", None, "Batch: folder for the masks and overlays.")


def main(argv) -> list[Path]:
  del argv
  expand = run_setup.expand_path
  if FLAGS.batch:
    if not FLAGS.out_dir:
      raise cli.UsageError("--batch needs --out_dir")
    pairs = read_batch_file(expand(FLAGS.batch), expand(FLAGS.out_dir))
  elif FLAGS.image and FLAGS.expression is not None and FLAGS.out:
    pairs = [(expand(FLAGS.image), FLAGS.expression, Path(expand(FLAGS.out)))]
  else:
    raise cli.UsageError("give --image, --expression and --out (or --batch and --out_dir)")
  return predict_pairs(expand(FLAGS.workdir), pairs, FLAGS.checkpoint)

if __name__ == "__main__":
  define_flags()
  cli.run(main)
