"""Hugging Face checkpoint folders -> our Flax encoders (config, weights, tokenizer).

    pretrained = load_pretrained("/ckpt/dinov2-with-registers-base")
    out = pretrained.module.apply({"params": pretrained.params}, images)

A folder holds config.json and model.safetensors (sharded *.safetensors, model.npz, or a
torch .bin when torch is installed). Supported: CLIPModel / CLIPVisionModel /
CLIPTextModel(+WithProjection) (pick the tower with `tower=`), Dinov2Model,
Dinov2WithRegistersModel, BertModel (MiniLM...).

Conversion is a table of renames per kind (regex on our parameter path -> HF tensor names,
several spellings where transformers versions differ) plus per-kind transforms: Linear
(out, in) -> (in, out), Conv OIHW -> HWIO, LayerNorm weight -> scale, and reshapes of
embeddings stored with fewer leading axes. Targets come from `jax.eval_shape` of the
module, so every tensor is checked for presence and shape before anything is built.
Leaves with no rule (adapters inserted through the encoder hooks) are taken from the
`params` the caller passes.

The same table runs backwards for export (`export_tensors`, `hf_config`): each leaf goes
to the first (transformers 5) name of its rule with the inverse transform, plus zero
placeholders for HF tensors we never use (DINOv2's mask_token), so that the HF classes
load the folder with strict=True. export_format.py writes whole runs with it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from s4eca_jax import text_tokenizer
from s4eca_jax.models import layers, text, vit

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

class Rule(NamedTuple):
  """One rename: our "/"-joined path (regex) -> HF names relative to the tower prefix.

  Named groups: k = our 1-based block (HF index i = k - 1), leaf = Flax leaf name, others
  copied verbatim. The first name is what transformers 5 writes (and what export writes);
  later ones are older spellings the loader also reads. A name starting with ^ lies outside
  the tower prefix. squeeze: HF stores the tensor without our leading unit axes.
  """

  pattern: str
  names: list[str]
  squeeze: bool = False


_DINOV2 = [
    Rule(r"patch_embed/(?P<leaf>kernel|bias)", ["embeddings.patch_embeddings.projection.{leaf}"]),
    Rule(r"cls_token", ["embeddings.cls_token"]),
    Rule(r"pos_embedding", ["embeddings.position_embeddings"]),
    Rule(r"register_tokens", ["embeddings.register_tokens"]),
    Rule(r"block_(?P<k>\d+)/(?P<n>norm1|norm2)/(?P<leaf>\w+)", ["encoder.layer.{i}.{n}.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/attn/(?P<p>query|key|value)/(?P<leaf>\w+)",
         ["encoder.layer.{i}.attention.{p_proj}.{leaf}",
          "encoder.layer.{i}.attention.attention.{p}.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/attn/out/(?P<leaf>\w+)",
         ["encoder.layer.{i}.attention.o_proj.{leaf}",
          "encoder.layer.{i}.attention.output.dense.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/ls(?P<j>[12])/lambda1", ["encoder.layer.{i}.layer_scale{j}.lambda1"]),
    Rule(r"block_(?P<k>\d+)/mlp/(?P<fc>fc1|fc2)/(?P<leaf>\w+)",
         ["encoder.layer.{i}.mlp.{fc}.{leaf}"]),
    Rule(r"final_norm/(?P<leaf>\w+)", ["layernorm.{leaf}"]),
]
_CLIP_BLOCKS = [
    Rule(r"block_(?P<k>\d+)/norm(?P<j>[12])/(?P<leaf>\w+)",
         ["encoder.layers.{i}.layer_norm{j}.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/attn/(?P<p>query|key|value|out)/(?P<leaf>\w+)",
         ["encoder.layers.{i}.self_attn.{p_clip}.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/mlp/(?P<fc>fc1|fc2)/(?P<leaf>\w+)",
         ["encoder.layers.{i}.mlp.{fc}.{leaf}"]),
]
_CLIP_VISION = [
    Rule(r"patch_embed/kernel", ["embeddings.patch_embedding.weight"]),
    Rule(r"cls_token", ["embeddings.class_embedding"], squeeze=True),
    Rule(r"pos_embedding", ["embeddings.position_embedding.weight"], squeeze=True),
    Rule(r"pre_norm/(?P<leaf>\w+)", ["pre_layrnorm.{leaf}"]),
    Rule(r"final_norm/(?P<leaf>\w+)", ["post_layernorm.{leaf}"]),
] + _CLIP_BLOCKS
_CLIP_TEXT = [
    Rule(r"token_embedding/embedding", ["embeddings.token_embedding.weight"]),
    Rule(r"pos_embedding", ["embeddings.position_embedding.weight"]),
    Rule(r"final_norm/(?P<leaf>\w+)", ["final_layer_norm.{leaf}"]),
    Rule(r"text_projection/kernel", ["^text_projection.weight"]),
] + _CLIP_BLOCKS
_BERT = [
    Rule(r"word_embedding/embedding", ["embeddings.word_embeddings.weight"]),
    Rule(r"pos_embedding/embedding", ["embeddings.position_embeddings.weight"]),
    Rule(r"type_embedding/embedding", ["embeddings.token_type_embeddings.weight"]),
    Rule(r"embed_norm/(?P<leaf>\w+)", ["embeddings.LayerNorm.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/attn/(?P<p>query|key|value)/(?P<leaf>\w+)",
         ["encoder.layer.{i}.attention.self.{p}.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/attn/out/(?P<leaf>\w+)",
         ["encoder.layer.{i}.attention.output.dense.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/norm1/(?P<leaf>\w+)",
         ["encoder.layer.{i}.attention.output.LayerNorm.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/mlp/fc1/(?P<leaf>\w+)",
         ["encoder.layer.{i}.intermediate.dense.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/mlp/fc2/(?P<leaf>\w+)", ["encoder.layer.{i}.output.dense.{leaf}"]),
    Rule(r"block_(?P<k>\d+)/norm2/(?P<leaf>\w+)", ["encoder.layer.{i}.output.LayerNorm.{leaf}"]),
    Rule(r"pooler/(?P<leaf>\w+)", ["pooler.dense.{leaf}"]),
]


@dataclasses.dataclass(frozen=True)
class Kind:
  """One supported checkpoint kind: tower prefixes, rename rules, keys we knowingly skip."""

  name: str
  prefixes: tuple[str, ...]  # tried in order; the first with `signature` present wins
  signature: str  # a tensor every checkpoint of this kind has (relative to the prefix)
  rules: list[Rule]
  ignore: str  # regex (full key) of tensors that are not ours to load
  # HF tensors our module has no counterpart for, written on export so that HF loads the
  # folder strictly: name (relative to the export prefix) -> zero tensor of that shape.
  placeholders: Callable[[nn.Module], dict[str, tuple[int, ...]]] = lambda module: {}
  # The prefix export writes: the state_dict prefix of the HF class hf_config names
  # (transformers 5: CLIPVisionModel and CLIPTextModel have none, ...WithProjection has one).
  export_prefix: Callable[[nn.Module], str] = lambda module: ""


KINDS = {
    "dinov2": Kind("dinov2", ("", "dinov2."), "embeddings.cls_token", _DINOV2,
                   r"(dinov2\.)?embeddings\.mask_token|classifier\..*",
                   # Only used for masked-image pretraining; HF initialises it to zeros.
                   lambda module: {"embeddings.mask_token": (1, module.width)}),
    "clip_vision": Kind("clip_vision", ("vision_model.", ""), "embeddings.class_embedding",
                        _CLIP_VISION,
                        r"text_model\..*|.*position_ids|logit_scale|visual_projection\..*|text_projection\..*"),
    "clip_text": Kind("clip_text", ("text_model.", ""), "embeddings.token_embedding.weight",
                      _CLIP_TEXT,
                      r"vision_model\..*|.*position_ids|logit_scale|visual_projection\..*",
                      export_prefix=lambda module: "text_model." if module.projection_dim else ""),
    "bert": Kind("bert", ("", "bert."), "embeddings.word_embeddings.weight", _BERT,
                 r".*position_ids|cls\..*|classifier\..*|qa_outputs\..*"),
}

_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}


def _match(kind: Kind, prefix: str, path: str) -> tuple[list[str], Rule] | None:
  """(HF names, rule) of our parameter `path`; None when no rule covers it (adapters)."""
  for rule in kind.rules:
    match = re.fullmatch(rule.pattern, path)
    if match is None:
      continue
    groups = match.groupdict()
    fields = dict(groups)
    if "k" in groups:
      fields["i"] = str(int(groups["k"]) - 1)
    if "leaf" in groups:
      fields["leaf"] = _LEAF[groups["leaf"]]
    if "p" in groups:
      fields["p_proj"] = _PROJ[groups["p"]].replace("out_proj", "o_proj")
      fields["p_clip"] = _PROJ[groups["p"]]
    names = [t[1:].format(**fields) if t.startswith("^") else prefix + t.format(**fields)
             for t in rule.names]
    return names, rule
  return None


def to_flax_layout(path: str, tensor: np.ndarray, shape: tuple[int, ...],
                   squeeze: bool = False) -> np.ndarray:
  """A PyTorch-layout tensor -> our leaf at `path`: Linear (out, in) -> Dense (in, out),
  Conv OIHW -> HWIO; `squeeze` tensors get our leading unit axes back."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "kernel" and tensor.ndim == 2:
    tensor = tensor.T
  elif leaf == "kernel" and tensor.ndim == 4:
    tensor = tensor.transpose(2, 3, 1, 0)
  if squeeze and tensor.size == int(np.prod(shape)):
    tensor = tensor.reshape(shape)  # e.g. CLIP class_embedding (D,) -> (1, 1, D)
  return tensor


