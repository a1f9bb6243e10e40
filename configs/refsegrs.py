"""S4ECA on RefSegRS: the RRSIS-D model (DINOv2-B/14-reg4 at 448 + CLIP B/16 text).

    python -m s4eca_jax.train --config configs/refsegrs.py --workdir W \
        --config.data_dir=D --config.image_encoder.checkpoint=dinov2-with-registers-base \
        --config.text_encoder.checkpoint=clip-vit-base-patch16

A tiny model for tests: `--config configs/refsegrs.py:variant=tiny`.
"""

from s4eca_jax import presets


def get_config(arg=None):
  arg = presets.parse_arg(arg, variant="full")
  return presets.s4eca_config("refsegrs", arg.variant)
