"""Frozen ViT image encoders: DINOv2 (with or without registers) and the CLIP vision tower.

One module family: `VisionTransformer(family="dinov2" | "clip", ...)`. Input images are
(B, H, W, 3), already normalised with the encoder's mean/std; H and W are multiples of the
patch size and may differ from the pretraining resolution (position embeddings are
resampled bicubically exactly as Hugging Face does). The output holds the final normed
tokens and the tokens after every block the caller taps.

Token layout: [CLS, registers..., patches (row-major)]; `num_prefix` = 1 + registers.

Adapter hook: blocks listed in `adapter_blocks` (1-based) build `adapter(name="adapter")`
and run it in parallel with the MLP branch:
    x <- x + LayerScale(MLP(n) + adapter_scale * adapter(n, context=..., num_prefix=...,
                                                          grid=(h, w)))
with n = norm2(x). The adapter's parameters live at `block_{k}/adapter/...`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from s4eca_jax.models import layers

FAMILIES = ("dinov2", "clip")


class VisionBlock(nn.Module):
  """Pre-LN transformer block (DINOv2 with LayerScale, CLIP without)."""

  num_heads: int
  mlp_dim: int
  act: str
  layer_norm_eps: float
  layerscale: bool
  adapter: Callable[..., nn.Module] | None = None
  adapter_scale: float = 0.0
  num_prefix: int = 1
  grid: tuple[int, int] = (1, 1)
  attention: str = "xla"
  fused_qkv: bool = False
  norm_residuals: str = "stream"  # layers.NORM_RESIDUALS (VisionTransformer)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, adapter_context=None):
    compact = {"norm1": self.norm_residuals != "stream",
               "norm2": self.norm_residuals == "compact" or (
                   self.norm_residuals == "shared" and self.adapter is not None)}
    norm = lambda name: (layers.LayerNorm if compact[name] else nn.LayerNorm)(
        self.layer_norm_eps, dtype=self.dtype, name=name)
    scale = (lambda name: layers.LayerScale(name=name)) if self.layerscale else (
        lambda name: (lambda y: y))
    y = layers.MultiHeadAttention(self.num_heads, attention=self.attention,
                                  fused_qkv=self.fused_qkv, dtype=self.dtype,
                                  name="attn")(norm("norm1")(x))
    x = x + scale("ls1")(y)
    n = norm("norm2")(x)
    y = layers.Mlp(self.mlp_dim, self.act, dtype=self.dtype, name="mlp")(n)
    if self.adapter is not None:
      a = self.adapter(name="adapter")(
          n, context=adapter_context, num_prefix=self.num_prefix, grid=self.grid)
      y = y + self.adapter_scale * a
    return x + scale("ls2")(y)


class VisionTransformer(nn.Module):
  """ViT encoder. `pretrain_grid` is the side of the stored position-embedding grid."""

  family: str
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  pretrain_grid: int
  num_registers: int = 0
  layer_norm_eps: float = 1e-6
  act: str | None = None  # default: "gelu" for dinov2, "quick_gelu" for clip
  pos_antialias: bool | None = None  # default: True with registers (HF), else False
  adapter: Callable[..., nn.Module] | None = None
  adapter_blocks: Sequence[int] = ()
  adapter_scale: float = 0.2
  remat: bool | str = False  # layers.REMAT_POLICIES
  attention: str = "xla"  # layers.ATTENTION_IMPLEMENTATIONS
  fused_qkv: bool = False
  # The residual stream stays f32 while the blocks compute in `dtype`, as under PyTorch
  # autocast: a bf16 stream would be rounded at every residual addition.
  f32_residual: bool = True
  # Which norms over the stream are layers.LayerNorm (same forward; the backward keeps the
  # normed input in `dtype` instead of the stream): "stream" none, "compact" all, "shared"
  # those whose output feeds several ops anyway (norm1: q, k and v; norm2 of a block with
  # an adapter: its MLP and the adapter; the final norm).
  norm_residuals: str = "stream"
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"family={self.family!r}; expected one of {FAMILIES}.")
    if self.norm_residuals not in layers.NORM_RESIDUALS:
      raise ValueError(f"norm_residuals={self.norm_residuals!r}; use one of "
                       f"{layers.NORM_RESIDUALS}.")
    if self.family == "clip" and self.num_registers:
      raise ValueError("CLIP vision towers have no register tokens; set num_registers=0.")
    bad = [b for b in self.adapter_blocks if not 1 <= b <= self.depth]
    if bad:
      raise ValueError(f"adapter_blocks {bad} outside 1..{self.depth} (blocks are 1-based).")
    super().__post_init__()

  @property
  def num_prefix(self) -> int:
    return 1 + self.num_registers

  def grid_size(self, height: int, width: int) -> tuple[int, int]:
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f"Image size {height}x{width} is not a multiple of the patch size "
                       f"{self.patch_size}; resize the input (config.image_size).")
    return height // self.patch_size, width // self.patch_size

  @nn.compact
  def __call__(self, images, *, taps: Sequence[int] = (), adapter_context=None,
               norm_taps: bool = False):
    """images: (B, H, W, 3) -> {"tokens": (B, T, D), "taps": {k: (B, T, D)}}.

    norm_taps: the tapped tokens go through the final norm too, as DINOv2's
    get_intermediate_layers(norm=True) (its raw intermediate tokens have a few very large
    channels).
    """
    is_clip = self.family == "clip"
    batch = images.shape[0]
    grid = self.grid_size(images.shape[1], images.shape[2])
    images = images.astype(self.dtype)
    patches = layers.PatchEmbed(self.width, self.patch_size, use_bias=not is_clip,
                                dtype=self.dtype, name="patch_embed")(images)
    patches = patches.reshape(batch, -1, self.width)  # (B, N, D)

    init = nn.initializers.normal(0.02)
    cls = self.param("cls_token", init, (1, 1, self.width))
    pos = self.param("pos_embedding", init, (1, 1 + self.pretrain_grid**2, self.width))
    antialias = self.num_registers > 0 if self.pos_antialias is None else self.pos_antialias
    pos_grid = pos[:, 1:].reshape(1, self.pretrain_grid, self.pretrain_grid, self.width)
    pos_grid = layers.resize_grid(pos_grid, grid, antialias).reshape(1, -1, self.width)
    pos = jnp.concatenate([pos[:, :1], pos_grid], axis=1).astype(self.dtype)

    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(self.dtype),
                         patches], axis=1) + pos
    if self.num_registers:
      registers = self.param("register_tokens", init, (1, self.num_registers, self.width))
      registers = jnp.broadcast_to(registers, (batch,) + registers.shape[1:]).astype(self.dtype)
      x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
    if is_clip:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="pre_norm")(x)
    x = x.astype(jnp.float32 if self.f32_residual else self.dtype)  # (B, T, D) the stream

    final_norm = (nn.LayerNorm if self.norm_residuals == "stream" else layers.LayerNorm)(
        self.layer_norm_eps, dtype=self.dtype, name="final_norm")
    block_cls = layers.remat_block(VisionBlock, self.remat)
    tapped = {}
    for k in range(1, self.depth + 1):
      with_adapter = self.adapter is not None and k in self.adapter_blocks
      x = block_cls(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim,
          act=self.act or ("quick_gelu" if is_clip else "gelu"),
          layer_norm_eps=self.layer_norm_eps, layerscale=not is_clip,
          adapter=self.adapter if with_adapter else None, adapter_scale=self.adapter_scale,
          num_prefix=self.num_prefix, grid=grid, attention=self.attention,
          fused_qkv=self.fused_qkv, norm_residuals=self.norm_residuals, dtype=self.dtype,
          name=f"block_{k}",
      )(x, adapter_context)
      if k in taps:
        tapped[k] = final_norm(x) if norm_taps else x
    return {"tokens": final_norm(x), "taps": tapped}


def patch_grid(tokens: jax.Array, num_prefix: int, grid: tuple[int, int]) -> jax.Array:
  """(B, T, D) tokens -> (B, h, w, D) patch map (prefix tokens dropped)."""
  return tokens[:, num_prefix:].reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])
