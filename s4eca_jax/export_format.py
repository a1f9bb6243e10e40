"""Exported parameter folders: a run's whole parameter tree under PyTorch names, and back.

    DIR/export.json              sidecar: format, source run and checkpoint, the run's config,
                                 and every tensor (file, name, our path, shape, dtype, layout,
                                 trainable, sha256 of its bytes)
    DIR/image_encoder/           Hugging Face folder (config.json + model.safetensors) that
    DIR/text_encoder/              from_pretrained opens: frozen encoder weights, HF names
    DIR/s4eca.safetensors        adapters, textual adapter (or sentence proxy) and decoder
    DIR/tokenizer/               the run's tokenizer files (when it read them from a folder)

With format "npz" the same names go into model.npz / s4eca.npz instead.

Encoder tensors are named and laid out by the loader's rename table run backwards
(models/hf_weights.py). Every other leaf is named after its Flax path, "/" -> ".", leaf
kernel/scale/embedding -> weight, with the visual adapters of image block k moved from
`image_encoder/block_k/adapter/` to `visual_adapters.block_k.`; these are exactly the
state_dict names of s4eca_jax/torch_reference.py. PyTorch layouts: Linear weight
(out, in); Conv weight (O, I, H, W) (depthwise: (C, 1, k, k)); LayerNorm and GroupNorm
weight/bias; other leaves (textual_adapter.queries) as in JAX.

`import_params` reads a folder back into a parameter tree (training's --config.init_from).
Every tensor is checked against the sidecar (checksum), the model (shape) and the name
table (missing or unexpected names); errors name the tensor and the file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from s4eca_jax import partition
from s4eca_jax.models import hf_weights

ENCODERS = ("image_encoder", "text_encoder")
SIDECAR = "export.json"
FORMATS = {"safetensors": ".safetensors", "npz": ".npz"}
TRAINED_STEM = "s4eca"  # the file of every leaf outside the encoders' HF tables
VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.txt", "vocab.json", "merges.txt")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_MOVES = ((r"image_encoder/block_(\d+)/adapter/", r"visual_adapters/block_\1/"),)


class ExportError(hf_weights.CheckpointMismatchError):
  """An export folder that is missing, corrupted or does not fit the model."""


def torch_name(path: str) -> str:
  """Our "/"-joined path of a non-encoder leaf -> its torch_reference state_dict name."""
  for pattern, replacement in _MOVES:
    path = re.sub(pattern, replacement, path)
  *modules, leaf = path.split("/")
  return ".".join(modules + [_LEAF_NAMES.get(leaf, leaf)])


def _layout(path: str, ndim: int) -> str:
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "kernel":
    return {2: "linear weight (out, in)", 4: "conv weight (O, I, H, W)"}.get(ndim, "as in JAX")
  return {"scale": "norm weight", "bias": "bias",
          "embedding": "embedding (num, dim)"}.get(leaf, "as in JAX")


def _sha256(tensor: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(tensor).tobytes()).hexdigest()


def _write_tensors(tensors: dict[str, np.ndarray], file: Path, fmt: str) -> None:
  if fmt == "npz":
    np.savez(file, **tensors)
  else:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    # transformers' from_pretrained refuses safetensors files without this metadata.
    save_file(tensors, str(file), metadata={"format": "pt"})


def write_encoder(module, kind: str, params: Any, folder: str | Path,
                  fmt: str = "safetensors") -> dict[str, tuple[np.ndarray, str | None]]:
  """One encoder as a HF folder (config.json + model weights); adapter leaves are skipped.
  Returns the written {name: (tensor, our path or None)}."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors, _ = hf_weights.export_tensors(module, params, kind)
  _write_tensors({name: t for name, (t, _) in tensors.items()}, folder / f"model{FORMATS[fmt]}",
                 fmt)
  (folder / "config.json").write_text(json.dumps(hf_weights.hf_config(module, kind), indent=1))
  return tensors


