"""Parity of our Flax encoders with Hugging Face's PyTorch models on the same weights.

Each test builds a tiny random HF model, saves it with save_pretrained, loads the folder
with hf_weights.load_pretrained and compares final tokens, tapped blocks and pooled
vectors in f32 (max abs error < 1e-4).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from s4eca_jax.models import hf_weights, layers, text, vit  # pylint: disable=g-import-not-at-top

TOL = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)


def _max_err(ours, theirs):
  return float(np.abs(np.asarray(ours, np.float32) - theirs.detach().numpy()).max())


def _save(model, tmp_path):
  model.eval().save_pretrained(tmp_path)
  return str(tmp_path)


def _nchw_to_nhwc(images):
  return jnp.asarray(images.transpose(0, 2, 3, 1))


def _randomise_layerscale(model):
  # HF initialises LayerScale to a constant (1.0); random values make the test see it.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lambda1" in name or "register_tokens" in name or "mask_token" in name:
        p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("registers,image_hw", [
    (0, (28, 28)),  # native grid: no interpolation
    (0, (42, 70)),  # 2x2 -> 3x5: bicubic, as HF Dinov2
    (2, (28, 28)),
    (2, (70, 42)),  # registers: antialiased bicubic, as HF Dinov2WithRegisters
    (2, (14, 14)),  # downsampled grid
])
def test_dinov2_parity(tmp_path, registers, image_hw):
  torch.manual_seed(0)
  common = dict(TINY, image_size=28, patch_size=14, layerscale_value=0.5)
  if registers:
    model = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
  _randomise_layerscale(model)
  pretrained = hf_weights.load_pretrained(_save(model, tmp_path))
  assert pretrained.module.num_registers == registers
  images = np.random.RandomState(0).randn(2, 3, *image_hw).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(images), output_hidden_states=True)
  out = pretrained.module.apply({"params": pretrained.params}, _nchw_to_nhwc(images),
                                taps=(1, 2, 3))
  assert out["tokens"].shape == ref.last_hidden_state.shape
  assert _max_err(out["tokens"], ref.last_hidden_state) < TOL
  for k in (1, 2, 3):
    assert _max_err(out["taps"][k], ref.hidden_states[k]) < TOL
  assert _max_err(out["tokens"][:, 0], ref.pooler_output) < TOL


def _clip_config(**text_overrides):
  return transformers.CLIPConfig(
      text_config=dict(TINY, vocab_size=99, max_position_embeddings=16, **text_overrides),
      vision_config=dict(TINY, image_size=32, patch_size=8), projection_dim=24)


@pytest.mark.parametrize("image_hw", [(32, 32), (48, 40)])
def test_clip_vision_parity(tmp_path, image_hw):
  torch.manual_seed(0)
  model = transformers.CLIPModel(_clip_config())
  pretrained = hf_weights.load_pretrained(_save(model, tmp_path), tower="vision")
  assert pretrained.module.family == "clip"
  images = np.random.RandomState(1).randn(2, 3, *image_hw).astype(np.float32)
  interpolate = image_hw != (32, 32)
  with torch.no_grad():
    ref = model.vision_model(torch.from_numpy(images), output_hidden_states=True,
                             interpolate_pos_encoding=interpolate)
  out = pretrained.module.apply({"params": pretrained.params}, _nchw_to_nhwc(images),
                                taps=(1, 3))
  # HF's last_hidden_state is the last block's output; post_layernorm is applied to CLS only.
  assert _max_err(out["taps"][3], ref.last_hidden_state) < TOL
  assert _max_err(out["taps"][1], ref.hidden_states[1]) < TOL
  assert _max_err(out["tokens"][:, 0], ref.pooler_output) < TOL


def test_clip_vision_model_folder(tmp_path):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      **TINY, image_size=32, patch_size=16))
  pretrained = hf_weights.load_pretrained(_save(model, tmp_path))
  images = np.random.RandomState(2).randn(1, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(images))
  out = pretrained.module.apply({"params": pretrained.params}, _nchw_to_nhwc(images))
  assert _max_err(out["tokens"][:, 0], ref.pooler_output) < TOL


def _padded_ids(rng, lengths, vocab, length, pad_id, bos=None, eos=None):
  ids = np.full((len(lengths), length), pad_id, np.int64)
  mask = np.zeros((len(lengths), length), np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.randint(3, vocab - 3, size=n)
    if bos is not None:
      ids[row, 0] = bos
    if eos is not None:
      ids[row, n - 1] = eos
    mask[row, :n] = 1
  return ids, mask


@pytest.mark.parametrize("legacy_eos", [True, False])
def test_clip_text_parity(tmp_path, legacy_eos):
  torch.manual_seed(0)
  # Legacy configs (eos_token_id=2) pool at argmax(ids); newer ones at the first EOS.
  eos = 98 if legacy_eos else 50
  model = transformers.CLIPModel(_clip_config(
      eos_token_id=2 if legacy_eos else eos, bos_token_id=1, pad_token_id=0))
  pretrained = hf_weights.load_pretrained(_save(model, tmp_path), tower="text")
  ids, mask = _padded_ids(np.random.RandomState(0), [5, 11, 16], 90, 16, pad_id=0, bos=1, eos=eos)
  with torch.no_grad():
    ref_text = model.text_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                output_hidden_states=True)
    ref_sentence = model.get_text_features(torch.from_numpy(ids),
                                           attention_mask=torch.from_numpy(mask))
  out = pretrained.module.apply({"params": pretrained.params}, jnp.asarray(ids),
                                jnp.asarray(mask), taps=(2,))
  assert _max_err(out["tokens"], ref_text.last_hidden_state) < TOL
  assert _max_err(out["taps"][2], ref_text.hidden_states[2]) < TOL
  ref_sentence = getattr(ref_sentence, "pooler_output", ref_sentence)
  assert out["sentence"].shape == (3, 24)
  assert _max_err(out["sentence"], ref_sentence) < TOL


def test_clip_text_model_without_projection(tmp_path):
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      **TINY, vocab_size=99, max_position_embeddings=16))
  pretrained = hf_weights.load_pretrained(_save(model, tmp_path))
  assert pretrained.module.projection_dim is None
  ids, mask = _padded_ids(np.random.RandomState(1), [4, 9], 90, 12, pad_id=0, eos=98)
  with torch.no_grad():
    ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  out = pretrained.module.apply({"params": pretrained.params}, jnp.asarray(ids), jnp.asarray(mask))
  assert _max_err(out["tokens"], ref.last_hidden_state) < TOL
  assert _max_err(out["sentence"], ref.pooler_output) < TOL


def test_bert_parity_with_padding(tmp_path):
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(
      **TINY, vocab_size=99, max_position_embeddings=32, type_vocab_size=2))
  pretrained = hf_weights.load_pretrained(_save(model, tmp_path), pooling="mean")
  ids, mask = _padded_ids(np.random.RandomState(0), [3, 12, 7], 99, 12, pad_id=0)
  types = np.zeros_like(ids)
  types[:, 5:] = 1
  with torch.no_grad():
    ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                token_type_ids=torch.from_numpy(types), output_hidden_states=True)
  out = pretrained.module.apply({"params": pretrained.params}, jnp.asarray(ids),
                                jnp.asarray(mask), jnp.asarray(types), taps=(1, 2))
  assert _max_err(out["tokens"], ref.last_hidden_state) < TOL
  for k in (1, 2):
    assert _max_err(out["taps"][k], ref.hidden_states[k]) < TOL
  assert _max_err(out["pooler_output"], ref.pooler_output) < TOL
  weights = torch.from_numpy(mask)[..., None].float()
  ref_mean = (ref.last_hidden_state * weights).sum(1) / weights.sum(1)
  assert _max_err(out["sentence"], ref_mean) < TOL
  cls = pretrained.module.clone(pooling="cls").apply(
      {"params": pretrained.params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  assert _max_err(cls["sentence"], ref.last_hidden_state[:, 0]) < TOL


@pytest.mark.parametrize("in_size,out_size", [(4, 7), (37, 32), (14, 20), (5, 3), (6, 6)])
@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matches_torch(in_size, out_size, antialias):
  grid = np.random.RandomState(0).randn(1, in_size, in_size + 1, 3).astype(np.float32)
  ours = layers.resize_grid(jnp.asarray(grid), (out_size, out_size + 2), antialias)
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(0, 3, 1, 2), size=(out_size, out_size + 2),
      mode="bicubic", align_corners=False, antialias=antialias).permute(0, 2, 3, 1)
  assert _max_err(ours, ref) < 1e-5


class _ZeroAdapter(nn.Module):
  """Test adapter: a learnable scale on the normed tokens, zero at init."""

  @nn.compact
  def __call__(self, tokens, *, context, num_prefix, grid):
    self.sow("intermediates", "seen", (context.shape, num_prefix, grid))
    gain = self.param("gain", nn.initializers.zeros, (tokens.shape[-1],))
    return tokens * gain + 0.0 * context.mean()


def test_vision_adapter_hook_is_parallel_to_mlp():
  base = dict(family="dinov2", width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=4,
              pretrain_grid=2, num_registers=1)
  plain = vit.VisionTransformer(**base)
  hooked = vit.VisionTransformer(**base, adapter=_ZeroAdapter, adapter_blocks=(2,),
                                 adapter_scale=0.5)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 8, 3))
  context = jnp.ones((2, 4, 16))
  variables = hooked.init(jax.random.PRNGKey(1), images, adapter_context=context)
  params = variables["params"]
  assert set(params["block_2"]["adapter"]) == {"gain"}
  assert "adapter" not in params["block_1"]
  encoder_params = {k: v for k, v in params.items()}
  encoder_params["block_2"] = {k: v for k, v in params["block_2"].items() if k != "adapter"}
  ref = plain.apply({"params": encoder_params}, images)["tokens"]
  out, state = hooked.apply({"params": params}, images, adapter_context=context,
                            mutable=["intermediates"])
  np.testing.assert_allclose(out["tokens"], ref, atol=1e-6)  # zero adapter: identity
  assert state["intermediates"]["block_2"]["adapter"]["seen"][0] == ((2, 4, 16), 2, (3, 2))
  params["block_2"]["adapter"]["gain"] = jnp.ones((16,))
  changed = hooked.apply({"params": params}, images, adapter_context=context)["tokens"]
  assert float(jnp.abs(changed - ref).max()) > 1e-3


class _CountingTextAdapter(nn.Module):
  """Test adapter: carries a running sum of mean-pooled tokens, leaves tokens unchanged."""

  @nn.compact
  def __call__(self, tokens, attention_mask, state):
    pooled = text.masked_mean(tokens, attention_mask)
    return tokens, pooled if state is None else state + pooled


def test_text_adapter_hook_after_blocks():
  encoder = text.BertEncoder(vocab_size=50, width=16, depth=3, num_heads=2, mlp_dim=32,
                             max_positions=16, adapter=_CountingTextAdapter,
                             adapter_blocks=(1, 3))
  ids = jnp.arange(12).reshape(2, 6) + 3
  mask = jnp.array([[1, 1, 1, 0, 0, 0], [1] * 6])
  variables = encoder.init(jax.random.PRNGKey(0), ids, mask)
  out = encoder.apply(variables, ids, mask, taps=(1, 3))
  expected = text.masked_mean(out["taps"][1], mask) + text.masked_mean(out["taps"][3], mask)
  np.testing.assert_allclose(out["adapter_state"], expected, atol=1e-6)


def test_remat_and_bf16_run():
  encoder = vit.VisionTransformer(family="clip", width=16, depth=2, num_heads=2, mlp_dim=32,
                                  patch_size=4, pretrain_grid=2, remat=True, dtype=jnp.bfloat16)
  images = jnp.ones((1, 8, 8, 3))
  variables = encoder.init(jax.random.PRNGKey(0), images)
  grads = jax.grad(lambda x: encoder.apply(variables, x)["tokens"].astype(jnp.float32).sum())(images)
  assert grads.shape == images.shape and bool(jnp.isfinite(grads).all())
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32  # params stay f32


def test_bad_configs_raise_clear_errors():
  with pytest.raises(ValueError, match="1-based"):
    vit.VisionTransformer(family="dinov2", width=8, depth=2, num_heads=2, mlp_dim=8,
                          patch_size=4, pretrain_grid=2, adapter_blocks=(0,))
  encoder = vit.VisionTransformer(family="dinov2", width=8, depth=1, num_heads=2, mlp_dim=8,
                                  patch_size=4, pretrain_grid=2)
  with pytest.raises(ValueError, match="multiple of the patch size"):
    encoder.init(jax.random.PRNGKey(0), jnp.ones((1, 10, 8, 3)))



@pytest.mark.parametrize("use_bias", [True, False])
def test_patch_embed_is_the_strided_conv(use_bias):
  """PatchEmbed (one matmul over flattened patches) has nn.Conv's parameters, init and
  output for a (p, p) kernel at stride p: checkpoints load into it unchanged."""
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 42, 3))
  conv = nn.Conv(16, (14, 14), strides=(14, 14), padding="VALID", use_bias=use_bias)
  ours = layers.PatchEmbed(16, 14, use_bias=use_bias)
  params = conv.init(jax.random.PRNGKey(1), images)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), images)) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_array_equal(ours.init(jax.random.PRNGKey(1), images)["params"]["kernel"],
                                params["params"]["kernel"])
  if use_bias:
    params = jax.tree.map(lambda x: x + 0.5, params)  # a non-zero bias must be added
  out = ours.apply(params, images)
  assert out.shape == (2, 2, 3, 16)
  np.testing.assert_allclose(out, conv.apply(params, images), atol=1e-5, rtol=1e-5)


def test_gelu_is_pytorchs_exact_gelu():
  """layers.gelu (the erf form) against torch's exact GELU and jax's erfc form, values and
  derivatives in f32 over [-12, 12]."""
  x = np.linspace(-12, 12, 20001).astype(np.float32)
  ours = np.asarray(layers.gelu(jnp.asarray(x)))
  x_torch = torch.from_numpy(x).requires_grad_()
  theirs = torch.nn.functional.gelu(x_torch)
  theirs.sum().backward()
  np.testing.assert_allclose(ours, theirs.detach().numpy(), atol=2e-6, rtol=0)
  np.testing.assert_allclose(ours, jax.nn.gelu(x, approximate=False), atol=2e-6, rtol=0)
  grad = np.asarray(jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x)))
  np.testing.assert_allclose(grad, x_torch.grad.numpy(), atol=1e-6, rtol=0)
  assert layers.activation("gelu") is layers.gelu