def to_torch_layout(path: str, value: np.ndarray, squeeze: bool = False) -> np.ndarray:
  """The inverse of `to_flax_layout`, C-contiguous (safetensors writes raw buffers)."""
  leaf = path.rsplit("/", 1)[-1]
  value = np.asarray(value)
  if leaf == "kernel" and value.ndim == 2:
    value = value.T
  elif leaf == "kernel" and value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)
  if squeeze:
    while value.ndim > 1 and value.shape[0] == 1:
      value = value[0]
  return np.ascontiguousarray(value)


def read_tensor_file(file: str | Path) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors or .npz file; a file that cannot be parsed is named."""
  file = Path(file)
  if not file.is_file():
    raise FileNotFoundError(f"{file} does not exist.")
  try:
    if file.suffix == ".npz":
      with np.load(file, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top

    # "pt" would need torch; "np" cannot hold bfloat16, which ml_dtypes provides via flax.
    with safe_open(str(file), framework="flax") as f:
      return {key: np.asarray(f.get_tensor(key)) for key in f.keys()}
  except Exception as error:  # pylint: disable=broad-except  # SafetensorError, zip errors
    raise CheckpointMismatchError(
        f"{file} could not be read ({type(error).__name__}: {error}): the file is truncated, "
        "corrupted or not a safetensors/npz file. Export or download it again.") from None


def read_checkpoint(folder: str | Path) -> dict[str, np.ndarray]:
  """All tensors of a HF folder (*.safetensors, model.npz or pytorch_model*.bin)."""
  folder = Path(folder)
  files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("model.npz"))
  tensors: dict[str, np.ndarray] = {}
  if files:
    for file in files:
      tensors.update(read_tensor_file(file))
    return tensors
  bins = sorted(folder.glob("pytorch_model*.bin"))
  if bins:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{folder} holds only torch .bin weights; install torch or convert "
                        "them to model.safetensors.") from e
    for file in bins:
      for key, value in torch.load(file, map_location="cpu", weights_only=True).items():
        tensors[key] = value.float().numpy() if value.is_floating_point() else value.numpy()
    return tensors
  raise FileNotFoundError(
      f"No weights in {folder}: expected model.safetensors (or *.safetensors shards, or "
      "pytorch_model.bin). Save the model with save_pretrained() into that folder.")


@dataclasses.dataclass
class LoadReport:
  """What a load did: tensors used, leaves left to the caller's init, tensors skipped."""

  kind: str
  loaded: list[str]  # our paths filled from the checkpoint
  kept: list[str]  # our paths with no checkpoint rule (adapters): taken from `params`
  ignored: list[str]  # checkpoint keys that are knowingly not ours (buffers, other tower, heads)

  def summary(self) -> str:
    return (f"{self.kind}: loaded {len(self.loaded)} tensors, kept {len(self.kept)} "
            f"non-checkpoint leaves, ignored {len(self.ignored)} checkpoint keys")


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the module's configuration."""


