"""All of the project's drawing: overlay grids of evaluations, training curves, the
adapters' selection maps, and prediction outputs (mask PNG + overlay). PIL only.

Overlay grids show, per example, the image, the ground truth and the prediction over the
image, with the expression written below. Each visual adapter sows `spatial_maps`
(B, h, w, K), one sigmoid map per scale branch, and `scale_weights` (B, K, r), a softmax
over the K branches per channel (see models/adapters.py); `adapter_selections` runs the
model and collects them, and `selection_png` draws the image, truth and prediction, then
one row per adapter: the K spatial maps over the image (colour: low -> high within the
map) and the scale weights averaged over channels as bars.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont


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
  return _save_png(canvas, path)


def curve_png(steps, values, path: str | Path, *, title: str, size=(480, 300)) -> Path:
  """A minimal line plot (no matplotlib): values against steps, log scale if positive."""
  return curves_png({"": (steps, values)}, path, title=title, size=size)


_CURVE_COLOURS = ((30, 80, 200), (220, 60, 40), (40, 160, 60), (150, 60, 190),
                  (230, 140, 20), (20, 160, 170), (120, 120, 120), (200, 40, 140))


def curves_png(curves: dict[str, tuple[Sequence[float], Sequence[float]]],
               path: str | Path, *, title: str, size=(480, 300)) -> Path:
  """Line plot of several {label: (steps, values)} curves on shared axes (log scale if
  every value is positive), with a legend when there are labels; e.g. a sweep's val
  curves."""
  width, height = size
  canvas = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(canvas)
  draw.text((8, 4), title, fill="black", font=ImageFont.load_default())
  series = [(label, np.asarray(x, np.float64), np.asarray(y, np.float64))
            for label, (x, y) in curves.items() if len(y)]
  if series and sum(len(y) for _, _, y in series) >= 2:
    all_steps = np.concatenate([x for _, x, _ in series])
    all_values = np.concatenate([y for _, _, y in series])
    log = bool((all_values > 0).all())
    scale = np.log10 if log else (lambda v: v)
    lo, hi = float(scale(all_values).min()), float(scale(all_values).max())
    hi = hi if hi > lo else lo + 1.0
    x_lo, x_span = all_steps.min(), max(all_steps.max() - all_steps.min(), 1.0)
    left, right, top, bottom = 50, width - 10, 24, height - 24
    draw.rectangle([left, top, right, bottom], outline="gray")
    for number, (label, steps, values) in enumerate(series):
      colour = _CURVE_COLOURS[number % len(_CURVE_COLOURS)]
      xs = left + (steps - x_lo) / x_span * (right - left)
      yy = bottom - (scale(values) - lo) / (hi - lo) * (bottom - top)
      points = list(zip(xs.tolist(), yy.tolist()))
      if len(points) > 1:
        draw.line(points, fill=colour, width=2)
      for x, y in points:  # single evaluations show as dots
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
      if label:
        draw.text((left + 6, top + 4 + 12 * number), label, fill=colour)
    label_of = (lambda v: f"{10 ** v:.3g}") if log else (lambda v: f"{v:.3g}")
    draw.text((2, top), label_of(hi), fill="black")
    draw.text((2, bottom - 10), label_of(lo), fill="black")
    draw.text((left, bottom + 4), f"step {int(all_steps.min())}", fill="black")
    draw.text((right - 60, bottom + 4), f"step {int(all_steps.max())}", fill="black")
  return _save_png(canvas, path)


def _save_png(canvas: Image.Image, path: str | Path) -> Path:
  """Writes through etils.epath, so a workdir on gs:// takes overlays and curves too."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    canvas.save(f, format="PNG")
  return path


def prediction_outputs(image: np.ndarray, mask: np.ndarray, expression: str, out: Path) -> Path:
  """Writes the mask PNG at `out` and the overlay beside it; returns the overlay path."""
  out.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(mask.astype(np.uint8) * 255).save(out)
  tinted = Image.fromarray(overlay(image, mask))
  caption_height = 28
  canvas = Image.new("RGB", (tinted.width, tinted.height + caption_height), "white")
  canvas.paste(tinted, (0, 0))
  ImageDraw.Draw(canvas).text((4, tinted.height + 6), expression, fill="black",
                              font=ImageFont.load_default())
  overlay_path = out.with_name(out.stem + "_overlay.png")
  canvas.save(overlay_path)
  return overlay_path


# A perceptually ordered ramp (dark blue -> teal -> yellow), interpolated linearly.
_RAMP = np.array([(48, 18, 90), (40, 90, 150), (30, 150, 140), (120, 200, 80),
                  (250, 230, 40)], np.float32)


def heat_colours(values: np.ndarray) -> np.ndarray:
  """values in [0, 1], any shape -> uint8 RGB colours of the same shape + (3,)."""
  position = np.clip(values, 0, 1) * (len(_RAMP) - 1)
  low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
  fraction = (position - low)[..., None]
  return ((1 - fraction) * _RAMP[low] + fraction * _RAMP[low + 1]).astype(np.uint8)


