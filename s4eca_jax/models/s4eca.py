"""The S4ECA model: text encoder -> language proxies -> image encoder with visual adapters
-> decoder; its builder from a config and the loading of its frozen encoder weights.

    model = build_model(config)
    params = model.init(rng, *example_inputs(config))["params"]
    params, reports = load_encoder_weights(model, config, params)
    out = model.apply({"params": params}, images, input_ids, attention_mask)
    out["logits"]  # (B, H, W) f32 mask logits at the input size

Parameter tree: image_encoder/ (frozen; visual adapters at block_k/adapter/),
text_encoder/ (frozen), textual_adapter/ (or sentence_proxy/ without it), decoder/.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from s4eca_jax.models import adapters, decoder, hf_weights, layers, text, vit

IMAGE_KINDS = {"dinov2": "dinov2", "clip_vision": "clip"}  # checkpoint kind -> ViT family
TEXT_ENCODERS = {"clip_text": text.ClipTextEncoder, "bert": text.BertEncoder}
_NOT_MODULE_FIELDS = ("kind", "checkpoint")


class S4ECA(nn.Module):
  """Referring segmentation with frozen encoders, language-guided adapters and a decoder.

  language_guidance=False is the language-blind ablation: the image path and the decoder
  see zeros instead of the proxies, word tokens and sentence vector, and every word slot
  counts as valid, so nothing of the expression (not even its length) reaches the output.
  """

  image_encoder: vit.VisionTransformer  # built with adapter=VisualAdapter factory
  text_encoder: nn.Module
  decoder: decoder.Decoder
  textual_adapter: adapters.TextualAdapter | None = None  # None: proxies = Dense(sentence)
  decoder_taps: Sequence[int] = (4, 8)  # image blocks; the final normed tokens come last
  decoder_tap_norm: bool = False  # the taps through the image encoder's final norm too
  language_guidance: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, input_ids, attention_mask):
    """images: (B, H, W, 3) normalised; input_ids, attention_mask: (B, L) int.

    Returns {"logits": (B, H, W), "low_res_logits": (B, h', w')} in f32.
    """
    text_taps = tuple(self.textual_adapter.blocks) if self.textual_adapter else ()
    text_out = self.text_encoder(input_ids, attention_mask, taps=text_taps)
    words, sentence = text_out["tokens"], text_out["sentence"]  # (B, L, C), (B, S)
    if self.textual_adapter is not None:
      proxies = self.textual_adapter(text_out["taps"], attention_mask)  # (B, Nq, D)
    else:
      proxies = nn.Dense(self.image_encoder.width, dtype=self.dtype,
                         name="sentence_proxy")(sentence)[:, None]  # (B, 1, D)
    word_mask = attention_mask
    if not self.language_guidance:
      words, sentence, proxies = map(jnp.zeros_like, (words, sentence, proxies))
      word_mask = jnp.ones_like(attention_mask)  # the padding would tell the length
    self.sow("intermediates", "proxies", proxies)

    image_out = self.image_encoder(images, taps=self.decoder_taps, adapter_context=proxies,
                                   norm_taps=self.decoder_tap_norm)
    grid = self.image_encoder.grid_size(images.shape[1], images.shape[2])
    to_map = lambda tokens: vit.patch_grid(tokens, self.image_encoder.num_prefix, grid)
    feature_maps = [to_map(image_out["taps"][k]) for k in self.decoder_taps]
    feature_maps.append(to_map(image_out["tokens"]))  # each (B, h, w, D)
    return self.decoder(feature_maps, sentence, words, word_mask, proxies,
                        images.shape[1:3], images=images)


def compute_dtype(name: str, backend: str | None = None):
  """"auto": bfloat16 on GPU/TPU, float32 on CPU (backend: default jax's)."""
  if name == "auto":
    return jnp.float32 if (backend or jax.default_backend()) == "cpu" else jnp.bfloat16
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.compute_dtype={name!r}; use 'auto', 'float32' or 'bfloat16'.")
  return jnp.dtype(name)


def _module_kwargs(encoder_config: ml_collections.ConfigDict) -> dict:
  return {k: v for k, v in encoder_config.items() if k not in _NOT_MODULE_FIELDS}


def build_model(config: ml_collections.ConfigDict, backend: str | None = None) -> S4ECA:
  """The S4ECA module described by `config` (see configs/rrsisd.py).

  backend: the platform the model will be compiled for (default jax's default backend;
  the AOT tool passes "tpu" on a CPU host); it resolves the "auto" dtype and attention.
  """
  backend = backend or jax.default_backend()
  dtype = compute_dtype(config.model.compute_dtype, backend)
  image_cfg, text_cfg, m = config.image_encoder, config.text_encoder, config.model
  attention = layers.resolve_attention(m.get("attention", "auto"), backend, dtype)
  # The 22-token text tower gains nothing from a fused kernel: on v5e, 0.03 of 41.1 GB (XLA's
  # count) per chip and step, the same temporaries and HBM estimate (bench/RESULTS.md).
  text_attention = "xla" if m.get("attention", "auto") == "auto" else attention
  fused_qkv = m.get("fused_qkv", False)
  if image_cfg.kind not in IMAGE_KINDS:
    raise ValueError(f"config.image_encoder.kind={image_cfg.kind!r}; known: {sorted(IMAGE_KINDS)}.")
  if text_cfg.kind not in TEXT_ENCODERS:
    raise ValueError(f"config.text_encoder.kind={text_cfg.kind!r}; known: {sorted(TEXT_ENCODERS)}.")
  va, ta, dec = m.visual_adapter, m.textual_adapter, m.decoder
  visual_adapter = functools.partial(
      adapters.VisualAdapter, width=va.width, kernel_sizes=tuple(va.kernel_sizes),
      dense_connectivity=va.dense_connectivity, scale_selection=va.scale_selection,
      spatial_selection=va.spatial_selection, spatial_kernel=va.spatial_kernel,
      spatial_standardize=va.spatial_standardize, cross_attention=va.cross_attention,
      num_heads=va.num_heads, dtype=dtype,
      depthwise=layers.resolve_depthwise(va.get("depthwise", "auto"), backend))
  image_encoder = vit.VisionTransformer(
      family=IMAGE_KINDS[image_cfg.kind], **_module_kwargs(image_cfg), adapter=visual_adapter,
      adapter_blocks=tuple(va.blocks), adapter_scale=va.scale, attention=attention,
      fused_qkv=fused_qkv, f32_residual=m.f32_residual,
      norm_residuals=layers.resolve_norm_residuals(m.get("norm_residuals", "auto"), backend,
                                                   dtype),
      dtype=dtype)
  text_encoder = TEXT_ENCODERS[text_cfg.kind](
      **_module_kwargs(text_cfg), attention=text_attention, fused_qkv=fused_qkv,
      f32_residual=m.f32_residual, dtype=dtype)
  textual_adapter = None
  if ta.enabled:
    textual_adapter = adapters.TextualAdapter(
        blocks=tuple(ta.blocks), out_dim=image_cfg.width, num_queries=ta.num_queries,
        width=ta.width, num_heads=ta.num_heads, dtype=dtype)
  return S4ECA(
      image_encoder=image_encoder, text_encoder=text_encoder, textual_adapter=textual_adapter,
      decoder=decoder.Decoder(
          width=dec.width, num_layers=dec.num_layers, num_heads=dec.num_heads,
          mlp_dim=dec.mlp_dim, sentence_gate=dec.sentence_gate,
          projector_dims=tuple(dec.projector_dims), coordinate_freqs=dec.coordinate_freqs,
          pixel_dim=dec.pixel_dim, norm_groups=dec.norm_groups, attention=attention,
          dtype=dtype),
      decoder_taps=tuple(dec.taps), decoder_tap_norm=dec.tap_norm,
      language_guidance=m.language_guidance, dtype=dtype)


def example_inputs(config: ml_collections.ConfigDict, batch_size: int = 1):
  """Zero (images, input_ids, attention_mask) with the shapes the config feeds the model."""
  side = config.image_size
  return (jnp.zeros((batch_size, side, side, 3), jnp.float32),
          jnp.ones((batch_size, config.max_length), jnp.int32),
          jnp.ones((batch_size, config.max_length), jnp.int32))


def abstract_params(config: ml_collections.ConfigDict, model: S4ECA | None = None) -> Any:
  """The parameter tree of the model `config` describes, as jax.ShapeDtypeStruct leaves."""
  model = build_model(config) if model is None else model
  return layers.abstract_params(model, *example_inputs(config))


def _check_architecture(module: nn.Module, folder: str, kind: str, tensors: dict, name: str):
  """Fields the checkpoint's config.json fixes (eps, activation...) must match the config."""
  expected = hf_weights.module_kwargs(hf_weights.read_config(folder), kind, tensors)
  wrong = [f"config.{name}.{field}={getattr(module, field)!r} but the checkpoint has {value!r}"
           for field, value in expected.items()
           if value is not None and getattr(module, field) not in (None, value)]
  if wrong:
    raise hf_weights.CheckpointMismatchError(
        f"{folder} does not match the config; set:\n  " + "\n  ".join(wrong))


def load_encoder_weights(model: S4ECA, config: ml_collections.ConfigDict, params: Any,
                         skip: Sequence[str] = ()):
  """Fills the frozen encoders of `params` from config.{image,text}_encoder.checkpoint.

  Adapter leaves inside the encoders keep their values from `params`. An encoder with no
  checkpoint keeps its random init only when config.random_init_encoders is True.
  skip: encoders whose weights come from elsewhere (an export, config.init_from).
  Returns (params, [one summary line per encoder]).
  """
  params, reports = dict(params), []
  for name in ("image_encoder", "text_encoder"):
    if name in skip:
      continue
    cfg = config[name]
    if cfg.checkpoint is None:
      if not config.random_init_encoders:
        raise ValueError(
            f"config.{name}.checkpoint is not set. Point it at a Hugging Face model folder "
            "(config.json + model.safetensors, saved with save_pretrained), or set "
            "config.random_init_encoders=True to train on frozen random encoders (tests, demos).")
      reports.append(f"{name}: random init (config.random_init_encoders=True)")
      continue
    module = getattr(model, name)
    tensors = hf_weights.read_checkpoint(cfg.checkpoint)
    _check_architecture(module, cfg.checkpoint, cfg.kind, tensors, name)
    params[name], report = hf_weights.load_params(
        module, cfg.checkpoint, cfg.kind, params=params[name], tensors=tensors)
    reports.append(f"{name}: {report.summary()} from {cfg.checkpoint}")
  return params, reports
