"""The S4ECA trainer: one canonical training loop for every config and every mesh.

    python -m s4eca_jax.train --config configs/rrsisd.py --workdir W [--config.batch_size=64]
    python -m s4eca_jax.train --config configs/rrsisd.py:variant=tiny --workdir W

Phases: config -> mesh -> data -> model + frozen encoder weights -> sharding -> train loop
(with periodic evaluation) -> final evaluation. Everything a run writes lands in W:
config.json, checkpoints/ (orbax: trainable params, optimizer state, step, RNG, data
iterator state; never the frozen encoders), metrics.jsonl, tb/ (TensorBoard events) and
overlays/ (PNG grids at each evaluation), run_history.jsonl (each start; the schedule
fields a rerun changed). config.json is written once, by the run that creates W: a rerun
with other model or data fields is refused. A run resumes from its newest intact
checkpoint (damaged ones are named and moved to checkpoints_damaged/).
SIGTERM/SIGINT save a checkpoint and stop; a non-finite loss stops the run with the last
good checkpoint kept. On many hosts (config.distributed) every process runs this same
command; a SIGTERM to any one of them is agreed through JAX's preemption sync point, so
all save the same step and stop. W may be a bucket (gs://...).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import flags
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from s4eca_jax import checkpoint, cli, evaluate, metric_writer, run_setup, sharding
from s4eca_jax.data import pipeline


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf."""


log = run_setup.log


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def make_train_data(config, tokenizer, mesh):
  if not config.data_dir:
    raise run_setup.ConfigError(
        "config.data_dir is not set: pass --config.data_dir=DIR, the TFDS data dir that "
        "`python -m s4eca_jax.prepare ... --data_dir DIR` wrote.")
  source = pipeline.open_split(config.dataset, "train", config.data_dir)
  batch_size = run_setup.per_process_batch(config.batch_size, mesh)
  steps_per_epoch = len(source) // config.batch_size
  if steps_per_epoch == 0:
    raise run_setup.ConfigError(f"{len(source)} train examples cannot fill one batch of "
                                f"{config.batch_size}; lower config.batch_size.")
  iterator = pipeline.make_train_iterator(
      source, batch_size=batch_size, image_size=config.image_size, tokenizer=tokenizer,
      mean=config.image_mean, std=config.image_std, seed=config.seed,
      flip_probability=config.get("flip_probability", 0.0),
      worker_count=config.get("data_workers", 0))
  return iterator, steps_per_epoch


