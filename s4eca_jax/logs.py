"""Run outputs written from process 0: metrics (JSONL + TensorBoard) and overlay grids.

`<workdir>/metrics.jsonl` has one JSON object per log call ({"step": ..., "train/loss": ...});
TensorBoard event files go to `<workdir>/tb/` through tensorboardX (pure Python, no
TensorFlow). Overlay grids show, per example, the image, the ground truth and the
prediction over the image, with the expression written below.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont


class MetricWriter:
  """Scalars to JSONL and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str | Path):
    self.enabled = jax.process_index() == 0
    self.workdir = Path(workdir)
    self._tb = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(str(self.workdir / "tb"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def to_uint8_image(image: np.ndarray, mean=None, std=None) -> np.ndarray:
  """A normalised (H, W, 3) float image back to uint8 for display."""
  image = np.asarray(image, np.float32)
  if mean is not None:
    image = image * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 40, 40), alpha=0.5) -> np.ndarray:
  """Tints `mask` pixels of a uint8 (H, W, 3) image and outlines the region."""
  out = image.astype(np.float32).copy()
  mask = np.asarray(mask) > 0
  out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
  edge = mask ^ _erode(mask)
  out[edge] = color
  return out.astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
  padded = np.pad(mask, 1, constant_values=False)
  return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
          & padded[1:-1, :-2] & padded[1:-1, 2:])


def overlay_grid(images: np.ndarray, gt_masks: np.ndarray, pred_masks: np.ndarray,
                 expressions: list[str], path: str | Path, *, ious=None,
                 tile: int = 192) -> Path:
  """Writes a PNG: one row per example (image | truth | prediction) and its expression.

  images: uint8 (B, H, W, 3); masks: (B, H, W) bool/0-1.
  """
  font = ImageFont.load_default()
  text_height = 30
  rows = len(images)
  canvas = Image.new("RGB", (3 * tile, rows * (tile + text_height)), "white")
  draw = ImageDraw.Draw(canvas)
  for row in range(rows):
    image = np.asarray(images[row])
    panels = [image, overlay(image, gt_masks[row], (40, 220, 40)),
              overlay(image, pred_masks[row], (255, 40, 40))]
    top = row * (tile + text_height)
    for col, panel in enumerate(panels):
      canvas.paste(Image.fromarray(panel).resize((tile, tile), Image.NEAREST), (col * tile, top))
    caption = expressions[row]
    if ious is not None:
      caption = f"{caption}   [IoU {float(ious[row]):.2f}]"
    for i, line in enumerate(textwrap.wrap(caption, width=3 * tile // 6)[:2]):
      draw.text((4, top + tile + 2 + 13 * i), line, fill="black", font=font)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  return path


def curve_png(steps, values, path: str | Path, *, title: str, size=(480, 300)) -> Path:
  """A minimal line plot (no matplotlib): values against steps, log scale if positive."""
  width, height = size
  canvas = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(canvas)
  draw.text((8, 4), title, fill="black", font=ImageFont.load_default())
  steps = np.asarray(steps, np.float64)
  values = np.asarray(values, np.float64)
  if len(values) >= 2:
    log = bool((values > 0).all())
    ys = np.log10(values) if log else values
    lo, hi = float(ys.min()), float(ys.max())
    hi = hi if hi > lo else lo + 1.0
    left, right, top, bottom = 50, width - 10, 24, height - 24
    xs = left + (steps - steps.min()) / max(steps.max() - steps.min(), 1.0) * (right - left)
    yy = bottom - (ys - lo) / (hi - lo) * (bottom - top)
    draw.rectangle([left, top, right, bottom], outline="gray")
    draw.line(list(zip(xs.tolist(), yy.tolist())), fill=(30, 80, 200), width=2)
    label = (lambda v: f"{10 ** v:.3g}") if log else (lambda v: f"{v:.3g}")
    draw.text((2, top), label(hi), fill="black")
    draw.text((2, bottom - 10), label(lo), fill="black")
    draw.text((left, bottom + 4), f"step {int(steps.min())}", fill="black")
    draw.text((right - 60, bottom + 4), f"step {int(steps.max())}", fill="black")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  return path
