"""S4ECA in PyTorch around Hugging Face's PyTorch encoders: the cross-framework oracle for
the JAX model and its PyTorch peer in benchmarks.

    model = S4ECAReference.from_export("DIR")  # a folder written by python -m s4eca_jax.export
    out = model(images, input_ids, attention_mask)  # images (B, 3, H, W) normalised
    out["logits"]  # (B, H, W) mask logits, as s4eca_jax.models.s4eca.S4ECA returns them

    model = S4ECAReference.from_config(config)  # random weights (benchmarks), same switches

The encoders are the HF classes (Dinov2WithRegistersModel / Dinov2Model / CLIPVisionModel,
CLIPTextModel(WithProjection) / BertModel), loaded from the export's encoder folders. The
visual adapter of image block k runs inside that block: a forward hook on the block's MLP
adds adapter_scale * adapter(n, proxies) to MLP(n), n = norm2(x), which is where the JAX
model adds it (before LayerScale). The adapters and the decoder are written here in the
module structure of models/adapters.py and models/decoder.py, so their state_dict names
are the export's names (export_format.torch_name) and load with strict=True.

Only this module (and tests) import torch; the package itself never does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from s4eca_jax import export_format
from s4eca_jax.models import adapters as jax_adapters
from s4eca_jax.models import decoder as jax_decoder
from s4eca_jax.models import hf_weights, s4eca

# Flax's LayerNorm and GroupNorm default; torch's is 1e-5.
FLAX_NORM_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
  return nn.LayerNorm(dim, eps=FLAX_NORM_EPS)


class Attention(nn.Module):
  """layers.MultiHeadAttention: separate query/key/value/out Linear layers."""

  def __init__(self, dim_q: int, dim_kv: int, num_heads: int, features: int | None = None,
               key_bias: bool = False):
    super().__init__()
    features = features or dim_q
    self.num_heads = num_heads
    self.query = nn.Linear(dim_q, features)
    self.key = nn.Linear(dim_kv, features, bias=key_bias)
    self.value = nn.Linear(dim_kv, features)
    self.out = nn.Linear(features, dim_q)

  def forward(self, queries, keys, key_mask=None):
    """queries (B, Tq, dq), keys (B, Tk, dk), key_mask (B, Tk) bool (True = attend)."""
    split = lambda x: x.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(split(self.query(queries)), split(self.key(keys)),
                                         split(self.value(keys)), attn_mask=mask)
    return self.out(out.transpose(1, 2).reshape(queries.shape[0], queries.shape[1], -1))


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int, out: int | None = None):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, out or dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


# --------------------------------------------------------------------------------------
# Adapters (models/adapters.py)
# --------------------------------------------------------------------------------------


class QueryReader(nn.Module):

  def __init__(self, dim: int, width: int, num_heads: int):
    super().__init__()
    self.query_norm, self.word_norm, self.ffn_norm = (layer_norm(dim) for _ in range(3))
    self.attn = Attention(dim, dim, num_heads, features=width)
    self.ffn = Mlp(dim, width)

  def forward(self, queries, words, mask):
    queries = queries + self.attn(self.query_norm(queries), self.word_norm(words), mask)
    return queries + self.ffn(self.ffn_norm(queries))


class TextualAdapter(nn.Module):

  def __init__(self, blocks, text_width: int, out_dim: int, num_queries: int, width: int,
               num_heads: int):
    super().__init__()
    self.blocks = tuple(blocks)
    self.queries = nn.Parameter(torch.randn(num_queries, text_width) * 0.02)
    for k in self.blocks:
      self.add_module(f"read_{k}", QueryReader(text_width, width, num_heads))
    self.out_norm = layer_norm(text_width)
    self.proxy_proj = nn.Linear(text_width, out_dim)

  def forward(self, block_tokens: dict[int, torch.Tensor], attention_mask):
    batch = attention_mask.shape[0]
    queries = self.queries.expand(batch, -1, -1)
    mask = attention_mask.bool()
    for k in self.blocks:
      queries = getattr(self, f"read_{k}")(queries, block_tokens[k], mask)
    return self.proxy_proj(self.out_norm(queries))  # (B, Nq, D)


def l2_normalize(x):
  return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + jax_adapters.COSINE_EPS)


def standardize_over_space(x):
  centred = x - x.mean(dim=(1, 2), keepdim=True)
  return centred * torch.rsqrt((centred * centred).mean(dim=(1, 2), keepdim=True)
                               + jax_adapters.COSINE_EPS)


def conv_nhwc(conv: nn.Module, x):
  """Applies an NCHW module to an NHWC tensor (the JAX model's layout)."""
  return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class DenseMultiScale(nn.Module):

  def __init__(self, width: int, kernel_sizes, dense: bool):
    super().__init__()
    self.kernel_sizes, self.dense = tuple(kernel_sizes), dense
    for i, size in enumerate(self.kernel_sizes):
      self.add_module(f"branch_{i}_pointwise", nn.Linear(width * (i + 1 if dense else 1), width))
      self.add_module(f"branch_{i}_depthwise",
                      nn.Conv2d(width, width, size, padding="same", groups=width))

  def forward(self, x):
    """(B, h, w, r) -> (B, h, w, K, r)."""
    branches = []
    for i in range(len(self.kernel_sizes)):
      inputs = torch.cat([x] + branches, dim=-1) if self.dense else x
      y = getattr(self, f"branch_{i}_pointwise")(inputs)
      branches.append(F.gelu(conv_nhwc(getattr(self, f"branch_{i}_depthwise"), y)))
    return torch.stack(branches, dim=3)


class VisualAdapter(nn.Module):

  def __init__(self, dim: int, num_proxies: int, va: ml_collections.ConfigDict):
    super().__init__()
    self.width, self.kernel_sizes = va.width, tuple(va.kernel_sizes)
    self.scale_selection, self.spatial_selection = va.scale_selection, va.spatial_selection
    self.cross_attention = va.cross_attention
    self.spatial_standardize = va.get("spatial_standardize", True)
    num_scales, width = len(self.kernel_sizes), va.width
    self.down = nn.Linear(dim, width)
    if self.scale_selection or self.spatial_selection or self.cross_attention:
      self.proxy_proj = nn.Linear(dim, width)
    self.multi_scale = DenseMultiScale(width, self.kernel_sizes, va.dense_connectivity)
    if self.scale_selection:
      self.scale_fc1 = nn.Linear(2 * width, width)
      self.scale_fc2 = nn.Linear(width, num_scales * width)
    if self.spatial_selection:
      self.spatial_conv = nn.Conv2d(num_proxies + 2 * num_scales, num_scales,
                                    va.spatial_kernel, padding="same")
    if self.cross_attention:
      self.cross_attn = Attention(width, width, va.num_heads)
    self.up = nn.Linear(width, dim)

  def forward(self, n, proxies, num_prefix: int, grid: tuple[int, int]):
    """n: (B, T, D) normed tokens; proxies: (B, Nq, D) -> (B, T, D)."""
    batch, num_scales = n.shape[0], len(self.kernel_sizes)
    x = F.gelu(self.down(n))
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    patches = patches.reshape(batch, grid[0], grid[1], self.width)
    proxies = self.proxy_proj(proxies) if hasattr(self, "proxy_proj") else None
    branches = self.multi_scale(patches)  # (B, h, w, K, r)
    fused = branches.sum(dim=3)
    if self.scale_selection:
      pooled = torch.cat([fused.mean(dim=(1, 2)), proxies.mean(dim=1)], dim=-1)
      logits = self.scale_fc2(F.gelu(self.scale_fc1(pooled)))
      scale_weights = torch.softmax(logits.reshape(batch, num_scales, self.width), dim=1)
    else:
      scale_weights = torch.full((batch, num_scales, self.width), 1.0 / num_scales,
                                 device=n.device, dtype=n.dtype)
    if self.spatial_selection:
      cosine = torch.einsum("bhwc,bqc->bhwq", l2_normalize(fused), l2_normalize(proxies))
      stats = torch.cat([branches.mean(-1), branches.amax(-1)], dim=-1)  # (B, h, w, 2K)
      maps_in = torch.cat([cosine, stats], dim=-1)  # (B, h, w, Nq + 2K)
      if self.spatial_standardize:
        maps_in = standardize_over_space(maps_in)
      spatial_maps = torch.sigmoid(conv_nhwc(self.spatial_conv, maps_in))  # (B, h, w, K)
    else:
      spatial_maps = torch.ones(branches.shape[:4], device=n.device, dtype=n.dtype)
    selection = scale_weights[:, None, None] * spatial_maps[..., None]
    selected = (selection * branches).sum(dim=3).reshape(batch, -1, self.width)
    if self.cross_attention:
      selected = selected + self.cross_attn(selected, proxies)
    return self.up(torch.cat([prefix, selected], dim=1))


# --------------------------------------------------------------------------------------
# Decoder (models/decoder.py)
# --------------------------------------------------------------------------------------


class ConvNormAct(nn.Module):

  def __init__(self, in_channels: int, features: int, kernel_size: int, norm_groups: int):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, features, kernel_size, padding="same", bias=False)
    self.norm = nn.GroupNorm(norm_groups, features, eps=FLAX_NORM_EPS)

  def forward(self, x):
    """NHWC -> NHWC."""
    return F.gelu(conv_nhwc(lambda y: self.norm(self.conv(y)), x))


