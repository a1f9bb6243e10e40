"""The run set-up that train, evaluate, predict, export, demo, bench and the tests share.

    config = run_setup.config_from_file("configs/rrsisd.py:variant=tiny")  # by path
    mesh = sharding.make_mesh(config.mesh)
    setup = run_setup.build(config, mesh, total_steps)   # model, params sharded, split
    state, data_state = setup.restore(ckpt, step)         # into the run's shapes/shardings

Config I/O (a workdir's `config.json`; `~` and environment variables expanded in path
fields), the model with its parameters created already sharded and the frozen encoders
loaded, the trainable/frozen split, the optimizer state, the jitted train step (the
trainer's, also compiled by benchmarks), restoring a checkpoint into the run's shapes and
shardings, the tokenizer of a config, and the per-process batch size.
Nothing here imports a command module: they all sit on top of this one.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from s4eca_jax import (checkpoint, cli, export_format, losses, optimizer, partition, sharding,
                       text_tokenizer)
from s4eca_jax.models import s4eca

# Config fields that hold paths: `~` and $VARIABLES are expanded when a config is loaded.
PATH_FIELDS = ("data_dir", "tokenizer", "init_from", "image_encoder.checkpoint",
               "text_encoder.checkpoint")

# Fields a rerun of a workdir may change: the schedule, the logging and where the run
# executes. Every other field changes the parameters' shapes, the optimizer state, the
# model or the data, so a resume with a different value would not continue the same run.
SCHEDULE_FIELDS = frozenset((
    "total_steps", "num_epochs", "optimizer.lr", "optimizer.warmup_steps",
    "optimizer.end_lr_ratio", "optimizer.schedule", "optimizer.step_boundaries",
    "optimizer.step_decay", "log_every", "eval_every", "eval_split", "eval_batch_size",
    "checkpoint_every", "keep_checkpoints", "stop_after_steps", "data_workers", "mesh",
    "fsdp_min_size", "distributed", "coordinator_address", "num_processes", "process_id",
    "data_dir", "mask_probability",
    # Performance levers: same parameters and data, another way to compute them.
    "frozen_dtype", "donate_state", "model.attention", "model.fused_qkv",
    "image_encoder.remat", "text_encoder.remat", "model.visual_adapter.depthwise"))
HISTORY = "run_history.jsonl"


class ConfigError(cli.UsageError):
  """A config value or a workdir's stored config that the user must fix (one line)."""


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


def expand_path(path: str | os.PathLike | None) -> str | None:
  if path is None:
    return None
  return os.path.expandvars(os.path.expanduser(os.fspath(path)))


def expand_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`~` and $VARIABLES expanded in the PATH_FIELDS that the config has (in place)."""
  with config.unlocked():
    for field in PATH_FIELDS:
      *parents, name = field.split(".")
      node = config
      for parent in parents:
        node = node.get(parent)
        if node is None:
          break
      if node is not None and name in node and isinstance(node[name], str):
        node[name] = expand_path(node[name])
  return config


def config_module(spec: str | os.PathLike) -> tuple[Any, str]:
  """(module, arg) of a config file "path/to/file.py[:arg]", loaded by path: any working
  directory, nothing of the repository on sys.path."""
  path, _, arg = os.fspath(spec).partition(":")
  path = Path(expand_path(path))
  if not path.is_file():
    raise FileNotFoundError(f"Config file {path} does not exist.")
  module_spec = importlib.util.spec_from_file_location(f"_s4eca_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, arg


def config_from_file(spec: str | os.PathLike) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file in "path/to/file.py[:arg]", as the commands'
  --config flag loads it."""
  module, arg = config_module(spec)
  config = module.get_config(arg) if arg else module.get_config()
  return expand_paths(config)


def save_config(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
  if jax.process_index() == 0:
    workdir = epath.Path(workdir)  # local or gs://
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json(indent=1))


