"""Pictures of the language-guided selection inside the visual adapters, for one example.

Each visual adapter sows `spatial_maps` (B, h, w, K), one sigmoid map per scale branch,
and `scale_weights` (B, K, r), a softmax over the K branches per channel (see
models/adapters.py). `adapter_selections` runs the model and collects them;
`selection_png` draws the image, truth and prediction, then one row per adapter: the K
spatial maps over the image (colour: low -> high within the map) and the scale weights
averaged over channels as bars.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from s4eca_jax import logs

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
  paste(Image.fromarray(logs.overlay(image, truth, (40, 220, 40))), 0, 1, "truth")
  paste(Image.fromarray(logs.overlay(image, prediction, (255, 40, 40))), 0, 2, "prediction")
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
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  return path
