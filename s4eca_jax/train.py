"""The S4ECA trainer: one canonical training loop for every config and every mesh.

    python -m s4eca_jax.train --config configs/rrsisd.py --workdir W [--config.batch_size=64]
    python -m s4eca_jax.train --config configs/rrsisd.py:variant=tiny --workdir W

Phases: config -> mesh -> data -> model + frozen encoder weights -> sharding -> train loop
(with periodic evaluation) -> final evaluation. Everything a run writes lands in W:
config.json, checkpoints/ (orbax: trainable params, optimizer state, step, RNG, data
iterator state; never the frozen encoders), metrics.jsonl, tb/ (TensorBoard events) and
overlays/ (PNG grids at each evaluation). A run resumes from its newest checkpoint.
SIGTERM/SIGINT save a checkpoint and stop; a non-finite loss stops the run with the last
good checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from s4eca_jax import checkpoint, logs, losses, partition, sharding, tokenize
from s4eca_jax.data import pipeline
from s4eca_jax.models import s4eca


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf."""


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# --------------------------------------------------------------------------------------
# Config and workdir
# --------------------------------------------------------------------------------------


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json(indent=1))


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir} the --workdir of a training run "
                            "(python -m s4eca_jax.train --workdir ...)?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def tokenizer_folder(config: ml_collections.ConfigDict) -> str:
  folder = config.get("tokenizer") or config.text_encoder.checkpoint
  if not folder:
    raise ValueError("No tokenizer: set config.tokenizer (a folder with tokenizer.json or "
                     "vocab files) or config.text_encoder.checkpoint.")
  return folder


# --------------------------------------------------------------------------------------
# Model, parameters and their shardings
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  """What the step functions close over and what the loop carries."""

  model: s4eca.S4ECA
  mesh: jax.sharding.Mesh
  frozen: Any  # frozen encoder params (sharded), closed over by the steps
  state: dict  # {"params": trainable, "opt_state", "step", "rng"}
  state_shardings: Any
  frozen_shardings: Any
  tx: optax.GradientTransformation | None
  schedule: Callable[[int], Any] | None

  def restore(self, ckpt: checkpoint.Checkpointer, step: int) -> tuple[dict, Any]:
    """(state, data iterator state) of checkpoint `step`, placed like `self.state`."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.state, self.state_shardings)
    return ckpt.restore(step, abstract)


def create_params(config: ml_collections.ConfigDict, model: s4eca.S4ECA,
                  mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """Initialised params created already sharded, frozen encoders loaded. -> (params, shardings)."""
  inputs = s4eca.example_inputs(config)
  init = lambda rng: model.init(rng, *inputs)["params"]
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.param_shardings(abstract, mesh, config.get("fsdp_min_size", 2**18))
  params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  params, reports = s4eca.load_encoder_weights(model, config, params)
  for line in reports:
    log(f"  {line}")
  return jax.device_put(params, shardings), shardings


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          total_steps: int | None) -> Setup:
  """Model, frozen/trainable split and (when total_steps is given) optimizer state."""
  model = s4eca.build_model(config)
  params, shardings = create_params(config, model, mesh)
  mask = partition.trainable_mask(params, config.trainable)
  log(partition.describe(params, config.trainable))
  trainable, frozen = partition.split(params, mask)
  trainable_shardings, frozen_shardings = partition.split(shardings, mask)
  tx = schedule = None
  state = {"params": trainable, "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.PRNGKey(config.seed)}
  state_shardings = {"params": trainable_shardings, "step": sharding.replicated(mesh),
                     "rng": sharding.replicated(mesh)}
  if total_steps is not None:
    tx, schedule = partition.make_optimizer(config.optimizer, total_steps)
    opt_abstract = jax.eval_shape(tx.init, trainable)
    # Optimizer moments are sharded like the params they follow.
    opt_shardings = sharding.param_shardings(opt_abstract, mesh,
                                             config.get("fsdp_min_size", 2**18))
    state["opt_state"] = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
    state_shardings["opt_state"] = opt_shardings
  state = jax.device_put(state, state_shardings)
  return Setup(model, mesh, frozen, state, state_shardings, frozen_shardings, tx, schedule)


# --------------------------------------------------------------------------------------
# Step functions
# --------------------------------------------------------------------------------------


def make_train_step(setup: Setup, config: ml_collections.ConfigDict):
  """jit(train_step)(state, frozen, batch) -> (state, metrics); state is donated."""
  model, tx, schedule = setup.model, setup.tx, setup.schedule

  def train_step(state, frozen, batch):
    def loss_fn(trainable):
      params = partition.merge(trainable, frozen)
      out = model.apply({"params": params}, batch["image"], batch["input_ids"],
                        batch["attention_mask"])
      return losses.segmentation_loss(out["logits"], batch["mask"], None, **config.loss)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": jax.random.fold_in(state["rng"], state["step"])}
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state["step"]), **parts}
    return new_state, metrics

  data = sharding.batch_sharding(setup.mesh)
  return jax.jit(train_step,
                 in_shardings=(setup.state_shardings, setup.frozen_shardings, data),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=(0,))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def per_process_batch(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  if global_batch % mesh.size:
    raise ValueError(f"batch size {global_batch} is not divisible by the {mesh.size} devices "
                     f"of the mesh {dict(mesh.shape)}; change config.batch_size.")
  return global_batch // jax.process_count()


def make_train_data(config, tokenizer, mesh):
  if not config.data_dir:
    raise ValueError("config.data_dir is not set: pass --config.data_dir=DIR, the TFDS data "
                     "dir that `python -m s4eca_jax.prepare ... --data_dir DIR` wrote.")
  source = pipeline.open_split(config.dataset, "train", config.data_dir)
  batch_size = per_process_batch(config.batch_size, mesh)
  steps_per_epoch = len(source) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(source)} train examples cannot fill one batch of "
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

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
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


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _fetch(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  return [(step, {k: float(v) for k, v in jax.device_get(m).items()}) for step, m in pending]


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains (or resumes) a run in `workdir`.

  Returns {"step", "last" (train metrics), "eval" (last evaluation), "stopped_by"}. A stop
  request (SIGTERM/SIGINT) at any time, set-up included, ends the run at the next step
  boundary with a checkpoint.
  """
  with StopRequest() as stop:
    return _train(config, Path(workdir), stop)


