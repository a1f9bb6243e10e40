"""Benchmark: how far the bf16 model's logits are from the f32 model's, same params.

    python bench/bf16_agreement.py --config configs/rrsisd.py --batch_size 1
    python bench/bf16_agreement.py --config configs/rrsisd.py:variant=tiny --batch_size 4

Random frozen encoders; every all-zero leaf (biases, the adapters' zero-initialised "up"
and spatial conv) replaced by N(0, 0.5^2) noise, so the adapters are live. Runs the f32
model, then bf16 compute with model.f32_residual on and off, and prints per run: logits
max and mean |bf16 - f32| (absolute and as a fraction of the f32 logits' std), the share
of pixels whose mask (logit > 0) agrees, and the relative error ||bf16 - f32|| / ||f32||
of the image encoder's final tokens. --grads also compares the gradients of the training
loss (against random masks) with respect to the trainable params, f32 against bf16 with the
f32 stream and each model.norm_residuals ("stream": autodiff of the norms keeps the f32
stream; "shared", "compact": some or all keep their normed input in bf16 instead): the
relative error ||bf16 - f32|| / ||f32|| over all trainable params, and the median and
largest of it per leaf. --depth N keeps N blocks of each encoder (and the adapter, tap and
text-adapter blocks that fit), to make the full width affordable on CPU. Run from the
repository root.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from s4eca_jax import losses, partition, run_setup
from s4eca_jax.models import s4eca


def inputs(config, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  side, length = config.image_size, config.max_length
  lengths = rng.integers(4, length, batch_size)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, config.text_encoder.vocab_size - 1, (batch_size, length)) * mask
  ids[np.arange(batch_size), lengths - 1] = config.text_encoder.vocab_size - 1  # CLIP's EOT
  return (jnp.asarray(rng.normal(size=(batch_size, side, side, 3)), jnp.float32),
          jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))


def shrink(config, depth):
  """Keeps `depth` blocks of each encoder and the adapter/tap blocks within them."""
  config.image_encoder.depth = config.text_encoder.depth = depth
  va, ta, dec = config.model.visual_adapter, config.model.textual_adapter, config.model.decoder
  va.blocks = tuple(b for b in va.blocks if b <= depth) or (depth,)
  ta.blocks = tuple(b for b in ta.blocks if b <= depth) or (depth,)
  dec.taps = tuple(b for b in dec.taps if b < depth) or (1,)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/rrsisd.py", help="config[:arg]")
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--depth", type=int, default=0, help="> 0: encoder blocks kept")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--grads", action="store_true", help="also compare the gradients")
  args = parser.parse_args()

  config = run_setup.config_from_file(args.config)
  config.random_init_encoders = True
  if args.depth:
    shrink(config, args.depth)
  config.model.compute_dtype = "float32"
  model = s4eca.build_model(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(args.seed),
                               *s4eca.example_inputs(config))["params"]
  params = partition.perturb_zero_leaves(params, args.seed + 3)
  batch = inputs(config, args.batch_size, args.seed)

  def run(model, proxies=None):
    """(logits, image-encoder tokens given `proxies` (default: this model's), proxies, s)."""
    start = time.time()
    out, state = jax.jit(lambda p, *x: model.apply({"params": p}, *x, mutable="intermediates"))(
        params, *batch)
    own_proxies = state["intermediates"]["proxies"][0]
    tokens = jax.jit(lambda p, images, context: model.image_encoder.apply(
        {"params": p}, images, adapter_context=context)["tokens"])(
            params["image_encoder"], batch[0], own_proxies if proxies is None else proxies)
    return (np.asarray(out["logits"], np.float64), np.asarray(tokens, np.float64),
            own_proxies, time.time() - start)

  logits, tokens, proxies, seconds = run(model)
  scale = float(logits.std())
  print(f"backend {jax.default_backend()}, {args.config} depth={config.image_encoder.depth} "
        f"batch {args.batch_size}: f32 logits std {scale:.4f} ({seconds:.0f} s)", flush=True)
  for f32_residual in (True, False):
    config.model.compute_dtype = "bfloat16"
    config.model.f32_residual = f32_residual
    # The image encoder is compared on the f32 model's proxies: its own error alone.
    ours, our_tokens, _, seconds = run(s4eca.build_model(config), proxies)
    error = np.abs(ours - logits)
    row = dict(max_abs=error.max(), mean_abs=error.mean(), max_over_std=error.max() / scale,
               mean_over_std=error.mean() / scale,
               mask_agreement=np.mean((ours > 0) == (logits > 0)),
               tokens_rel_error=np.linalg.norm(our_tokens - tokens) / np.linalg.norm(tokens))
    print(f"bf16, f32_residual={f32_residual} ({seconds:.0f} s): "
          + json.dumps({k: round(float(v), 5) for k, v in row.items()}), flush=True)
  if args.grads:
    compare_grads(config, params, batch, args.seed)


def compare_grads(config, params, batch, seed):
  """Gradients of the training loss for the trainable params: f32 against bf16 compute."""
  trainable, frozen = partition.split(
      params, partition.trainable_mask(params, config.trainable))
  side = config.image_size
  masks = jnp.asarray(np.random.default_rng(seed + 1).random((batch[0].shape[0], side, side))
                      < 0.3, jnp.float32)

  def grads(model):
    def loss(t, frozen, masks, *batch):
      out = model.apply({"params": partition.merge(t, frozen)}, *batch)
      return losses.segmentation_loss(out["logits"], masks)[0]
    start = time.time()  # everything an argument: closed-over arrays would be folded in
    flat = partition.flatten(jax.jit(jax.grad(loss))(trainable, frozen, masks, *batch))
    return {k: np.asarray(v, np.float64) for k, v in flat.items()}, time.time() - start

  config.model.compute_dtype = "float32"
  reference, seconds = grads(s4eca.build_model(config))
  norm = lambda tree: np.sqrt(sum(float(np.sum(v**2)) for v in tree.values()))
  print(f"f32 gradients: {len(reference)} trainable leaves, norm {norm(reference):.4g} "
        f"({seconds:.0f} s)", flush=True)
  config.model.compute_dtype, config.model.f32_residual = "bfloat16", True
  for norm_residuals in ("stream", "shared", "compact"):
    config.model.norm_residuals = norm_residuals
    ours, seconds = grads(s4eca.build_model(config))
    diff = {k: ours[k] - reference[k] for k in reference}
    per_leaf = [np.linalg.norm(diff[k]) / np.linalg.norm(reference[k]) for k in reference
                if np.linalg.norm(reference[k]) > 0]
    row = dict(rel_error=norm(diff) / norm(reference), leaf_median=np.median(per_leaf),
               leaf_max=np.max(per_leaf))
    print(f"bf16 gradients, norm_residuals={norm_residuals} ({seconds:.0f} s): "
          + json.dumps({k: round(float(v), 5) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
  main()