def total_steps_of(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.get("total_steps"):
    return int(config.total_steps)
  return int(math.ceil(config.num_epochs * steps_per_epoch))


# --------------------------------------------------------------------------------------
# Stop requests: SIGTERM (preemption, scancel) or Ctrl-C save a checkpoint first.
# --------------------------------------------------------------------------------------


class StopRequest:
  """SIGTERM / SIGINT / config.stop_after_steps -> stop at a step boundary with a checkpoint.

  One process: Python handlers set a flag, checked after every step. With
  config.distributed (any number of processes): jax.distributed.initialize installs JAX's
  preemption notifier for SIGTERM (it replaces the Python handler), and `agreed(step)`
  asks JAX's preemption sync point, which has every process agree on the same step
  through the coordination service (no collective per step); SIGINT, or a signal that
  came before the runtime started, is passed on as SIGTERM to this process, so that it
  goes the same way.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    self._synced = False  # stop requests agreed through JAX's preemption sync point

  def __enter__(self):
    # Once jax.distributed runs, SIGTERM is its notifier's (a later run in the same
    # process, e.g. a sweep's next point, must not put a Python handler over it).
    owned = () if jax.distributed.is_initialized() else (signal.SIGTERM,)
    for sig in (*owned, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def __bool__(self):
    return self.signal_name is not None

  def runtime_started(self) -> None:
    """After sharding.initialize_distributed: hand signals to JAX's preemption notifier."""
    if not jax.distributed.is_initialized():
      return
    self._synced = True
    self._previous.pop(signal.SIGTERM, None)  # the notifier replaced ours: leave it there
    forward = lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM)
    signal.signal(signal.SIGINT, forward)
    if self.signal_name is not None:  # came during set-up, before the notifier existed
      self.signal_name = None
      os.kill(os.getpid(), signal.SIGTERM)

  def agreed(self, step: int) -> bool:
    """Whether to stop after `step`. Every process calls this at every step, so all of
    them save that same step and stop together: a host that stopped alone would leave the
    others waiting in a collective. config.stop_after_steps is the same step everywhere."""
    if self.signal_name is not None:
      return True
    if self._synced and multihost_utils.reached_preemption_sync_point(step):
      self.signal_name = (f"a preemption notice (SIGTERM or Ctrl-C to one of the "
                          f"{jax.process_count()} processes)")
    return self.signal_name is not None


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _fetch(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  return [(step, {k: float(v) for k, v in jax.device_get(m).items()}) for step, m in pending]


def train(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> dict[str, Any]:
  """Trains (or resumes) a run in `workdir`.

  Returns {"step", "last" (train metrics), "eval" (last evaluation), "stopped_by"}. A stop
  request (SIGTERM/SIGINT) at any time, set-up included, ends the run at the next step
  boundary with a checkpoint.
  """
  with StopRequest() as stop:
    return _train(config, epath.Path(workdir), stop)


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, stop: StopRequest):
  # ---------------------------------------------------------------- config
  sharding.initialize_distributed(config)
  stop.runtime_started()
  run_setup.check_workdir_config(config, workdir)  # refuses a different run's workdir
  log(f"workdir {workdir}: {jax.process_count()} process(es), {jax.device_count()} "
      f"{jax.default_backend()} device(s)")

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  log(f"mesh {dict(mesh.shape)}")

  # ---------------------------------------------------------------- data
  tokenizer = run_setup.load_tokenizer(config)
  train_iter, steps_per_epoch = make_train_data(config, tokenizer, mesh)
  total_steps = total_steps_of(config, steps_per_epoch)
  log(f"data {config.dataset}: {steps_per_epoch} steps/epoch, {total_steps} steps")

  # ---------------------------------------------------------------- model, sharding
  setup = run_setup.build(config, mesh, total_steps)
  train_step = run_setup.make_train_step(setup, config)
  data_sharding = sharding.batch_sharding(mesh)
  evaluator = None
  if config.get("eval_every", 0) >= 0:
    evaluator = evaluate.Evaluator(
        setup.predict_fn(), setup.eval_param_shardings(), mesh, config, tokenizer,
        split=config.get("eval_split", "val"))

  # ---------------------------------------------------------------- resume
  ckpt = checkpoint.Checkpointer(workdir, keep=config.get("keep_checkpoints", 3),
                                 best_metric=run_setup.best_metric(config))
  state = setup.state
  restored = setup.restore_newest(ckpt)  # falls back past damaged checkpoints
  if restored is not None:
    at, state, data_state = restored
    train_iter.set_state(data_state)
    log(f"resumed from step {at}")
  step = int(jax.device_get(state["step"]))

  # ---------------------------------------------------------------- loop
  writer = metric_writer.MetricWriter(workdir)
  writer.drop_rows_after(step)  # rows a previous attempt logged past its last checkpoint
  log_every = config.get("log_every", 10)
  eval_every = config.get("eval_every", 0) or total_steps  # 0: at the end; < 0: never
  ckpt_every = config.get("checkpoint_every", 0) or total_steps
  stop_after = config.get("stop_after_steps", 0)  # time-boxed jobs: stop here, resume later
  pending, last, eval_metrics = [], {}, {}
  images_seen, timer = 0, time.perf_counter()
  bar = tqdm(total=total_steps, initial=step, disable=jax.process_index() != 0,
             dynamic_ncols=True, desc="train", file=sys.stdout)

  def flush():
    nonlocal pending, last, images_seen, timer
    if not pending:
      return
    fetched = _fetch(pending)
    pending = []
    for at, metrics in fetched:
      if not all(math.isfinite(v) for v in metrics.values()):
        raise NonFiniteLossError(
            f"Non-finite training metrics at step {at}: {metrics}. Stopped; the last good "
            f"checkpoint (step {ckpt.latest_step()}) is kept in {ckpt.directory}. Lower "
            "config.optimizer.lr or check the data.")
    elapsed = time.perf_counter() - timer
    throughput = images_seen / max(elapsed, 1e-9)
    at, last = fetched[-1]
    last = dict(last, images_per_s=throughput)
    writer.write(at, {f"train/{k}": v for k, v in last.items()})
    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                    img_s=f"{throughput:.1f}")
    images_seen, timer = 0, time.perf_counter()

  def save(metrics=None):
    flush()  # never checkpoint a state whose loss went non-finite
    ckpt.save(step, state, train_iter.get_state(), metrics)

  compiled = None
  try:
    while step < total_steps:
      batch = sharding.global_batch(next(train_iter), data_sharding)
      if compiled is None:  # every process compiled before any runs it
        compiled = sharding.compile_together(train_step, (state, setup.frozen, batch),
                                             "train_step")
      state, metrics = compiled(state, setup.frozen, batch)
      step += 1
      images_seen += config.batch_size
      pending.append((step, metrics))
      bar.update(1)
      if step % log_every == 0 or step == total_steps:
        flush()
      saved = True
      if eval_every > 0 and (step % eval_every == 0 or step == total_steps):
        flush()
        eval_metrics = evaluator.run(setup.eval_params(state["params"]), step=step,
                                     workdir=workdir)
        writer.write(step, eval_metrics)
        log(f"\nstep {step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in eval_metrics.items()
            if k.rsplit("/", 1)[-1] in ("mIoU", "oIoU", "P@0.5")))
        save(eval_metrics)
      elif step % ckpt_every == 0 or step == total_steps:
        save()
      else:
        saved = False
      if step == stop_after and step < total_steps:
        stop.signal_name = "config.stop_after_steps"
      if stop.agreed(step):
        log(f"\n{stop.signal_name}: stopping at step {step} with a checkpoint.")
        if not saved:
          save()
        break
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  return {"step": step, "last": last, "eval": eval_metrics,
          "stopped_by": stop.signal_name}


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: modules import each other)."""
  cli.define_config()
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, overlays. "
                      "An existing run there is resumed.", required=True)


def main(argv) -> None:
  del argv
  config = run_setup.expand_paths(FLAGS.config)
  try:
    result = train(config, run_setup.expand_path(FLAGS.workdir))
  except NonFiniteLossError as error:
    raise SystemExit(f"error: {error}") from None
  if result["stopped_by"]:
    raise cli.Stopped(f"stopped by {result['stopped_by']} at step {result['step']} with a "
                      f"checkpoint; rerun the same command to resume (exit {cli.EXIT_STOPPED}).")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