def _example_inputs(module: nn.Module) -> tuple[tuple, dict]:
  if isinstance(module, vit.VisionTransformer):
    side = module.pretrain_grid * module.patch_size
    return (jnp.zeros((1, side, side, 3), jnp.float32),), {}
  length = min(8, module.max_positions)
  ids = jnp.ones((1, length), jnp.int32)
  return (ids, ids), {}


def encoder_abstract_params(module: nn.Module) -> Any:
  """Parameter shapes of an encoder module, from example inputs of its own size."""
  inputs, kwargs = _example_inputs(module)
  return layers.abstract_params(module, *inputs, **kwargs)


def load_params(module: nn.Module, folder: str | Path, kind: str, *, params: Any = None,
                tensors: dict[str, np.ndarray] | None = None) -> tuple[Any, LoadReport]:
  """Fills `module`'s parameters from the HF checkpoint in `folder`.

  params: an initialised tree for leaves the checkpoint does not have (adapters); when None,
    the checkpoint must provide every leaf. Raises CheckpointMismatchError naming each
    missing, mis-shaped or unexpected tensor.
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown kind {kind!r}; known: {sorted(KINDS)}.")
  spec = KINDS[kind]
  expected = MODULES[kind]
  family = getattr(module, "family", None)
  if not isinstance(module, expected) or (family and not kind.startswith(family)):
    raise ValueError(f"kind={kind!r} loads into {expected.__name__}"
                     f"{'' if family is None else ' of a matching family'}, not "
                     f"{type(module).__name__}{'' if family is None else f'(family={family!r})'}.")
  tensors = read_checkpoint(folder) if tensors is None else tensors
  target = flax.traverse_util.flatten_dict(
      encoder_abstract_params(module) if params is None else params, sep="/")
  prefix = next((p for p in spec.prefixes if p + spec.signature in tensors), None)
  if prefix is None:
    raise CheckpointMismatchError(
        f"{folder} does not look like a {kind} checkpoint: it has none of "
        f"{[p + spec.signature for p in spec.prefixes]}. Check `tower=` or the config's kind.")

  out, used, missing, mis_shaped, loaded, kept = {}, set(), [], [], [], []
  for path, leaf in target.items():
    matched = _match(spec, prefix, path)
    if matched is None:
      if params is None:
        raise CheckpointMismatchError(
            f"Parameter {path} has no checkpoint counterpart; pass initialised `params` so "
            "that non-encoder leaves (adapters) can be kept.")
      out[path] = leaf
      kept.append(path)
      continue
    names, rule = matched
    name = next((n for n in names if n in tensors), None)
    if name is None:
      missing.append(f"{names[0]} (for {path}, shape {tuple(leaf.shape)})")
      continue
    used.add(name)
    value = to_flax_layout(path, tensors[name], leaf.shape, rule.squeeze)
    if value.shape != tuple(leaf.shape):
      mis_shaped.append(f"{name}: checkpoint {tuple(tensors[name].shape)} vs module "
                        f"{tuple(leaf.shape)} (for {path})")
      continue
    out[path] = jnp.asarray(value, dtype=leaf.dtype)
    loaded.append(path)

  ignored = [k for k in tensors if k not in used and re.fullmatch(spec.ignore, k)]
  unexpected = [k for k in tensors if k not in used and k not in ignored]
  problems = []
  if missing:
    problems.append("missing tensors:\n  " + "\n  ".join(missing))
  if mis_shaped:
    problems.append("mis-shaped tensors:\n  " + "\n  ".join(mis_shaped))
  if unexpected:
    problems.append("unexpected tensors (the config is smaller than the checkpoint?):\n  "
                    + "\n  ".join(sorted(unexpected)))
  if problems:
    raise CheckpointMismatchError(
        f"Checkpoint {folder} does not fit the {kind} module config "
        f"({type(module).__name__}): " + "\n".join(problems))
  report = LoadReport(kind, loaded, kept, sorted(ignored))
  return flax.traverse_util.unflatten_dict(out, sep="/"), report


def export_name(kind: str, path: str) -> str | None:
  """The HF name export writes for our encoder leaf `path`; None for adapter leaves."""
  spec = KINDS[kind]
  matched = _match(spec, "", path)
  return None if matched is None else matched[0][0]


def export_tensors(module: nn.Module, params: Any, kind: str
                   ) -> tuple[dict[str, tuple[np.ndarray, str | None]], dict[str, Any]]:
  """Our encoder params -> HF tensors, the loader's rules run backwards.

  Returns ({HF name: (tensor in PyTorch layout, our path or None for a placeholder)},
  {our path: leaf} of the leaves no rule covers: adapters, for the caller to write).
  """
  spec = KINDS[kind]
  prefix = spec.export_prefix(module)
  tensors, rest = {}, {}
  for path, leaf in flax.traverse_util.flatten_dict(params, sep="/").items():
    matched = _match(spec, prefix, path)
    if matched is None:
      rest[path] = leaf
      continue
    names, rule = matched
    tensors[names[0]] = (to_torch_layout(path, np.asarray(leaf), rule.squeeze), path)
  for name, shape in spec.placeholders(module).items():
    tensors[prefix + name] = (np.zeros(shape, np.float32), None)
  return tensors, rest


# --------------------------------------------------------------------------------------
# Module configs from config.json
# --------------------------------------------------------------------------------------


def _vision_kwargs(cfg: dict, kind: str) -> dict:
  mlp_dim = cfg.get("intermediate_size") or int(cfg["hidden_size"] * cfg.get("mlp_ratio", 4))
  kwargs = dict(
      width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
      num_heads=cfg["num_attention_heads"], mlp_dim=mlp_dim, patch_size=cfg["patch_size"],
      pretrain_grid=cfg["image_size"] // cfg["patch_size"], act=cfg.get("hidden_act"),
      layer_norm_eps=cfg.get("layer_norm_eps", 1e-6))
  if kind == "dinov2":
    if cfg.get("use_swiglu_ffn"):
      raise NotImplementedError("DINOv2 with SwiGLU FFN (giant) is not supported.")
    kwargs.update(family="dinov2", num_registers=cfg.get("num_register_tokens", 0))
    kwargs["mlp_dim"] = int(cfg["hidden_size"] * cfg.get("mlp_ratio", 4))
  else:
    kwargs.update(family="clip", layer_norm_eps=cfg.get("layer_norm_eps", 1e-5))
  return kwargs


def module_kwargs(config: dict, kind: str, tensors: dict[str, np.ndarray]) -> dict:
  """Our module's constructor arguments from a HF config.json dict."""
  if kind == "dinov2":
    return _vision_kwargs(config, kind)
  if kind == "clip_vision":
    return _vision_kwargs(config.get("vision_config", config), kind)
  if kind == "clip_text":
    cfg = config.get("text_config", config)
    projection = tensors.get("text_projection.weight")
    return dict(
        vocab_size=cfg["vocab_size"], width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
        max_positions=cfg["max_position_embeddings"],
        projection_dim=None if projection is None else projection.shape[0],
        eos_token_id=cfg.get("eos_token_id", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        act=cfg.get("hidden_act", "quick_gelu"))
  if kind == "bert":
    if config.get("position_embedding_type", "absolute") != "absolute":
      raise NotImplementedError("Only absolute position embeddings are supported for BERT.")
    return dict(
        vocab_size=config["vocab_size"], width=config["hidden_size"],
        depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        mlp_dim=config["intermediate_size"], max_positions=config["max_position_embeddings"],
        type_vocab_size=config["type_vocab_size"], layer_norm_eps=config["layer_norm_eps"],
        act=config.get("hidden_act", "gelu"),
        use_pooler=any(k.endswith("pooler.dense.weight") for k in tensors))
  raise ValueError(f"Unknown kind {kind!r}; known: {sorted(KINDS)}.")


def hf_config(module: nn.Module, kind: str) -> dict:
  """config.json of a HF folder holding `module` (the inverse of `module_kwargs`)."""
  m = module
  if kind in ("dinov2", "clip_vision"):
    config = dict(hidden_size=m.width, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
                  patch_size=m.patch_size, image_size=m.pretrain_grid * m.patch_size,
                  num_channels=3, layer_norm_eps=m.layer_norm_eps)
    if kind == "dinov2":
      if m.mlp_dim % m.width:
        raise ValueError(f"DINOv2 configs hold an integer mlp_ratio; mlp_dim={m.mlp_dim} is "
                         f"not a multiple of width={m.width}.")
      registers = m.num_registers > 0
      config.update(
          model_type="dinov2_with_registers" if registers else "dinov2",
          architectures=["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
          mlp_ratio=m.mlp_dim // m.width, hidden_act=m.act or "gelu", layerscale_value=1.0,
          use_swiglu_ffn=False)
      if registers:
        config["num_register_tokens"] = m.num_registers
      return config
    return dict(config, model_type="clip_vision_model", architectures=["CLIPVisionModel"],
                intermediate_size=m.mlp_dim, hidden_act=m.act or "quick_gelu")
  if kind == "clip_text":
    config = dict(model_type="clip_text_model", vocab_size=m.vocab_size, hidden_size=m.width,
                  num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
                  intermediate_size=m.mlp_dim, max_position_embeddings=m.max_positions,
                  eos_token_id=m.eos_token_id, layer_norm_eps=m.layer_norm_eps,
                  hidden_act=m.act)
    if m.projection_dim is None:
      return dict(config, architectures=["CLIPTextModel"])
    return dict(config, architectures=["CLIPTextModelWithProjection"],
                projection_dim=m.projection_dim)
  if kind == "bert":
    return dict(model_type="bert", architectures=["BertModel"], vocab_size=m.vocab_size,
                hidden_size=m.width, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
                intermediate_size=m.mlp_dim, max_position_embeddings=m.max_positions,
                type_vocab_size=m.type_vocab_size, layer_norm_eps=m.layer_norm_eps,
                hidden_act=m.act, position_embedding_type="absolute")
  raise ValueError(f"Unknown kind {kind!r}; known: {sorted(KINDS)}.")


def detect_kind(config: dict, tower: str | None) -> str:
  model_type = config.get("model_type")
  if model_type in ("dinov2", "dinov2_with_registers"):
    return "dinov2"
  if model_type == "clip":
    if tower not in ("vision", "text"):
      raise ValueError("A CLIPModel folder holds two towers: pass tower='vision' or 'text'.")
    return f"clip_{tower}"
  if model_type == "clip_vision_model":
    return "clip_vision"
  if model_type == "clip_text_model":
    return "clip_text"
  if model_type == "bert":
    return "bert"
  raise ValueError(
      f"config.json model_type={model_type!r} is not supported; supported: dinov2, "
      "dinov2_with_registers, clip (tower='vision'|'text'), clip_vision_model, "
      "clip_text_model, bert.")


MODULES: dict[str, Callable[..., nn.Module]] = {
    "dinov2": vit.VisionTransformer, "clip_vision": vit.VisionTransformer,
    "clip_text": text.ClipTextEncoder, "bert": text.BertEncoder,
}


@dataclasses.dataclass
class Pretrained:
  module: nn.Module
  params: Any
  kind: str
  report: LoadReport
  tokenizer: text_tokenizer.TextTokenizer | None  # text towers whose folder has tokenizer files
  config: dict  # the folder's config.json


def read_config(folder: str | Path) -> dict:
  path = Path(folder) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: a Hugging Face model folder needs config.json "
                            "(save the model with save_pretrained()).")
  return json.loads(path.read_text())


def load_pretrained(folder: str | Path, *, tower: str | None = None, max_length: int = 22,
                    **overrides) -> Pretrained:
  """One call from a HF folder to (module, params, tokenizer).

  tower: "vision" or "text" for CLIPModel folders. max_length: tokenizer length (text).
  overrides: module fields to set (dtype, remat, pooling, ...; not the architecture).
  """
  config = read_config(folder)
  kind = detect_kind(config, tower)
  tensors = read_checkpoint(folder)
  kwargs = module_kwargs(config, kind, tensors)
  kwargs.update(overrides)
  module = MODULES[kind](**kwargs)
  params, report = load_params(module, folder, kind, tensors=tensors)
  tokenizer = None
  if kind in ("clip_text", "bert") and text_tokenizer.has_tokenizer(folder):
    tokenizer = text_tokenizer.load_tokenizer(folder, max_length)
  return Pretrained(module, params, kind, report, tokenizer, config)