class DecoderLayer(nn.Module):

  def __init__(self, width: int, num_heads: int, mlp_dim: int):
    super().__init__()
    self.self_norm, self.cross_norm, self.ffn_norm = (layer_norm(width) for _ in range(3))
    self.self_attn = Attention(width, width, num_heads)
    self.cross_attn = Attention(width, width, num_heads)
    self.ffn = Mlp(width, mlp_dim)

  def forward(self, x, memory, memory_mask):
    y = self.self_norm(x)
    x = x + self.self_attn(y, y)
    x = x + self.cross_attn(self.cross_norm(x), memory, memory_mask)
    return x + self.ffn(self.ffn_norm(x))


class Decoder(nn.Module):

  def __init__(self, dec: ml_collections.ConfigDict, image_width: int, text_width: int,
               sentence_dim: int):
    super().__init__()
    self.dec = dec
    width, num_taps = dec.width, len(dec.taps) + 1
    self.sentence_norm = layer_norm(sentence_dim)
    for i in range(num_taps):
      self.add_module(f"tap_{i}_proj", nn.Linear(image_width, width))
      if dec.sentence_gate:
        self.add_module(f"tap_{i}_gate", nn.Linear(sentence_dim, width))
    self.fuse_1x1 = ConvNormAct(num_taps * width, width, 1, dec.norm_groups)
    self.fuse_3x3 = ConvNormAct(width, width, 3, dec.norm_groups)
    self.word_proj = nn.Linear(text_width, width)
    self.proxy_proj = nn.Linear(image_width, width)
    for i in range(dec.num_layers):
      self.add_module(f"layer_{i}", DecoderLayer(width, dec.num_heads, dec.mlp_dim))
    self.out_norm = layer_norm(width)
    coords = 2 * dec.coordinate_freqs
    channels = width
    for i, dim in enumerate(dec.projector_dims):
      self.add_module(f"upsample_{i}", ConvNormAct(channels + coords, dim, 3, dec.norm_groups))
      channels = dim
    channels += coords
    self.dynamic_kernel = nn.Linear(sentence_dim, channels + 1)
    if dec.pixel_dim:
      self.pixel_stem_0 = ConvNormAct(3, dec.pixel_dim, 3, math.gcd(dec.norm_groups,
                                                                    dec.pixel_dim))
      self.pixel_stem_1 = nn.Conv2d(dec.pixel_dim, dec.pixel_dim, 3, padding="same")
      self.pixel_query = nn.Linear(channels, dec.pixel_dim)

  def _with_coordinates(self, x):
    if not self.dec.coordinate_freqs:
      return x
    coords = torch.from_numpy(jax_decoder.coordinate_channels(
        x.shape[1], x.shape[2], self.dec.coordinate_freqs)).to(x)
    return torch.cat([x, coords.expand(x.shape[0], -1, -1, -1)], dim=-1)

  def forward(self, feature_maps, sentence, words, word_mask, proxies, out_size, images):
    """feature_maps: [(B, h, w, D)]; images: (B, H, W, 3). -> logits, low_res_logits."""
    batch, height, width, _ = feature_maps[0].shape
    sentence = self.sentence_norm(sentence)
    neck = []
    for i, fmap in enumerate(feature_maps):
      fmap = getattr(self, f"tap_{i}_proj")(fmap)
      if self.dec.sentence_gate:
        fmap = fmap * torch.sigmoid(getattr(self, f"tap_{i}_gate")(sentence))[:, None, None]
      neck.append(fmap)
    x = self.fuse_3x3(self.fuse_1x1(torch.cat(neck, dim=-1)))
    x = x + torch.from_numpy(jax_decoder.sine_position_encoding(height, width,
                                                                self.dec.width)).to(x)
    memory = torch.cat([self.word_proj(words), self.proxy_proj(proxies)], dim=1)
    memory_mask = torch.cat([word_mask.bool(), torch.ones(proxies.shape[:2], dtype=torch.bool,
                                                          device=proxies.device)], dim=1)
    x = x.reshape(batch, height * width, -1)
    for i in range(self.dec.num_layers):
      x = getattr(self, f"layer_{i}")(x, memory, memory_mask)
    x = self.out_norm(x).reshape(batch, height, width, -1)
    for i in range(len(self.dec.projector_dims)):
      x = conv_nhwc(lambda y: F.interpolate(y, scale_factor=2, mode="bilinear",
                                            align_corners=False), x)
      x = getattr(self, f"upsample_{i}")(self._with_coordinates(x))
    x = self._with_coordinates(x)
    kernel = self.dynamic_kernel(sentence)
    low_res = torch.einsum("bhwc,bc->bhw", x, kernel[:, :-1]) + kernel[:, -1, None, None]
    if self.dec.pixel_dim:
      low_res = low_res + torch.sigmoid(low_res) * self._pixel_logits(x, images)
    logits = F.interpolate(low_res[:, None], size=tuple(out_size), mode="bilinear",
                           align_corners=False)[:, 0]
    return {"logits": logits, "low_res_logits": low_res}

  def _pixel_logits(self, x, images):
    pixels = conv_nhwc(lambda y: F.interpolate(y, size=x.shape[1:3], mode="bilinear",
                                               align_corners=False, antialias=True), images)
    pixels = conv_nhwc(self.pixel_stem_1, self.pixel_stem_0(pixels))
    query = self.pixel_query(x)
    return torch.einsum("bhwc,bhwc->bhw", pixels, query) / math.sqrt(self.dec.pixel_dim)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