def _read_config_json(path: Path) -> dict:
  try:
    stored = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as error:
    raise ConfigError(f"{path} is not valid JSON ({error}); restore it from the run's "
                      "copy, or use a new --workdir.") from None
  if not isinstance(stored, dict):
    raise ConfigError(f"{path} holds a {type(stored).__name__}, not a config object.")
  return stored


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise ConfigError(f"{path} not found: is {workdir} the --workdir of a training run "
                      "(python -m s4eca_jax.train --workdir ...)?")
  return expand_paths(ml_collections.ConfigDict(_read_config_json(path)))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError for values no run can use (before anything is built or written)."""
  at_least_one = ("batch_size", "eval_batch_size", "log_every", "keep_checkpoints")
  for field in at_least_one:
    value = config.get(field)
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ConfigError(f"config.{field}={value!r}: must be an integer >= 1.")
  if config.get("total_steps") is not None and config.total_steps < 1:
    raise ConfigError(f"config.total_steps={config.total_steps}: must be >= 1 (or unset "
                      "to train config.num_epochs epochs).")
  if config.get("total_steps") is None and not config.get("num_epochs", 0) > 0:
    raise ConfigError(f"config.num_epochs={config.get('num_epochs')!r} with total_steps "
                      "unset: set one of them above 0.")
  _check_folders(config)


def _check_folders(config: ml_collections.ConfigDict) -> None:
  """The tokenizer and encoder folders a run reads, checked before the run writes its
  config.json (whose non-schedule fields a rerun may not change)."""
  tokenizer_folder(config)  # raises without one
  for field in ("tokenizer", "image_encoder.checkpoint", "text_encoder.checkpoint"):
    section, _, name = field.rpartition(".")
    folder = (config[section] if section else config).get(name)
    if folder and "://" not in str(folder) and not Path(folder).is_dir():
      raise ConfigError(f"config.{field}={folder!r}: no such folder.")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_differences(stored: dict, config: ml_collections.ConfigDict
                       ) -> dict[str, tuple[Any, Any]]:
  """field -> (stored value, this config's value), "<absent>" where a field is missing."""
  old = _flatten(stored)
  new = _flatten(json.loads(config.to_json()))  # tuples as lists, like the stored JSON
  return {field: (old.get(field, "<absent>"), new.get(field, "<absent>"))
          for field in sorted(set(old) | set(new)) if old.get(field, "<absent>") !=
          new.get(field, "<absent>")}


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
  """Writes config.json in a new workdir; in an existing one compares against it.

  config.json is written once, by the run that creates the workdir. A rerun may change
  only SCHEDULE_FIELDS (printed, and recorded in run_history.jsonl); any other difference
  raises ConfigError listing them, with config.json left as it was.
  """
  validate_config(config)
  workdir = epath.Path(workdir)
  path = workdir / "config.json"
  if not path.exists():
    save_config(config, workdir)
    _record_history(workdir, "created", {})
    return
  changed = config_differences(_read_config_json(path), config)
  refused = {k: v for k, v in changed.items() if k not in SCHEDULE_FIELDS}
  if refused:
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    raise ConfigError(
        f"{workdir} holds a run with another config ({path}); these fields would change "
        f"the parameters, the model or the data: {listed}. Pass a new --workdir to start "
        "a fresh run, or rerun with the stored values (only schedule fields may change: "
        f"{', '.join(sorted(SCHEDULE_FIELDS))}).")
  for field, (old, new) in changed.items():
    log(f"notice: config.{field} changed from {old!r} to {new!r} since this workdir was "
        f"created (recorded in {workdir / HISTORY}; config.json keeps the original).")
  _record_history(workdir, "rerun", changed)


def _record_history(workdir: epath.Path, event: str, changed: dict) -> None:
  if jax.process_index() == 0:
    row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "event": event, "changed": {k: list(v) for k, v in changed.items()}}
    with (workdir / HISTORY).open("a") as f:
      f.write(json.dumps(row) + "\n")


def tokenizer_folder(config: ml_collections.ConfigDict) -> str:
  folder = config.get("tokenizer") or config.text_encoder.checkpoint
  if not folder:
    raise ConfigError("No tokenizer: set config.tokenizer (a folder with tokenizer.json or "
                      "vocab files) or config.text_encoder.checkpoint.")
  return folder


