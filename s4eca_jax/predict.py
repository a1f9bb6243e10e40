"""Prediction with a trained run: image + expression -> mask PNG and overlay.

    python -m s4eca_jax.predict --workdir W --image scene.jpg \
        --expression "the white ship to the left of the bridge" --out mask.png
    python -m s4eca_jax.predict --workdir W --batch pairs.jsonl --out_dir preds/

The mask is written at the image's original size (0 / 255 PNG); the overlay beside it
(`<out>_overlay.png`) tints the prediction and prints the expression. In batch mode each
line of the JSONL file is {"image": path, "expression": text[, "out": name.png]}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from s4eca_jax import evaluate, logs, metrics, partition, tokenize, train
from s4eca_jax.data import layouts, pipeline


class PredictionError(ValueError):
  """An input that cannot be predicted on (the message says why)."""


def read_image(path: str | Path) -> np.ndarray:
  """RGB uint8 (H, W, 3) from any PIL-readable file; PredictionError if it is not one."""
  path = Path(path)
  if not path.is_file():
    raise PredictionError(f"Image {path} does not exist.")
  try:
    with Image.open(path) as image:
      return layouts.to_rgb_uint8(image)
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
    self.config, self.setup, _ = evaluate.load_run(workdir)
    self.trainable, self.step = evaluate.restore_trainable(self.setup, Path(workdir), which)
    self.params = partition.merge(self.trainable, self.setup.frozen)
    self.tokenizer = tokenize.load_tokenizer(train.tokenizer_folder(self.config),
                                             self.config.max_length)
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


def write_outputs(image: np.ndarray, mask: np.ndarray, expression: str, out: Path) -> Path:
  """Writes the mask PNG at `out` and the overlay beside it; returns the overlay path."""
  out.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(mask.astype(np.uint8) * 255).save(out)
  tinted = Image.fromarray(logs.overlay(image, mask))
  caption_height = 28
  canvas = Image.new("RGB", (tinted.width, tinted.height + caption_height), "white")
  canvas.paste(tinted, (0, 0))
  ImageDraw.Draw(canvas).text((4, tinted.height + 6), expression, fill="black",
                              font=ImageFont.load_default())
  overlay_path = out.with_name(out.stem + "_overlay.png")
  canvas.save(overlay_path)
  return overlay_path


def _pairs(args) -> list[tuple[str, str, Path]]:
  if args.batch:
    pairs = []
    for number, line in enumerate(Path(args.batch).read_text().splitlines(), 1):
      if not line.strip():
        continue
      item = json.loads(line)
      if "image" not in item or "expression" not in item:
        raise PredictionError(f"{args.batch}:{number}: each line needs \"image\" and "
                              "\"expression\" keys.")
      name = item.get("out") or f"{number:05d}_{Path(item['image']).stem}.png"
      pairs.append((item["image"], item["expression"], Path(args.out_dir) / name))
    return pairs
  return [(args.image, args.expression, Path(args.out))]


def main(argv=None) -> list[Path]:
  parser = argparse.ArgumentParser(prog="python -m s4eca_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="run directory of s4eca_jax.train")
  parser.add_argument("--checkpoint", default="best", help="'best', 'latest' or a step")
  single = parser.add_argument_group("one image")
  single.add_argument("--image", help="image file (JPEG, PNG, TIFF)")
  single.add_argument("--expression", help="referring expression")
  single.add_argument("--out", help="mask PNG to write (overlay: <out>_overlay.png)")
  batch = parser.add_argument_group("batch")
  batch.add_argument("--batch", help="JSONL of {\"image\", \"expression\"[, \"out\"]}")
  batch.add_argument("--out_dir", help="folder for the batch's masks and overlays")
  args = parser.parse_args(argv)
  if args.batch:
    if not args.out_dir:
      parser.error("--batch needs --out_dir")
  elif not (args.image and args.expression is not None and args.out):
    parser.error("give --image, --expression and --out (or --batch and --out_dir)")

  try:
    pairs = _pairs(args)
    for _, expression, _ in pairs:  # fail before loading the model
      check_expression(expression)
    images = [read_image(image) for image, _, _ in pairs]
    predictor = Predictor(args.workdir, args.checkpoint)
    written = []
    for image, (_, expression, out) in zip(images, pairs):
      mask = predictor(image, expression)
      overlay_path = write_outputs(image, mask, expression, out)
      print(f"{out} ({int(mask.sum())} pixels), overlay {overlay_path}")
      written.append(out)
  except PredictionError as error:
    raise SystemExit(f"error: {error}") from None
  return written


if __name__ == "__main__":
  main()
