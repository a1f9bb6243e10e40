"""Shared pieces of the S4ECA configs: encoder presets, the model, the trainable rules and
the optimizer. Dataset configs (rrsisd.py, refsegrs.py) start from `s4eca_config`.

Imported as `configs.common`: run commands from the repository root.
"""

import ml_collections
from ml_collections.config_dict import placeholder

VARIANTS = ("full", "tiny")

# Frozen encoders: architecture fields are the module's constructor arguments (see
# s4eca_jax/models/vit.py and text.py); `kind` picks the module and the checkpoint name map.
DINOV2_B14_REG4 = dict(  # HF facebook/dinov2-with-registers-base
    kind="dinov2", width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=14,
    pretrain_grid=37, num_registers=4, layer_norm_eps=1e-6, remat=False)
CLIP_B16_TEXT = dict(  # HF openai/clip-vit-base-patch16, text tower + text_projection
    kind="clip_text", vocab_size=49408, width=512, depth=12, num_heads=8, mlp_dim=2048,
    max_positions=77, projection_dim=512, eos_token_id=2, layer_norm_eps=1e-5,
    act="quick_gelu", remat=False)
DINOV2_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet

TINY_VIT = dict(
    kind="dinov2", width=32, depth=4, num_heads=2, mlp_dim=64, patch_size=8, pretrain_grid=4,
    num_registers=2, layer_norm_eps=1e-6, remat=False)
TINY_CLIP_TEXT = dict(CLIP_B16_TEXT, width=32, depth=2, num_heads=2, mlp_dim=64,
                      projection_dim=32)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"variant=tiny,foo=1" -> ConfigDict over `defaults`; unknown keys are errors."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"Config argument {item!r}: expected key=value with key in "
                       f"{sorted(defaults)}, e.g. configs/rrsisd.py:variant=tiny.")
    parsed[key] = type(defaults[key])(value)
  return parsed


def s4eca_config(dataset: str, variant: str) -> ml_collections.ConfigDict:
  """S4ECA with DINOv2-B/14-reg4 at 448 and CLIP B/16 text ("full"), or a tiny model."""
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}; expected one of {VARIANTS}.")
  tiny = variant == "tiny"
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data.
  config.dataset = dataset  # TFDS builder name
  config.data_dir = placeholder(str)  # TFDS data_dir holding the built dataset
  config.image_size = 64 if tiny else 448
  config.max_length = 22  # 20 expression tokens + the tokenizer's 2 specials
  config.image_mean, config.image_std = DINOV2_MEAN_STD
  config.batch_size = 4 if tiny else 32
  config.eval_batch_size = 4 if tiny else 64
  config.num_epochs = 1 if tiny else 40

  # Frozen encoders; checkpoint: a HF model folder (save_pretrained) or None.
  config.image_encoder = dict(TINY_VIT if tiny else DINOV2_B14_REG4, checkpoint=placeholder(str))
  config.text_encoder = dict(TINY_CLIP_TEXT if tiny else CLIP_B16_TEXT,
                             checkpoint=placeholder(str))
  config.random_init_encoders = tiny  # True only for tests/demos: no checkpoint needed

  # Model: every numbered design choice of SPEC.md "Model" is a field.
  config.model = ml_collections.ConfigDict()
  config.model.compute_dtype = "auto"  # bf16 on GPU/TPU, f32 on CPU; params stay f32
  config.model.language_guidance = True  # False: image path and decoder see zeros, not text
  config.model.textual_adapter = dict(
      enabled=True,  # False: proxies = Dense(sentence vector), one proxy
      blocks=(1, 2) if tiny else (4, 8, 12),  # read the word tokens after these text blocks
      num_queries=4 if tiny else 8, width=16 if tiny else 64, num_heads=2 if tiny else 4)
  config.model.visual_adapter = dict(
      blocks=(2, 4) if tiny else (2, 4, 6, 8, 10, 12),  # 1-based image blocks
      width=16 if tiny else 108,  # r: adapters = 2.42% of the encoders (params CLI)
      scale=0.2,  # s in x <- x + LS(MLP(n) + s * A(n, P))
      kernel_sizes=(3, 5, 7),  # 2. depthwise kernels of the K branches
      dense_connectivity=True,  # 2. branch k also sees branches < k
      scale_selection=True,  # 3. False: uniform 1/K
      spatial_selection=True,  # 4. False: no spatial maps
      spatial_kernel=7,  # 4. conv over [cosine maps ; mean/max per branch], standardised over space
      cross_attention=True,  # 5. refinement by attention to the proxies
      num_heads=2 if tiny else 4)
  config.model.decoder = dict(
      taps=(2, 3) if tiny else (4, 8),  # image blocks; the final norm is always added
      width=32 if tiny else 256, num_layers=2 if tiny else 3, num_heads=4 if tiny else 8,
      mlp_dim=64 if tiny else 1024, sentence_gate=True,
      projector_dims=(16, 16) if tiny else (128, 64),  # one x2 upsampling stage each
      coordinate_freqs=0,  # > 0: cosine bases of x and y joined to the projector
      pixel_dim=0,  # > 0: the pixel path, a conv stem scored against the projector
      norm_groups=4 if tiny else 32)

  config.loss = dict(bce_weight=1.0, dice_weight=1.0)

  # Trainable split: (regex on "/"-joined param path, "train" | "freeze"), first match wins,
  # every parameter must match a rule.
  config.trainable = (
      (r"image_encoder/block_\d+/adapter/.*", "train"),
      (r"(image|text)_encoder/.*", "freeze"),
      (r"(textual_adapter|sentence_proxy)/.*", "train"),
      (r"decoder/.*", "train"),
  )
  config.optimizer = dict(
      lr=3e-3 if tiny else 1e-4, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8,
      clip_norm=1.0, schedule="cosine",  # or "step"
      warmup_steps=0 if tiny else 500, end_lr_ratio=0.0,  # cosine
      step_boundaries=(0.7, 0.9), step_decay=0.1)  # step: fractions of the run

  # Run: mesh, schedule of logs / evaluations / checkpoints (steps), input workers.
  config.mesh = (("data", -1), ("fsdp", 1))  # -1: all remaining devices
  config.fsdp_min_size = 2**18  # params with at least this many elements split over fsdp
  config.distributed = False  # True on multi-host TPU pods / multi-node GPU
  config.tokenizer = placeholder(str)  # tokenizer folder; default: text_encoder.checkpoint
  config.total_steps = placeholder(int)  # default: num_epochs x steps per epoch
  config.log_every = 10 if tiny else 50
  config.eval_every = 0 if tiny else 2000  # 0: only at the end; < 0: never
  config.eval_split = "val"  # evaluations during training; the best checkpoint by its oIoU
  config.checkpoint_every = 0 if tiny else 1000  # 0: only at the end (and at evaluations)
  config.keep_checkpoints = 3  # the latest N, plus the best by val oIoU
  config.stop_after_steps = 0  # > 0: stop there with a checkpoint (time-boxed jobs)
  config.data_workers = 0 if tiny else 8  # grain worker processes for decoding
  config.flip_probability = 0.0  # horizontal flips (left/right words swapped with them)
  config.mask_probability = 0.5  # prediction = sigmoid(logit) > this
  return config
