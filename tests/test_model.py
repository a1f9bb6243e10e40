"""The whole tiny S4ECA (configs/rrsisd.py:variant=tiny): forward, language reaching the
image path, loss, one optimisation step on the trainable tree, overfitting, bf16 compute,
ablations and loading the frozen encoders from Hugging Face folders."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s4eca_jax import losses, optimizer, partition
from s4eca_jax.models import hf_weights, s4eca
from tests import run_fixtures

BATCH = 4


def _config(**model_overrides):
  config = run_fixtures.config("rrsisd", "variant=tiny")
  config.model.update(model_overrides)
  return config


def _batch(config, seed=0):
  """Random images, expressions of different lengths and rectangle masks."""
  rng = np.random.default_rng(seed)
  size, length = config.image_size, config.max_length
  lengths = rng.integers(4, length, BATCH)
  attention_mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  input_ids = rng.integers(1, 49000, (BATCH, length)) * attention_mask
  input_ids[np.arange(BATCH), lengths - 1] = 49407  # CLIP's EOT: the largest id
  masks = np.zeros((BATCH, size, size), np.float32)
  for i in range(BATCH):
    y, x = rng.integers(0, size // 2, 2)
    masks[i, y:y + size // 3, x:x + size // 4] = 1.0
  return {"image": jnp.asarray(rng.normal(size=(BATCH, size, size, 3)), jnp.float32),
          "input_ids": jnp.asarray(input_ids, jnp.int32),
          "attention_mask": jnp.asarray(attention_mask), "mask": jnp.asarray(masks)}


def _other_expression(batch):
  ids = batch["input_ids"]
  return jnp.where(batch["attention_mask"] * (ids < 49407) > 0, (ids * 7 + 3) % 49000 + 1, ids)


@pytest.fixture(scope="module")
def tiny():
  config = _config()
  model = s4eca.build_model(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), *s4eca.example_inputs(config))["params"]
  params, reports = s4eca.load_encoder_weights(model, config, params)
  assert all("random init" in r for r in reports)
  return config, model, params


def _forward(model):
  return jax.jit(lambda params, images, ids, mask: model.apply(
      {"params": params}, images, ids, mask, mutable="intermediates"))


def _adapter_outputs(state, name):
  blocks = state["intermediates"]["image_encoder"]
  return [blocks[b]["adapter"][name][0] for b in sorted(blocks)]


def test_forward_shapes_and_intermediates(tiny):
  config, model, params = tiny
  batch = _batch(config)
  out, state = _forward(model)(params, batch["image"], batch["input_ids"], batch["attention_mask"])
  size = config.image_size
  assert out["logits"].shape == (BATCH, size, size) and out["logits"].dtype == jnp.float32
  assert out["low_res_logits"].shape == (BATCH, size // 2, size // 2)  # 8x8 grid, two x2
  assert set(state["intermediates"]["image_encoder"]) == {"block_2", "block_4"}
  for weights in _adapter_outputs(state, "scale_weights"):
    assert weights.shape == (BATCH, 3, 16)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
  proxies, = state["intermediates"]["proxies"]
  assert proxies.shape == (BATCH, 4, config.image_encoder.width)


def test_language_reaches_the_image_path(tiny):
  config, model, params = tiny
  # Trained-looking adapters: a fresh one (zero up-projection) is the identity, and its
  # spatial maps (zero-initialised conv) are 0.5 everywhere.
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  key = jax.random.PRNGKey(3)
  for path in [p for p in flat if "/adapter/up/" in p or "/spatial_conv/kernel" in p]:
    key, sub = jax.random.split(key)
    flat[path] = 0.5 * jax.random.normal(sub, flat[path].shape)
  params = flax.traverse_util.unflatten_dict(flat, sep="/")

  batch = _batch(config)
  forward = _forward(model)
  out, state = forward(params, batch["image"], batch["input_ids"], batch["attention_mask"])
  other_out, other_state = forward(params, batch["image"], _other_expression(batch),
                                   batch["attention_mask"])
  for name in ("scale_weights", "spatial_maps"):
    for ours, other in zip(_adapter_outputs(state, name), _adapter_outputs(other_state, name)):
      assert float(jnp.abs(ours - other).max()) > 1e-4, name
  assert float(jnp.abs(out["logits"] - other_out["logits"]).max()) > 1e-4

  # The image encoder's own output (not only the decoder) depends on the expression.
  encode = jax.jit(lambda proxies: model.image_encoder.apply(
      {"params": params["image_encoder"]}, batch["image"], adapter_context=proxies)["tokens"])
  tokens = encode(state["intermediates"]["proxies"][0])
  other_tokens = encode(other_state["intermediates"]["proxies"][0])
  assert float(jnp.abs(tokens - other_tokens).max()) > 1e-4


def test_language_guidance_off_sees_no_text(tiny):
  """Blind: two expressions of different lengths give the same logits, bit for bit."""
  config, _, params = tiny
  params = partition.perturb_zero_leaves(params)
  assert all(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(params))
  model = s4eca.build_model(_config(language_guidance=False))
  batch = _batch(config)
  other_batch = _batch(config, seed=5)
  assert np.any(other_batch["attention_mask"].sum(1) != batch["attention_mask"].sum(1))
  forward = _forward(model)
  out, state = forward(params, batch["image"], batch["input_ids"], batch["attention_mask"])
  other, _ = forward(params, batch["image"], other_batch["input_ids"],
                     other_batch["attention_mask"])
  assert not np.any(np.asarray(state["intermediates"]["proxies"][0]))
  assert np.all(np.isfinite(out["logits"]))
  for maps in _adapter_outputs(state, "spatial_maps"):
    assert np.all(np.isfinite(maps))
  np.testing.assert_array_equal(out["logits"], other["logits"])
  # With guidance the same two expressions do change the logits.
  guided = _forward(tiny[1])
  ours, _ = guided(params, batch["image"], batch["input_ids"], batch["attention_mask"])
  theirs, _ = guided(params, batch["image"], other_batch["input_ids"],
                     other_batch["attention_mask"])
  assert float(jnp.abs(ours["logits"] - theirs["logits"]).max()) > 1e-3


# bf16 against f32 logits on the tiny model with live adapters, as a fraction of the f32
# logits' standard deviation (measured: max 0.089, mean 0.025 on CPU).
BF16_MAX_ERROR, BF16_MEAN_ERROR = 0.15, 0.05


def test_bf16_compute_agrees_with_f32(tiny):
  config, _, params = tiny
  params = partition.perturb_zero_leaves(params)
  model = s4eca.build_model(_config(compute_dtype="bfloat16"))
  batch = _batch(config)
  out, _ = _forward(model)(params, batch["image"], batch["input_ids"], batch["attention_mask"])
  reference, _ = _forward(tiny[1])(params, batch["image"], batch["input_ids"],
                                   batch["attention_mask"])
  assert out["logits"].dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  error = np.abs(np.asarray(out["logits"]) - np.asarray(reference["logits"]))
  scale = float(np.std(reference["logits"]))
  assert error.max() <= BF16_MAX_ERROR * scale, (error.max() / scale, error.mean() / scale)
  assert error.mean() <= BF16_MEAN_ERROR * scale, (error.max() / scale, error.mean() / scale)


def test_ablation_configs_build():
  shapes = lambda config: jax.eval_shape(lambda: s4eca.build_model(config).init(
      jax.random.PRNGKey(0), *s4eca.example_inputs(config)))["params"]
  no_text = shapes(_config(textual_adapter=dict(enabled=False)))
  assert "sentence_proxy" in no_text and "textual_adapter" not in no_text
  adapter = shapes(_config(visual_adapter=dict(scale_selection=False, spatial_selection=False,
                                               blocks=(1, 3), width=8)))["image_encoder"]
  assert {k for k, v in adapter.items() if "adapter" in getattr(v, "keys", list)()} == {
      "block_1", "block_3"}
  assert "scale_fc1" not in adapter["block_1"]["adapter"]
  assert adapter["block_1"]["adapter"]["down"]["kernel"].shape == (32, 8)
  with pytest.raises(ValueError, match="compute_dtype"):
    s4eca.build_model(_config(compute_dtype="fp8"))


def test_loss_is_masked_and_weighted():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 8, 8)), jnp.float32)
  masks = jnp.asarray(rng.random((3, 8, 8)) > 0.5, jnp.float32)
  valid = jnp.array([1.0, 1.0, 0.0])
  loss, parts = losses.segmentation_loss(logits, masks, valid)
  loss_2, parts_2 = losses.segmentation_loss(logits[:2], masks[:2])
  np.testing.assert_allclose(loss, loss_2, rtol=1e-6)
  np.testing.assert_allclose(loss, parts["bce"] + parts["dice"], rtol=1e-6)
  weighted, _ = losses.segmentation_loss(logits, masks, valid, bce_weight=2.0, dice_weight=0.5)
  np.testing.assert_allclose(weighted, 2 * parts_2["bce"] + 0.5 * parts_2["dice"], rtol=1e-6)
  perfect, _ = losses.segmentation_loss(40 * (2 * masks - 1), masks)
  assert float(perfect) < 1e-3
  assert float(losses.segmentation_loss(logits, masks, jnp.zeros(3))[0]) == 0.0
  with pytest.raises(ValueError, match="resize the masks"):
    losses.segmentation_loss(logits, masks[:, :4])


@pytest.fixture(scope="module")
def train_setup(tiny):
  """The train step a trainer runs: grads w.r.t. the trainable tree only."""
  config, model, params = tiny
  trainable, frozen = partition.split(params, partition.trainable_mask(params, config.trainable))
  tx, _ = optimizer.make_optimizer(config.optimizer, total_steps=1000)

  @jax.jit
  def step(trainable, opt_state, batch):
    """-> (new trainable, new optimizer state, loss, the gradient this step applied)."""
    def loss_fn(trainable):
      out = model.apply({"params": partition.merge(trainable, frozen)}, batch["image"],
                        batch["input_ids"], batch["attention_mask"])
      return losses.segmentation_loss(out["logits"], batch["mask"], **config.loss)[0]

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss, grads

  return trainable, frozen, tx, step


def _groups(tree):
  """Leaves grouped by module: block_k/adapter, read_k, decoder children..."""
  groups = {}
  for path, leaf in partition.flatten(tree).items():
    parts = path.split("/")
    depth = 3 if parts[0] == "image_encoder" else 2
    groups.setdefault("/".join(parts[:depth]), []).append((path, leaf))
  return groups


def test_one_step_updates_every_trainable_group_and_no_frozen_leaf(tiny, train_setup):
  config, _, params = tiny
  trainable, frozen, tx, step = train_setup
  opt_state = tx.init(trainable)
  opt_paths = {"/".join(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
               for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]}
  frozen_paths = set(partition.flatten(frozen))
  assert frozen_paths and not opt_paths & frozen_paths  # no optimizer state for frozen leaves
  assert set(partition.flatten(trainable)) <= opt_paths

  new_trainable, _, loss, _ = step(trainable, opt_state, _batch(config))
  assert np.isfinite(float(loss))
  new_flat = partition.flatten(new_trainable)
  for group, leaves in _groups(trainable).items():
    assert any(not np.array_equal(new_flat[p], leaf) for p, leaf in leaves), group
  merged = partition.flatten(partition.merge(new_trainable, frozen))
  for path, leaf in partition.flatten(params).items():
    if path in frozen_paths:
      np.testing.assert_array_equal(merged[path], leaf)


@pytest.mark.parametrize("norm_residuals", ["shared", "compact"])
def test_compact_norms_give_autodiffs_gradients(tiny, norm_residuals):
  """model.norm_residuals="compact" (the TPU default at bf16) and "shared" through the whole
  model at f32: the same logits to the bit and the same gradient for every trainable leaf
  as autodiff of nn.LayerNorm, with every adapter live (zero leaves perturbed)."""
  config, model, params = tiny
  params = partition.perturb_zero_leaves(params, seed=5)
  trainable, frozen = partition.split(params, partition.trainable_mask(params, config.trainable))
  batch = _batch(config, seed=4)
  compact_config = config.copy_and_resolve_references()
  compact_config.model.norm_residuals = norm_residuals
  compact = s4eca.build_model(compact_config)
  assert compact.image_encoder.norm_residuals == norm_residuals
  assert model.image_encoder.norm_residuals == "stream"

  def grads(model):
    def loss(trainable, frozen, batch):  # arguments, not constants for XLA to fold
      out = model.apply({"params": partition.merge(trainable, frozen)}, batch["image"],
                        batch["input_ids"], batch["attention_mask"])
      return losses.segmentation_loss(out["logits"], batch["mask"])[0], out["logits"]
    return jax.jit(jax.grad(loss, has_aux=True))(trainable, frozen, batch)

  (ours, our_logits), (reference, logits) = grads(compact), grads(model)
  np.testing.assert_array_equal(our_logits, logits)
  ours, reference = partition.flatten(ours), partition.flatten(reference)
  image_leaves = [p for p in reference if p.startswith("image_encoder/")]
  assert image_leaves and all(np.abs(reference[p]).max() > 0 for p in image_leaves)
  errors = {p: float(np.linalg.norm(ours[p] - want) / np.linalg.norm(want))
            for p, want in reference.items() if np.abs(want).max() > 0}
  assert len(errors) == len(reference)
  # f32 rounding: 8e-8 for the median leaf here; 2.6e-4 for the one most cancelled (the
  # gradient of an attention key kernel, itself 1e-6 of the largest).
  assert np.median(list(errors.values())) < 1e-6 and max(errors.values()) < 1e-3, errors


def test_every_adapter_leaf_has_a_gradient_after_two_steps(tiny, train_setup):
  """Fresh adapters start as the identity (zero "up"), so their inner leaves get no
  gradient at step 0; once "up" has moved, every leaf must."""
  config = tiny[0]
  trainable, _, tx, step = train_setup
  batch = _batch(config, seed=2)
  opt_state = tx.init(trainable)
  for _ in range(3):  # the third step's gradient is taken after two updates
    trainable, opt_state, _, grads = step(trainable, opt_state, batch)
  grads = partition.flatten(grads)
  adapter_paths = [p for p in grads if "/adapter/" in p or p.startswith("textual_adapter/")]
  assert len(adapter_paths) > 40
  dead = [p for p in adapter_paths if not np.any(np.asarray(grads[p]))]
  assert not dead, dead


def test_overfits_a_few_examples(tiny, train_setup):
  config = tiny[0]
  trainable, _, tx, step = train_setup
  batch = _batch(config, seed=1)
  opt_state = tx.init(trainable)
  losses_seen = []
  for _ in range(80):
    trainable, opt_state, loss, _ = step(trainable, opt_state, batch)
    losses_seen.append(float(loss))
  # Falls >= 10x, and to a Dice + BCE small enough that the masks are nearly exact.
  assert losses_seen[-1] < losses_seen[0] / 10 and losses_seen[-1] < 0.05, losses_seen[::10]


# --------------------------------------------------------------------------------------
# Frozen encoders from Hugging Face folders.
# --------------------------------------------------------------------------------------


def test_missing_checkpoint_needs_the_random_init_flag(tiny):
  config, model, params = tiny
  config = _config()
  config.random_init_encoders = False
  with pytest.raises(ValueError, match="random_init_encoders"):
    s4eca.load_encoder_weights(model, config, params)


def test_load_encoder_weights_from_hf_folders(tiny, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, model, params = tiny
  vit_cfg, text_cfg = config.image_encoder, config.text_encoder
  torch.manual_seed(0)
  transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      hidden_size=vit_cfg.width, num_hidden_layers=vit_cfg.depth,
      num_attention_heads=vit_cfg.num_heads, mlp_ratio=vit_cfg.mlp_dim // vit_cfg.width,
      patch_size=vit_cfg.patch_size, image_size=vit_cfg.patch_size * vit_cfg.pretrain_grid,
      num_register_tokens=vit_cfg.num_registers)).save_pretrained(tmp_path / "vit")
  transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.width,
      num_hidden_layers=text_cfg.depth, num_attention_heads=text_cfg.num_heads,
      intermediate_size=text_cfg.mlp_dim, projection_dim=text_cfg.projection_dim,
      eos_token_id=2)).save_pretrained(tmp_path / "text")

  config = _config()
  config.random_init_encoders = False
  config.image_encoder.checkpoint = str(tmp_path / "vit")
  config.text_encoder.checkpoint = str(tmp_path / "text")
  loaded, reports = s4eca.load_encoder_weights(model, config, params)
  assert len(reports) == 2 and "loaded" in reports[0]
  tensors = hf_weights.read_checkpoint(tmp_path / "vit")
  np.testing.assert_allclose(loaded["image_encoder"]["cls_token"].reshape(-1),
                             tensors["embeddings.cls_token"].reshape(-1))
  flat, flat_loaded = partition.flatten(params), partition.flatten(loaded)
  for path, leaf in flat.items():
    if "/adapter/" in path or not path.startswith(("image_encoder", "text_encoder")):
      np.testing.assert_array_equal(flat_loaded[path], leaf)

  config.image_encoder.layer_norm_eps = 1e-5  # the checkpoint says 1e-6
  with pytest.raises(hf_weights.CheckpointMismatchError, match="layer_norm_eps"):
    s4eca.load_encoder_weights(s4eca.build_model(config), config, params)