def _train(config: ml_collections.ConfigDict, workdir: Path, stop: StopRequest):
  from s4eca_jax import evaluate  # pylint: disable=g-import-not-at-top  # evaluate imports us

  # ---------------------------------------------------------------- config
  sharding.initialize_distributed(config.get("distributed", False))
  save_config(config, workdir)
  log(f"workdir {workdir}: {jax.process_count()} process(es), {jax.device_count()} "
      f"{jax.default_backend()} device(s)")

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  log(f"mesh {dict(mesh.shape)}")

  # ---------------------------------------------------------------- data
  tokenizer = tokenize.load_tokenizer(tokenizer_folder(config), config.max_length)
  train_iter, steps_per_epoch = make_train_data(config, tokenizer, mesh)
  total_steps = total_steps_of(config, steps_per_epoch)
  log(f"data {config.dataset}: {steps_per_epoch} steps/epoch, {total_steps} steps")

  # ---------------------------------------------------------------- model, sharding
  setup = build(config, mesh, total_steps)
  train_step = make_train_step(setup, config)
  data_sharding = sharding.batch_sharding(mesh)
  evaluator = None
  if config.get("eval_every", 0) >= 0:
    evaluator = evaluate.Evaluator(setup, config, tokenizer, split=config.get("eval_split", "val"))

  # ---------------------------------------------------------------- resume
  ckpt = checkpoint.Checkpointer(workdir, keep=config.get("keep_checkpoints", 3),
                                 best_metric="val/oIoU")
  state = setup.state
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = setup.restore(ckpt, latest)
    train_iter.set_state(data_state)
    log(f"resumed from step {latest}")
  step = int(jax.device_get(state["step"]))

  # ---------------------------------------------------------------- loop
  writer = logs.MetricWriter(workdir)
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

  try:
    while step < total_steps:
      batch = sharding.global_batch(next(train_iter), data_sharding)
      state, metrics = train_step(state, setup.frozen, batch)
      step += 1
      images_seen += config.batch_size
      pending.append((step, metrics))
      bar.update(1)
      if step % log_every == 0 or step == total_steps:
        flush()
      saved = True
      if eval_every > 0 and (step % eval_every == 0 or step == total_steps):
        flush()
        eval_metrics = evaluator.run(state["params"], step=step, workdir=workdir)
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
      if stop:
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


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  config = flags.FLAGS.config
  try:
    result = train(config, flags.FLAGS.workdir)
  except NonFiniteLossError as error:
    raise SystemExit(f"error: {error}") from None
  if result["stopped_by"]:
    raise SystemExit(f"stopped by {result['stopped_by']} at step {result['step']}; rerun "
                     "the same command to resume.")


def run():
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/rrsisd.py or configs/rrsisd.py:variant=tiny; "
      "override fields with --config.FIELD=VALUE.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, overlays. "
                      "An existing run there is resumed.")
  if any(arg in ("-h", "--help", "-?") for arg in sys.argv[1:]):
    # absl's own --help exits with status 1; a help request is not an error.
    print(__doc__)
    print(flags.FLAGS.main_module_help())
    sys.exit(0)
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