def load_tokenizer(config: ml_collections.ConfigDict) -> text_tokenizer.TextTokenizer:
  return text_tokenizer.load_tokenizer(tokenizer_folder(config), config.max_length)


def per_process_batch(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  if global_batch < 1:
    raise ValueError(f"batch size {global_batch}: must be at least 1.")
  if global_batch % mesh.size:
    raise ValueError(f"batch size {global_batch} is not divisible by the {mesh.size} devices "
                     f"of the mesh {dict(mesh.shape)}; change config.batch_size.")
  return global_batch // jax.process_count()


def best_metric(config: ml_collections.ConfigDict) -> str:
  """The metric that picks the best checkpoint: oIoU on the split evaluated in training."""
  return f"{config.get('eval_split', 'val')}/oIoU"


# --------------------------------------------------------------------------------------
# Model, parameters and their shardings
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  """What the step functions close over and what the loop carries."""

  model: s4eca.S4ECA
  mesh: jax.sharding.Mesh
  frozen: Any  # frozen encoder params (sharded), passed to the steps as an argument
  state: dict  # {"params": trainable, "opt_state", "step", "rng"}
  state_shardings: Any
  frozen_shardings: Any
  tx: optax.GradientTransformation | None
  schedule: Callable[[int], Any] | None

  def restore(self, ckpt: checkpoint.Checkpointer, step: int) -> tuple[dict, Any]:
    """(state, data iterator state) of checkpoint `step`, placed like `self.state`."""
    return ckpt.restore(step, self.abstract_state())

  def restore_newest(self, ckpt: checkpoint.Checkpointer) -> tuple[int, dict, Any] | None:
    """(step, state, data state) of the newest intact checkpoint, falling back past
    damaged ones with a notice; None when there is none."""
    return ckpt.restore_newest_intact(self.abstract_state(),
                                      notice=lambda line: log(f"notice: {line}"))

  def abstract_state(self) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self.state, self.state_shardings)

  # What evaluators and predictors take: params {"trainable", "frozen"} and a function.
  def eval_params(self, trainable: Any) -> dict:
    return {"trainable": trainable, "frozen": self.frozen}

  def eval_param_shardings(self) -> dict:
    return {"trainable": self.state_shardings["params"], "frozen": self.frozen_shardings}

  def predict_fn(self) -> Callable[[dict, dict], jax.Array]:
    """(params {"trainable", "frozen"}, batch) -> float32 logits (B, S, S)."""

    def predict(params, batch):
      merged = partition.merge(params["trainable"], params["frozen"])
      return forward(self, merged, batch)["logits"].astype(jnp.float32)
    return predict