def _hf_model(kind: str, hf_config: dict, folder: Path | None, hf_kwargs: dict):
  """The HF encoder class of `kind`, from `folder` (from_pretrained) or random weights."""
  cls = getattr(transformers, hf_config["architectures"][0])
  if folder is not None:
    return cls.from_pretrained(str(folder), **hf_kwargs)
  config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items()
                                                if k != "architectures"})
  return cls(config, **hf_kwargs)


class S4ECAReference(nn.Module):
  """S4ECA in PyTorch with the switches of the run's config (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, image_encoder: nn.Module,
               text_encoder: nn.Module):
    super().__init__()
    m, image_cfg, text_cfg = config.model, config.image_encoder, config.text_encoder
    flax_model = s4eca.build_model(config)  # its modules resolve every default field
    self.image_kind, self.text_kind = image_cfg.kind, text_cfg.kind
    self.num_prefix = flax_model.image_encoder.num_prefix
    self.patch_size = image_cfg.patch_size
    self.adapter_scale = m.visual_adapter.scale
    self.decoder_taps = tuple(m.decoder.taps)
    self.tap_norm = m.decoder.get("tap_norm", False)
    self.language_guidance = m.language_guidance
    self.pooling = flax_model.text_encoder.pooling if text_cfg.kind == "bert" else None
    self.image_encoder, self.text_encoder = image_encoder, text_encoder
    image_width, text_width = image_cfg.width, text_cfg.width
    sentence_dim = (text_cfg.get("projection_dim") or text_width) if text_cfg.kind == "clip_text" \
        else text_width
    ta = m.textual_adapter
    if ta.enabled:
      self.textual_adapter = TextualAdapter(ta.blocks, text_width, image_width, ta.num_queries,
                                            ta.width, ta.num_heads)
      num_proxies = ta.num_queries
    else:
      self.sentence_proxy = nn.Linear(sentence_dim, image_width)
      num_proxies = 1
    self.visual_adapters = nn.ModuleDict({
        f"block_{k}": VisualAdapter(image_width, num_proxies, m.visual_adapter)
        for k in m.visual_adapter.blocks})
    self.decoder = Decoder(m.decoder, image_width, text_width, sentence_dim)
    self._adapter_inputs = None  # (proxies, grid) of the forward pass in progress
    layers = (image_encoder.vision_model.encoder.layers if image_cfg.kind == "clip_vision"
              else image_encoder.encoder.layer)
    for k in m.visual_adapter.blocks:
      layers[k - 1].mlp.register_forward_hook(self._adapter_hook(k))

  def _adapter_hook(self, k: int):
    def hook(module, inputs, output):
      del module
      proxies, grid = self._adapter_inputs
      adapter = self.visual_adapters[f"block_{k}"]
      return output + self.adapter_scale * adapter(inputs[0], proxies, self.num_prefix, grid)
    return hook

  @classmethod
  def from_export(cls, folder: str | Path) -> "S4ECAReference":
    """Encoders from the export's HF folders, the rest from s4eca.safetensors (strict)."""
    folder = Path(folder)
    sidecar = export_format.read_sidecar(folder)
    config = ml_collections.ConfigDict(sidecar["config"])
    suffix = export_format.FORMATS[sidecar["format"]]
    encoders = []
    for name in export_format.ENCODERS:
      entry = sidecar["files"][f"{name}/model{suffix}"]
      hf_config = json.loads((folder / name / "config.json").read_text())
      if sidecar["format"] == "safetensors":
        encoders.append(_hf_model(entry["kind"], hf_config, folder / name,
                                  entry.get("hf_kwargs", {})))
      else:
        model = _hf_model(entry["kind"], hf_config, None, entry.get("hf_kwargs", {}))
        model.load_state_dict(_torch_tensors(folder / f"{name}/model{suffix}"), strict=True)
        encoders.append(model)
    model = cls(config, *encoders)
    trained = _torch_tensors(folder / (export_format.TRAINED_STEM + suffix))
    model.load_state_dict(trained, strict=False)  # the encoders are already loaded
    expected = {k for k in model.state_dict() if not k.startswith(export_format.ENCODERS)}
    if set(trained) != expected:
      raise export_format.ExportError(
          f"{folder} does not fit the reference model: missing "
          f"{sorted(expected - set(trained))}, unexpected {sorted(set(trained) - expected)}.")
    return model.eval()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "S4ECAReference":
    """Random weights (benchmarks): the HF encoders built from the config's shapes."""
    flax_model = s4eca.build_model(config)
    encoders = [_hf_model(config[name].kind, hf_weights.hf_config(
        getattr(flax_model, name), config[name].kind), None, {})
                for name in export_format.ENCODERS]
    return cls(config, *encoders)

  def encode_text(self, input_ids, attention_mask, taps):
    out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=True)
    tokens = out.last_hidden_state
    if self.text_kind == "clip_text":
      sentence = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    elif self.pooling == "mean":
      weights = attention_mask.to(tokens.dtype)[..., None]
      sentence = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    elif self.pooling == "cls":
      sentence = tokens[:, 0]
    else:
      sentence = out.pooler_output
    return tokens, sentence, {k: out.hidden_states[k] for k in taps}

  def final_norm(self, tokens):
    """The image encoder's final norm (our ViT's `final_norm`)."""
    if self.image_kind == "clip_vision":
      return self.image_encoder.vision_model.post_layernorm(tokens)
    return self.image_encoder.layernorm(tokens)

  def forward(self, images, input_ids, attention_mask):
    """images: (B, 3, H, W) normalised; input_ids, attention_mask: (B, L) int."""
    text_taps = self.textual_adapter.blocks if hasattr(self, "textual_adapter") else ()
    words, sentence, taps = self.encode_text(input_ids, attention_mask, text_taps)
    if hasattr(self, "textual_adapter"):
      proxies = self.textual_adapter(taps, attention_mask)
    else:
      proxies = self.sentence_proxy(sentence)[:, None]
    word_mask = attention_mask
    if not self.language_guidance:
      words, sentence, proxies = map(torch.zeros_like, (words, sentence, proxies))
      word_mask = torch.ones_like(attention_mask)  # the padding would tell the length

    grid = (images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
    self._adapter_inputs = (proxies, grid)
    try:
      kwargs = {"interpolate_pos_encoding": True} if self.image_kind == "clip_vision" else {}
      out = self.image_encoder(pixel_values=images, output_hidden_states=True, **kwargs)
    finally:
      self._adapter_inputs = None
    final = out.last_hidden_state
    if self.image_kind == "clip_vision":  # HF applies post_layernorm to the pooled CLS only
      final = self.final_norm(final)
    to_map = lambda tokens: tokens[:, self.num_prefix:].reshape(
        tokens.shape[0], grid[0], grid[1], tokens.shape[-1])
    taps = [out.hidden_states[k] for k in self.decoder_taps]
    if self.tap_norm:  # through the final norm, as the last hidden state
      taps = [self.final_norm(tokens) for tokens in taps]
    feature_maps = [to_map(tokens) for tokens in taps] + [to_map(final)]
    return self.decoder(feature_maps, sentence, words, word_mask, proxies,
                        images.shape[2:], images.permute(0, 2, 3, 1))


def _torch_tensors(file: Path) -> dict[str, torch.Tensor]:
  return {k: torch.from_numpy(v.copy()) for k, v in hf_weights.read_tensor_file(file).items()}


def load_config(folder: str | Path) -> ml_collections.ConfigDict:
  """The run config an export was written from."""
  return ml_collections.ConfigDict(export_format.read_sidecar(folder)["config"])


def to_torch_inputs(images, input_ids, attention_mask) -> tuple[Any, Any, Any]:
  """JAX-side inputs (NHWC images, int32 ids) -> the reference's (NCHW, int64)."""
  return (torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2).contiguous(),
          torch.from_numpy(np.asarray(input_ids).astype(np.int64)),
          torch.from_numpy(np.asarray(attention_mask).astype(np.int64)))