def export_params(model, config: ml_collections.ConfigDict, params: Any, out: str | Path, *,
                  fmt: str = "safetensors", source: dict | None = None,
                  tokenizer_folder: str | Path | None = None) -> dict:
  """Writes `params` (the full tree: frozen and trainable) to the folder `out`.

  source: what the sidecar records as the origin (workdir, checkpoint step...). Returns
  the sidecar dict.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r}; expected one of {sorted(FORMATS)}.")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  params = jax.device_get(params)
  trainable = partition.flatten(partition.trainable_mask(params, config.trainable))
  written, files, rest = {}, {}, {}
  for name in ENCODERS:
    kind, module = config[name].kind, getattr(model, name)
    file = f"{name}/model{FORMATS[fmt]}"
    tensors = write_encoder(module, kind, params[name], out / name, fmt)
    written[file] = {n: (t, path and f"{name}/{path}") for n, (t, path) in tensors.items()}
    files[file] = dict(kind=kind, hf_class=hf_weights.hf_config(module, kind)["architectures"][0])
    if kind == "bert" and not module.use_pooler:
      files[file]["hf_kwargs"] = {"add_pooling_layer": False}
    covered = {path for _, path in tensors.values()}
    rest.update({f"{name}/{path}": leaf for path, leaf in partition.flatten(params[name]).items()
                 if path not in covered})
  for top, subtree in params.items():
    if top not in ENCODERS:
      rest.update({f"{top}/{path}": leaf for path, leaf in partition.flatten(subtree).items()})
  file = TRAINED_STEM + FORMATS[fmt]
  written[file] = {torch_name(path): (hf_weights.to_torch_layout(path, np.asarray(leaf)), path)
                   for path, leaf in rest.items()}
  _write_tensors({n: t for n, (t, _) in written[file].items()}, out / file, fmt)
  files[file] = {}

  entries = []
  for file, tensors in written.items():
    files[file]["tensors"] = len(tensors)
    for name, (tensor, path) in tensors.items():
      entries.append(dict(
          file=file, name=name, param=path, shape=list(tensor.shape), dtype=str(tensor.dtype),
          layout="placeholder (zeros)" if path is None else _layout(path, tensor.ndim),
          trainable=bool(path and trainable[path]), sha256=_sha256(tensor)))
  if tokenizer_folder and Path(tokenizer_folder).is_dir():
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in _TOKENIZER_FILES:
      if (Path(tokenizer_folder) / name).exists():
        shutil.copy(Path(tokenizer_folder) / name, out / "tokenizer" / name)
  sidecar = dict(s4eca_jax_export=VERSION, format=fmt, source=source or {},
                 config=json.loads(config.to_json()), files=files, tensors=entries)
  (out / SIDECAR).write_text(json.dumps(sidecar, indent=1))
  return sidecar


def read_sidecar(folder: str | Path) -> dict:
  path = Path(folder) / SIDECAR
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {folder} is not an export folder. Write one "
                            "with python -m s4eca_jax.export --workdir W --out DIR.")
  return json.loads(path.read_text())


def read_files(folder: str | Path, sidecar: dict | None = None
               ) -> dict[str, dict[str, np.ndarray]]:
  """{relative file: {name: tensor}} of an export, each tensor checked against its sha256."""
  folder = Path(folder)
  sidecar = sidecar or read_sidecar(folder)
  files = {file: hf_weights.read_tensor_file(folder / file) for file in sidecar["files"]}
  for entry in sidecar["tensors"]:
    tensor = files[entry["file"]].get(entry["name"])
    if tensor is not None and _sha256(tensor) != entry["sha256"]:
      raise ExportError(
          f"Tensor {entry['name']} in {folder / entry['file']} does not match the checksum "
          f"in {SIDECAR} (shape {tuple(tensor.shape)} {tensor.dtype}, recorded "
          f"{tuple(entry['shape'])} {entry['dtype']}): the file is corrupted or was replaced. "
          "Export it again.")
  return files


def encoders_in(folder: str | Path) -> tuple[str, ...]:
  """The encoders an export folder holds (their frozen weights can come from it)."""
  sidecar = read_sidecar(folder)
  return tuple(name for name in ENCODERS
               if any(f.startswith(f"{name}/") for f in sidecar["files"]))


def import_params(model, config: ml_collections.ConfigDict, params: Any,
                  folder: str | Path) -> tuple[Any, list[str]]:
  """`params` with every leaf the export in `folder` holds replaced by its value.

  The run's encoder kinds must be those of the export. Returns (params, report lines).
  """
  folder = Path(folder)
  sidecar = read_sidecar(folder)
  tensors = read_files(folder, sidecar)
  suffix = FORMATS[sidecar["format"]]
  params, reports = dict(params), []
  trained = {}
  for name in ENCODERS:
    kind, exported_kind = config[name].kind, sidecar["config"][name]["kind"]
    if kind != exported_kind:
      raise ExportError(f"{folder} holds a {exported_kind} {name} but the config's is {kind}; "
                        f"set config.{name}.kind={exported_kind!r} or export a matching run.")
    file = f"{name}/model{suffix}"
    flat = partition.flatten(params[name])
    if file in tensors:
      loaded, report = hf_weights.load_params(getattr(model, name), folder / name, kind,
                                              params=params[name], tensors=tensors[file])
      params[name] = loaded
      reports.append(f"{name}: {report.summary()} from {folder / name}")
      flat = {p: flat[p] for p in report.kept}
    else:
      flat = {p: v for p, v in flat.items() if hf_weights.export_name(kind, p) is None}
    trained.update({f"{name}/{p}": v for p, v in flat.items()})
  for top, subtree in params.items():
    if top not in ENCODERS:
      trained.update({f"{top}/{p}": v for p, v in partition.flatten(subtree).items()})

  file = TRAINED_STEM + suffix
  stored = tensors[file]
  by_name = {torch_name(path): path for path in trained}
  missing = [f"{n} (for {p}, shape {tuple(trained[p].shape)})"
             for n, p in by_name.items() if n not in stored]
  unexpected = sorted(set(stored) - set(by_name))
  mis_shaped, out = [], {}
  for name, path in by_name.items():
    if name not in stored:
      continue
    target = trained[path]
    value = hf_weights.to_flax_layout(path, stored[name], target.shape)
    if value.shape != tuple(target.shape) or not np.issubdtype(value.dtype, np.floating):
      mis_shaped.append(f"{name}: file {tuple(stored[name].shape)} {stored[name].dtype} vs "
                        f"model {tuple(target.shape)} {target.dtype} (for {path})")
      continue
    out[path] = np.asarray(value, dtype=target.dtype)
  problems = [f"{title}:\n  " + "\n  ".join(items) for title, items in (
      ("missing tensors", missing), ("mis-shaped tensors", mis_shaped),
      ("unexpected tensors", unexpected)) if items]
  if problems:
    raise ExportError(f"{folder / file} does not fit the model of this config: "
                      + "\n".join(problems))
  flat = partition.flatten(params)
  flat.update(out)
  reports.append(f"{len(out)} adapter and decoder tensors from {folder / file}")
  return partition.unflatten(flat), reports