def create_params(config: ml_collections.ConfigDict, model: s4eca.S4ECA,
                  mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """Initialised params created already sharded, frozen encoders loaded, then every leaf an
  export holds when config.init_from names one. -> (params, shardings)."""
  inputs = s4eca.example_inputs(config)
  init = lambda rng: model.init(rng, *inputs)["params"]
  shardings = sharding.param_shardings(s4eca.abstract_params(config, model), mesh,
                                       config.get("fsdp_min_size", 2**18))
  params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  init_from = config.get("init_from")
  params, reports = s4eca.load_encoder_weights(
      model, config, params, skip=export_format.encoders_in(init_from) if init_from else ())
  if init_from:
    params, more = export_format.import_params(model, config, params, init_from)
    reports += more
  for line in reports:
    log(f"  {line}")
  # Loaded weights come from the host: device_put compares them across processes with
  # device collectives (see build), so every process must be here, however long its
  # loading took.
  sharding.sync_processes("params")
  return jax.device_put(params, shardings), shardings


def stand_in_params(config: ml_collections.ConfigDict, model: s4eca.S4ECA,
                    mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """Weights of the model's shapes made on the host, not by the model's init: norm scales
  1, biases 0, every other leaf normal / sqrt(fan-in). For benchmarks, where values do not
  matter: the init program of the full model draws each leaf with its own unrolled
  threefry (rrsisd: 64 s to compile on a 2-core CPU, against 43 s for the train step).
  -> (params, shardings)."""
  abstract, shardings = abstract_sharded_params(config, model, mesh)
  params = stand_in_values(abstract, config.seed)
  sharding.sync_processes("params")  # device_put below: see create_params
  return jax.device_put(params, shardings), shardings


def stand_in_values(abstract: Any, seed: int) -> Any:
  """Host arrays for a tree of shapes: norm scales 1, biases 0, every other leaf
  normal / sqrt(fan-in)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "bias"):
      return np.full(x.shape, 1.0 if name == "scale" else 0.0, x.dtype)
    fan_in = int(np.prod(x.shape[:-1])) or 1
    return (rng.standard_normal(x.shape, np.float32) / np.sqrt(fan_in)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def abstract_sharded_params(config: ml_collections.ConfigDict, model: s4eca.S4ECA,
                            mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """Shapes of the params (ShapeDtypeStructs with their shardings): no weights made."""
  abstract = s4eca.abstract_params(config, model)
  shardings = sharding.param_shardings(abstract, mesh, config.get("fsdp_min_size", 2**18))
  return with_shardings(abstract, shardings), shardings


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """A tree of shapes as jax.ShapeDtypeStructs placed by `shardings` (lowering inputs)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def frozen_dtype(config: ml_collections.ConfigDict, backend: str | None = None):
  """The dtype the frozen encoder weights are stored in: config.frozen_dtype, whose "auto"
  is the compute dtype (bf16 on GPU/TPU, f32 on CPU; s4eca.compute_dtype).

  Frozen weights are only read, and every matmul casts them to the compute dtype anyway:
  stored in it, they take half the memory and no conversion per step. rrsisd train step,
  8 images per chip, v5e (AOT, the compiler's cycle estimates): 42.6 against 44.9 ms; one
  H200 (batch 32): 395.8 against 383.0 images/s, peak 12.36 against 14.65 GiB.
  """
  name = config.get("frozen_dtype", "auto")
  if name == "auto":
    return jnp.dtype(s4eca.compute_dtype(config.model.compute_dtype, backend))
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config.frozen_dtype={name!r}; use 'auto', 'float32' or 'bfloat16'.")
  return jnp.dtype(name)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          total_steps: int | None, *, abstract: bool = False,
          backend: str | None = None, stand_in: bool = False) -> Setup:
  """Model, frozen/trainable split and (when total_steps is given) optimizer state.

  abstract=True: params and state are ShapeDtypeStructs (for ahead-of-time compilation,
  s4eca_jax.aot); backend: the platform compiled for (see s4eca.build_model);
  stand_in=True: host-made weights of the right shapes (stand_in_params, benchmarks).
  """
  model = s4eca.build_model(config, backend)
  make_params = (abstract_sharded_params if abstract else
                 stand_in_params if stand_in else create_params)
  params, shardings = make_params(config, model, mesh)
  mask = partition.trainable_mask(params, config.trainable)
  if not abstract:
    log(partition.describe(params, config.trainable))
  trainable, frozen = partition.split(params, mask)
  trainable_shardings, frozen_shardings = partition.split(shardings, mask)
  dtype = frozen_dtype(config, backend)
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
  frozen = (with_shardings(jax.eval_shape(cast, frozen), frozen_shardings) if abstract
            else jax.jit(cast, out_shardings=frozen_shardings)(frozen))
  tx = schedule = None
  state = {"params": trainable, "step": jax.ShapeDtypeStruct((), jnp.int32),
           "rng": jax.eval_shape(jax.random.PRNGKey, 0)}
  state_shardings = {"params": trainable_shardings, "step": sharding.replicated(mesh),
                     "rng": sharding.replicated(mesh)}
  if total_steps is not None:
    tx, schedule = optimizer.make_optimizer(config.optimizer, total_steps)
    opt_abstract = jax.eval_shape(tx.init, trainable)
    # Optimizer moments are sharded like the params they follow.
    opt_shardings = sharding.param_shardings(opt_abstract, mesh,
                                             config.get("fsdp_min_size", 2**18))
    state["opt_state"] = opt_abstract if abstract else jax.jit(
        tx.init, out_shardings=opt_shardings)(trainable)
    state_shardings["opt_state"] = opt_shardings
  if abstract:
    state = with_shardings(state, state_shardings)
  else:
    # Made by a program on the devices, not device_put from the host: with several
    # processes, device_put of a host value checks that every process holds the same
    # value with a device collective, and on CPU its first one (a gloo context) waits
    # only 30 s for a peer that is still setting up.
    fresh = lambda: {"step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(config.seed)}
    state.update(jax.jit(fresh, out_shardings={k: state_shardings[k] for k in ("step", "rng")})())
    state = jax.device_put(state, state_shardings)
  return Setup(model, mesh, frozen, state, state_shardings, frozen_shardings, tx, schedule)


# --------------------------------------------------------------------------------------
# Step functions
# --------------------------------------------------------------------------------------


def forward(setup: Setup, params: Any, batch: dict) -> dict:
  """The model on a batch, traced under the mesh: Pallas attention maps itself over it."""
  with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):
    return setup.model.apply({"params": params}, batch["image"], batch["input_ids"],
                             batch["attention_mask"])


def make_train_step(setup: Setup, config: ml_collections.ConfigDict):
  """jit(train_step)(state, frozen, batch) -> (state, metrics); the state is donated
  unless config.donate_state is False (its buffers are then kept beside the new ones)."""
  tx, schedule = setup.tx, setup.schedule

  def train_step(state, frozen, batch):
    def loss_fn(trainable):
      out = forward(setup, partition.merge(trainable, frozen), batch)
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
                 donate_argnums=(0,) if config.get("donate_state", True) else ())