def adapter_selections(model, params, image: np.ndarray, input_ids: np.ndarray,
                       attention_mask: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
  """One example (no batch axis) -> (selections, logits (H, W)); selections:
  {"block_k": {"spatial_maps": (h, w, K), "scale_weights": (K, r)}} in block order."""
  out, state = jax.jit(lambda p, *x: model.apply({"params": p}, *x, mutable="intermediates"))(
      params, image[None], input_ids[None], attention_mask[None])
  blocks = state["intermediates"]["image_encoder"]
  order = sorted(blocks, key=lambda name: int(name.rsplit("_", 1)[1]))
  selections = {name: {key: np.asarray(blocks[name]["adapter"][key][0][0])
                       for key in ("spatial_maps", "scale_weights")} for name in order}
  return selections, np.asarray(out["logits"][0])


def _map_panel(image: np.ndarray, values: np.ndarray, tile: int) -> Image.Image:
  """A (h, w) map stretched to its own range (absolute when flat: a saturated sigmoid),
  upsampled, blended over the image."""
  low, high = float(values.min()), float(values.max())
  stretched = (values - low) / (high - low) if high - low > 0.05 else values
  heat = Image.fromarray(heat_colours(stretched)).resize((tile, tile), Image.BILINEAR)
  base = Image.fromarray(image).resize((tile, tile), Image.BILINEAR)
  return Image.blend(base, heat, 0.6)


def _legend_panel(tile: int, font) -> Image.Image:
  """How to read the maps: the colour ramp and one line per panel kind."""
  panel = Image.new("RGB", (2 * tile, tile), "white")
  draw = ImageDraw.Draw(panel)
  ramp = heat_colours(np.linspace(0, 1, 2 * tile - 40)[None].repeat(14, axis=0))
  panel.paste(Image.fromarray(ramp), (20, 40))
  draw.text((20, 22), "spatial selection m_k, per map:", fill="black", font=font)
  draw.text((20, 58), "low", fill="black", font=font)
  draw.text((2 * tile - 50, 58), "high", fill="black", font=font)
  notes = ("[min, max] of each sigmoid map below it (a flat",
           "map is drawn at its value: 0 dark, 1 yellow);",
           "scale weights: softmax over the branches,",
           "averaged over the adapter's channels.")
  for i, line in enumerate(notes):
    draw.text((20, 90 + 16 * i), line, fill="black", font=font)
  return panel


def _bars_panel(weights: Sequence[float], labels: Sequence[str], tile: int,
                font) -> Image.Image:
  """Vertical bars of values in [0, 1], one per scale branch, with their values."""
  panel = Image.new("RGB", (tile, tile), "white")
  draw = ImageDraw.Draw(panel)
  left, bottom, top = 14, tile - 20, 22
  slot = (tile - 2 * left) / len(weights)
  draw.line([left, bottom, tile - left, bottom], fill="gray")
  for i, (weight, label) in enumerate(zip(weights, labels)):
    x0 = left + i * slot + slot * 0.2
    x1 = left + (i + 1) * slot - slot * 0.2
    y = bottom - float(weight) * (bottom - top)
    draw.rectangle([x0, y, x1, bottom], fill=tuple(int(c) for c in heat_colours(
        np.array(0.25 + 0.5 * i / max(len(weights) - 1, 1)))))
    draw.text((x0, y - 16), f"{weight:.2f}", fill="black", font=font)
    draw.text((x0, bottom + 4), label, fill="black", font=font)
  return panel


def selection_png(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray,
                  expression: str, selections: dict[str, dict[str, Any]],
                  kernel_sizes: Sequence[int], path: str | Path, *, tile: int = 176) -> Path:
  """Writes the picture. image: uint8 (H, W, 3); truth, prediction: (H, W) bool."""
  font = ImageFont.load_default(size=12)
  labels = [f"{k}x{k}" for k in kernel_sizes]
  columns = len(kernel_sizes) + 2
  header, caption = 40, 20
  row_height = tile + caption
  canvas = Image.new("RGB", (columns * tile, header + (1 + len(selections)) * row_height),
                     "white")
  draw = ImageDraw.Draw(canvas)
  title = ImageFont.load_default(size=18)
  for i, line in enumerate(textwrap.wrap(f'"{expression}"', width=columns * tile // 10)[:2]):
    draw.text((8, 8 + 20 * i), line, fill="black", font=title)

  def paste(panel: Image.Image, row: int, col: int, text: str):
    top = header + row * row_height
    canvas.paste(panel.resize((tile, tile), Image.NEAREST), (col * tile, top))
    draw.text((col * tile + 4, top + tile + 3), text, fill="black", font=font)

  paste(Image.fromarray(image), 0, 0, "image")
  paste(Image.fromarray(overlay(image, truth, (40, 220, 40))), 0, 1, "truth")
  paste(Image.fromarray(overlay(image, prediction, (255, 40, 40))), 0, 2, "prediction")
  canvas.paste(_legend_panel(tile, font), (3 * tile, header))
  for row, (name, selected) in enumerate(selections.items(), start=1):
    maps = selected["spatial_maps"]  # (h, w, K)
    block = name.rsplit("_", 1)[1]
    for k, label in enumerate(labels):
      values = maps[..., k]
      paste(_map_panel(image, values, tile), row, k,
            f"block {block}, {label} [{values.min():.2f}, {values.max():.2f}]")
    weights = np.asarray(selected["scale_weights"]).mean(axis=-1)  # (K,) mean over channels
    paste(_bars_panel(weights, labels, tile, font), row, len(labels),
          f"block {block}, scale weights")
  return _save_png(canvas, path)
