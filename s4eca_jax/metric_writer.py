"""Scalar metrics of a run, written from process 0: JSONL and TensorBoard.

`<workdir>/metrics.jsonl` has one JSON object per log call ({"step": ..., "train/loss": ...});
TensorBoard event files go to `<workdir>/tb/` through tensorboardX (pure Python, no
TensorFlow). Pictures are drawn by drawing.py.
"""

from __future__ import annotations

import json
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

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