# --------------------------------------------------------------------------------------
# A trained run: its config, set-up and a checkpoint's trainable params
# --------------------------------------------------------------------------------------


def load_run(workdir: str | Path, overrides: dict[str, Any] | None = None):
  """(config, setup) of a trained workdir, config fields overridden where not None."""
  config = load_config(workdir)
  with config.unlocked():
    for key, value in (overrides or {}).items():
      if value is not None:
        config[key] = value
  sharding.initialize_distributed(config)  # evaluate / predict on many hosts, as trained
  mesh = sharding.make_mesh(config.mesh)
  return config, build(config, mesh, total_steps=1)


def checkpoint_step(workdir: str | Path, config: ml_collections.ConfigDict, which: str) -> int:
  """The step that `which` ("best", "latest" or a step number) names in workdir; checked
  before any model is built. ConfigError names the choices."""
  ckpt = checkpoint.Checkpointer(workdir, best_metric=best_metric(config))
  try:
    steps = sorted(ckpt.all_steps())
    if not steps:
      raise ConfigError(f"No checkpoint in {ckpt.directory}: train first "
                        "(python -m s4eca_jax.train --workdir ...).")
    if which == "best":
      return ckpt.best_step() or ckpt.latest_step()
    if which == "latest":
      return ckpt.latest_step()
    try:
      step = int(which)
    except (TypeError, ValueError):
      raise ConfigError(f"--checkpoint={which!r}: use best, latest or a step number "
                        f"(available: {steps}).") from None
    if step not in steps:
      raise ConfigError(f"--checkpoint={which!r}: no checkpoint for step {step} in "
                        f"{ckpt.directory}; available: {steps}.")
    return step
  finally:
    ckpt.close()


def restore_trainable(setup: Setup, config: ml_collections.ConfigDict, workdir: str | Path,
                      which: str) -> tuple[Any, int]:
  """Trainable params of the `which` ("best", "latest" or a step) checkpoint in workdir."""
  step = checkpoint_step(workdir, config, which)
  ckpt = checkpoint.Checkpointer(workdir, best_metric=best_metric(config))
  try:
    state, _ = setup.restore(ckpt, step)
  finally:
    ckpt.close()
  return state["params"], step