def segmentation_loss(logits, masks, bce_weight: float = 1.0, dice_weight: float = 1.0):
  """losses.segmentation_loss in torch (all examples valid): BCE + soft Dice, in f32."""
  logits, masks = logits.float(), masks.float()
  bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean((1, 2))
  probs = torch.sigmoid(logits)
  overlap = (probs * masks).sum((1, 2))
  dice = 1.0 - (2.0 * overlap + 1.0) / (probs.sum((1, 2)) + masks.sum((1, 2)) + 1.0)
  return bce_weight * bce.mean() + dice_weight * dice.mean()


def benchmark(config: ml_collections.ConfigDict, batch: dict[str, np.ndarray], steps: int,
              warmup: int, with_eval: bool = True, compile_model: bool = True) -> dict:
  """The PyTorch peer of s4eca_jax.bench on the same config and batch (random weights):
  train steps (forward, BCE + Dice, backward, AdamW on the adapters and the decoder, the
  encoders frozen) and eval forwards, eager and, with compile_model, torch.compile'd.

  Each timed call ends in a device synchronisation. bf16 autocast where the config's
  compute dtype resolves to bfloat16 on the device (CUDA); f32 otherwise. Returns
  {"device", "autocast", "eager": {...}, "compiled": {...}} with per-mode "train"/"eval"
  (seconds per call) and "first_call_s" (torch.compile's compile happens there).
  """
  import time  # pylint: disable=g-import-not-at-top

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  dtype = s4eca.compute_dtype(config.model.compute_dtype,
                              "gpu" if device.type == "cuda" else "cpu")
  autocast = device.type == "cuda" and np.dtype(dtype).itemsize == 2
  model = S4ECAReference.from_config(config).to(device).eval()  # no dropout, as in JAX
  for encoder in (model.image_encoder, model.text_encoder):
    encoder.requires_grad_(False)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = config.optimizer
  optimizer = torch.optim.AdamW(trainable, lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps,
                                weight_decay=opt.weight_decay)
  images, input_ids, attention_mask = (t.to(device) for t in to_torch_inputs(
      batch["image"], batch["input_ids"], batch["attention_mask"]))
  masks = torch.from_numpy(np.asarray(batch["mask"], np.float32)).to(device)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  threshold = config.get("mask_probability", 0.5)

  def timed(fn, n):
    seconds = []
    for _ in range(n):
      start = time.perf_counter()
      fn()
      sync()
      seconds.append(time.perf_counter() - start)
    return seconds

  def measure(forward):
    def train_step():
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        logits = forward(images, input_ids, attention_mask)["logits"]
      segmentation_loss(logits, masks, **config.loss).backward()
      optimizer.step()

    @torch.no_grad()
    def eval_step():
      with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        logits = forward(images, input_ids, attention_mask)["logits"]
      return torch.sigmoid(logits.float()) > threshold

    out = {"first_call_s": timed(train_step, 1)[0]}
    timed(train_step, warmup)
    out["train"] = timed(train_step, steps)
    if with_eval:
      timed(eval_step, 1 + warmup)
      out["eval"] = timed(eval_step, steps)
    if device.type == "cuda":
      out["peak_bytes"] = torch.cuda.max_memory_allocated()
      torch.cuda.reset_peak_memory_stats()
    return out

  results = {"device": str(device), "torch": torch.__version__, "autocast": autocast,
             "eager": measure(model)}
  if compile_model:
    results["compiled"] = measure(torch.compile(model))
  return results
