"""Scalar metrics of a run, written from process 0: JSONL and TensorBoard.

`<workdir>/metrics.jsonl` has one JSON object per log call ({"step": ..., "train/loss": ...});
TensorBoard event files go to `<workdir>/tb/` through tensorboardX (pure Python, no
TensorFlow). Pictures are drawn by drawing.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
from etils import epath


class MetricWriter:
  """Scalars to JSONL and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str | Path):
    self.enabled = jax.process_index() == 0
    self.workdir = epath.Path(workdir)  # local or gs://
    self._tb = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(str(self.workdir / "tb"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with (self.workdir / "metrics.jsonl").open("a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def drop_rows_after(self, step: int) -> None:
    """Forgets rows past `step` (a resumed run logs them again: one row set per step)."""
    path = self.workdir / "metrics.jsonl"
    if not self.enabled or not path.exists():
      return
    rows = path.read_text().splitlines(keepends=True)
    kept = [row for row in rows if row.strip() and _row_step(row) <= step]
    if len(kept) != len(rows):
      temporary = path.with_suffix(".jsonl.tmp")
      temporary.write_text("".join(kept))
      os.replace(temporary, path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _row_step(row: str) -> float:
  try:
    return int(json.loads(row)["step"])
  except (ValueError, KeyError, TypeError):
    return float("inf")  # a torn last line from a killed run: dropped


def read_metrics(workdir: str | Path) -> list[dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
