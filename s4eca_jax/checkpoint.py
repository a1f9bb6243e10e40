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

Integrity (local file systems): once orbax has finalised a step directory, process 0 writes
`<step>/MANIFEST_SHA256.json` (size and sha256 of every file in it). `restore` verifies it
first and raises `DamagedCheckpointError` naming the step and the file, so damaged data is
never restored silently; `restore_newest_intact` falls back to the previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from s4eca_jax import sharding

MANIFEST = "MANIFEST_SHA256.json"
# orbax rewrites the step's metadata (timestamps) after the manifest is written; it holds
# no array data and a damaged one fails to parse rather than restoring wrong values.
_UNSEALED = {MANIFEST, "_CHECKPOINT_METADATA"}


class DamagedCheckpointError(RuntimeError):
  """A checkpoint whose files do not match its manifest, or that cannot be restored."""


def _file_digests(step_dir: Path) -> dict[str, list]:
  digests = {}
  for path in sorted(step_dir.rglob("*")):
    name = path.relative_to(step_dir).as_posix()
    if path.is_file() and name not in _UNSEALED and not name.startswith(f".{MANIFEST}"):
      sha = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          sha.update(block)
      digests[name] = [path.stat().st_size, sha.hexdigest()]
  return digests


def write_manifest(step_dir: str | Path) -> None:
  """Seals a finalised step directory (written atomically: a torn manifest is absent)."""
  step_dir = Path(step_dir)
  temporary = step_dir / f".{MANIFEST}.tmp"
  temporary.write_text(json.dumps({"files": _file_digests(step_dir)}, indent=0))
  os.replace(temporary, step_dir / MANIFEST)


def verify_manifest(step_dir: str | Path) -> None:
  """Raises DamagedCheckpointError naming the first file that differs from the manifest."""
  step_dir = Path(step_dir)
  where = f"checkpoint step {step_dir.name} ({step_dir})"
  try:
    expected = json.loads((step_dir / MANIFEST).read_text())["files"]
  except FileNotFoundError:
    raise DamagedCheckpointError(
        f"{where}: no {MANIFEST}; the run ended before sealing it, or it was copied "
        "incompletely.") from None
  except (ValueError, KeyError, TypeError) as error:
    raise DamagedCheckpointError(f"{where}: {MANIFEST} is unreadable ({error}).") from None
  actual = _file_digests(step_dir)
  for name, (size, digest) in sorted(expected.items()):
    if name not in actual:
      raise DamagedCheckpointError(f"{where}: file {name} is missing.")
    if actual[name][0] != size:
      raise DamagedCheckpointError(
          f"{where}: file {name} has {actual[name][0]} bytes, {size} when saved.")
    if actual[name][1] != digest:
      raise DamagedCheckpointError(f"{where}: file {name} differs from the saved data "
                                   "(sha256 mismatch).")


class _QuietOrbaxNoise(logging.Filter):
  """Drops two kinds of orbax log noise:
  - the 'Event loop is closed' tracebacks its background clean-up logs after a failed
    read: they bury the one error that matters;
  - its warning for a save without metrics when a best metric is tracked: by design here
    (Checkpointer.save), such a save is kept as one of the latest only."""

  PHRASES = ("Event loop is closed", "Requested `tracked_metric`; did not provide metrics")

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += str(record.exc_info[1])
    return not any(phrase in text for phrase in self.PHRASES)


_NOISE = _QuietOrbaxNoise()


def quiet_orbax_noise() -> None:
  for name in ("absl", "asyncio", "orbax", ""):
    logger = logging.getLogger(name)
    if _NOISE not in logger.filters:
      logger.addFilter(_NOISE)


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
    quiet_orbax_noise()
    # Orbax syncs the processes with device collectives (restore, save). On CPU the first
    # one sets up a gloo context that waits only 30 s for its peers, and processes can
    # come here further apart than that (process 0 alone writes the compilation cache; a
    # loaded host): wait for all on the coordination service first.
    sharding.sync_processes("checkpointer")
    workdir = epath.Path(workdir)  # local or gs://
    self.directory = (workdir if workdir.is_absolute() else workdir.absolute()) / "checkpoints"
    # Manifests (integrity) are written and verified on local file systems only.
    self._local = not os.fspath(self.directory).startswith(("gs://", "s3://"))
    self.best_metric = best_metric
    self._async = async_save
    self._unsealed_step = None
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=best_fn, best_mode=best_mode,  # also makes orbax store the metrics
        enable_async_checkpointing=async_save, create=True,
        # Step folders are made before save() returns: a failure there (a full disk, a
        # folder that went away) raises here, where orbax's background creation left the
        # main thread waiting for a signal that never came.
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal,
                                       create_directories_asynchronously=False)
        if async_save else None)
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
    # One save in flight at a time (orbax waits here anyway), so _seal knows its step.
    self._manager.wait_until_finished()
    self._unsealed_step = step
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=DataSave(data_state)),
        metrics=metrics, force=True)
    if not self._async:
      self._seal()
    return saved

  def _seal(self) -> None:
    """Writes the manifest once orbax has written everything, before it renames the
    temporary step directory to its final name (async: in orbax's background thread), so
    a step directory that exists under its final name always has one."""
    step, self._unsealed_step = self._unsealed_step, None
    if step is None or jax.process_index() != 0 or not self._local:
      return
    directory = Path(os.fspath(self.directory))
    pending = sorted(directory.glob(f"{step}.orbax-checkpoint-tmp*"))
    write_manifest(pending[-1] if pending else directory / str(step))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """Restores `state` with the shardings/dtypes of `abstract_state`, and the data state,
    after checking the step's files against its manifest."""
    if self._local:
      verify_manifest(self.directory / str(step))
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=DataRestore()))
    except Exception as error:  # pylint: disable=broad-except  # named, then re-raised
      raise DamagedCheckpointError(f"checkpoint step {step} ({self.directory / str(step)}) "
                                   f"could not be restored: {type(error).__name__}: "
                                   f"{error}") from error
    return restored["state"], restored["data"]

  def restore_newest_intact(self, abstract_state: Any, notice: Callable[[str], None] = print
                            ) -> tuple[int, Any, Any] | None:
    """(step, state, data state) of the newest checkpoint that verifies and restores; each
    one passed over is named through `notice`. None when there is no checkpoint; raises
    DamagedCheckpointError when none is intact."""
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
      except DamagedCheckpointError as error:
        failures.append(str(error))
        notice(f"skipping damaged {error}")
        continue
      if failures:
        moved = self._set_aside(sorted(set(self.all_steps()) - set(range(step + 1))))
        notice(f"restored the previous intact checkpoint, step {step}; the damaged ones "
               f"were moved to {moved} (the run saves those steps again).")
      return step, state, data_state
    if failures:
      raise DamagedCheckpointError(
          f"no intact checkpoint in {self.directory}: " + " | ".join(failures) + " Move "
          "the damaged step folders away to start again from step 0, or use a new --workdir.")
    return None

  def _set_aside(self, steps: list[int]) -> Path:
    """Moves step folders out of orbax's sight, so that the resumed run can save those
    steps again; kept for inspection."""
    aside = self.directory.parent / "checkpoints_damaged"
    if jax.process_index() == 0:
      for step in steps:
        target = aside / str(step)
        if target.exists():
          target = aside / f"{step}.{len(list(aside.glob(f'{step}.*'))) + 1}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.directory / str(step), target)
    self._manager.reload()
    return aside

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
