"""Orbax checkpoints of a training run: what is needed to resume, nothing more.

Each step directory under `<workdir>/checkpoints/` holds
  state: the train state pytree (trainable params, optimizer state, step, RNG key);
  data:  every process's input iterator state, one JSON file each
         (process_<i>-of-<n>.json, as grain's own orbax handler names them), so a resumed
         run sees the same next batches on every process.
The frozen encoders are never saved: they are reloaded from their source at start.
Saves are asynchronous; `wait()` (also run by `close()`) blocks until they are on disk.
The last `keep` checkpoints are kept, plus the best one by `best_metric` when evaluations
report it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
from etils import epath
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


class ProcessDataHandler(ocp.CheckpointHandler):
  """Each process writes and reads its own iterator state (orbax's JsonSave writes from
  the primary process only, which would lose the other processes' positions).

  A checkpoint written by a different number of processes restores when all its
  processes saved the same state: the train pipeline's state counts batches taken
  (`{"next_index": k}`), and every process takes its slice of one global shuffled order,
  so the same k means the same global position whatever the process count.
  """

  def save(self, directory: epath.Path, args: "DataSave"):
    index, count = jax.process_index(), jax.process_count()
    state = json.dumps(_encode_data_state(args.state))
    (directory / f"process_{index}-of-{count}.json").write_text(state)

  def restore(self, directory: epath.Path, args: "DataRestore" = None):
    del args
    index, count = jax.process_index(), jax.process_count()
    own = directory / f"process_{index}-of-{count}.json"
    if own.exists():
      return _decode_data_state(json.loads(own.read_text()))
    files = sorted(directory.glob("process_*-of-*.json"))
    states = {file.read_text() for file in files}
    if len(states) != 1:
      raise ValueError(
          f"{directory} holds {len(files)} data iterator states, not one common to all "
          f"processes, and this run has {count} processes: resume with the process count "
          "that wrote it.")
    return _decode_data_state(json.loads(states.pop()))


@ocp.args.register_with_handler(ProcessDataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(ProcessDataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the run's retention rules."""

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True):
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
    workdir = epath.Path(workdir)  # local or gs://
    self.directory = (workdir if workdir.is_absolute() else workdir.absolute()) / "checkpoints"
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
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=DataSave(data_state)),
        metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """Restores `state` with the shardings/dtypes of `abstract_state`, and the data state."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=DataRestore()))
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
