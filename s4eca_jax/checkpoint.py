"""Orbax checkpoints of a training run: what is needed to resume, nothing more.

Each step directory under `<workdir>/checkpoints/` holds
  state: the train state pytree (trainable params, optimizer state, step, RNG key);
  data:  the input iterator's state (JSON), so a resumed run sees the same next batch.
The frozen encoders are never saved: they are reloaded from their source at start.
Saves are asynchronous; `wait()` (also run by `close()`) blocks until they are on disk.
The last `keep` checkpoints are kept, plus the best one by `best_metric` when evaluations
report it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


def _encode_data_state(state: Any) -> Any:
  # grain iterators give bytes (JSON) or dicts; JSON cannot hold bytes.
  if isinstance(state, bytes):
    return {"__bytes__": state.decode()}
  return state


def _decode_data_state(state: Any) -> Any:
  if isinstance(state, dict) and set(state) == {"__bytes__"}:
    return state["__bytes__"].encode()
  return state


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the run's retention rules."""

  def __init__(self, workdir: str | Path, *, keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True):
    policies = [checkpoint_managers.LatestN(keep)]
    best_fn = None
    if best_metric:
      best_fn = lambda metrics: float(metrics[best_metric])
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=best_fn, best_mode=best_mode,  # also makes orbax store the metrics
        enable_async_checkpointing=async_save, create=True)
    self.directory = Path(workdir).absolute() / "checkpoints"
    self.best_metric = best_metric
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Step of the best checkpoint by `best_metric` (None before any evaluation)."""
    return self._manager.best_step() if self.best_metric else None

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any = None,
           metrics: dict[str, float] | None = None) -> bool:
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None  # a save without an evaluation is kept only as one of the latest
    data = json.loads(json.dumps(_encode_data_state(data_state)))
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data)),
        metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """Restores `state` with the shardings/dtypes of `abstract_state`, and the data state."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored["state"], _decode_data_state(restored["data"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
