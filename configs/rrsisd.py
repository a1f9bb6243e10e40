"""S4ECA on RRSIS-D: DINOv2-B/14 with 4 registers at 448 + CLIP B/16 text, frozen.

    python -m s4eca_jax.train --config configs/rrsisd.py --workdir W \
        --config.data_dir=D --config.image_encoder.checkpoint=dinov2-with-registers-base \
        --config.text_encoder.checkpoint=clip-vit-base-patch16

The checkpoints are Hugging Face model folders (save_pretrained). A tiny model for tests:
`--config configs/rrsisd.py:variant=tiny` (random frozen encoders).
Parameter table: `python -m s4eca_jax.param_table --config configs/rrsisd.py`.
Sweep (get_sweep below): `python -m s4eca_jax.sweep --config configs/rrsisd.py --root R`.
"""

from s4eca_jax import hyper, presets


def get_config(arg=None):
  arg = presets.parse_arg(arg, variant="full")
  return presets.s4eca_config("rrsis_d", arg.variant)


def get_sweep(arg=None):
  """Learning rate sweep: `python -m s4eca_jax.sweep --config configs/rrsisd.py --root R`."""
  del arg  # the same points for every variant
  return hyper.sweep("optimizer.lr", [1e-4, 3e-4])
