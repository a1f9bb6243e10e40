"""Export a trained run's parameters for PyTorch (or numpy) users.

    python -m s4eca_jax.export --workdir W --out DIR [--checkpoint best|latest|STEP]
        [--format safetensors|npz]

Writes every parameter of the run, frozen encoders and trained parts, to DIR:
  DIR/image_encoder/, DIR/text_encoder/  Hugging Face folders (config.json +
      model.safetensors) that transformers' from_pretrained opens and that the HF classes
      (Dinov2WithRegistersModel, Dinov2Model, CLIPVisionModel, CLIPTextModel(WithProjection),
      BertModel) load with load_state_dict(strict=True);
  DIR/s4eca.safetensors  adapters and decoder in PyTorch layouts (Linear weight (out, in),
      Conv weight (O, I, H, W), norm weight/bias), named as s4eca_jax/torch_reference.py's
      state_dict;
  DIR/export.json  the run's config, the source checkpoint and every tensor's name, shape,
      dtype, layout and checksum;
  DIR/tokenizer/  the run's tokenizer files.
With --format npz the tensors go into model.npz / s4eca.npz under the same names.

Back into JAX: train with --config.init_from=DIR. Into PyTorch:
    from s4eca_jax import torch_reference
    model = torch_reference.S4ECAReference.from_export("DIR")
"""

from __future__ import annotations

import sys
from pathlib import Path

from s4eca_jax import evaluate, export_format, partition, train


def export_run(workdir: str | Path, out: str | Path, checkpoint: str = "best",
               fmt: str = "safetensors") -> dict:
  """Exports checkpoint `checkpoint` of the run in `workdir` to `out`; returns the sidecar."""
  workdir = Path(workdir)
  config, setup, _ = evaluate.load_run(workdir)
  trainable, step = evaluate.restore_trainable(setup, workdir, checkpoint)
  params = partition.merge(trainable, setup.frozen)
  tokenizer = config.get("tokenizer") or config.text_encoder.get("checkpoint")
  source = {"workdir": str(workdir.absolute()), "checkpoint": checkpoint, "step": step,
            "frozen_encoders": {name: config[name].get("checkpoint") or
                                f"random init (seed {config.seed})"
                                for name in export_format.ENCODERS}}
  return export_format.export_params(setup.model, config, params, out, fmt=fmt, source=source,
                                     tokenizer_folder=tokenizer)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  args = flags.FLAGS
  sidecar = export_run(args.workdir, args.out, args.checkpoint, args.format)
  counts = {file: entry["tensors"] for file, entry in sidecar["files"].items()}
  print(f"exported step {sidecar['source']['step']} of {args.workdir} to {args.out}: "
        + ", ".join(f"{file} ({n} tensors)" for file, n in counts.items()))


def _checkpoint(value: str) -> bool:
  return value in ("best", "latest") or value.isdigit()


def run():
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Run directory of s4eca_jax.train.")
  flags.DEFINE_string("out", None, "Folder to write the export to (created if needed).")
  flags.DEFINE_string("checkpoint", "best", "'best' (by val oIoU; the latest when the run "
                      "never evaluated), 'latest' or a step number.")
  flags.DEFINE_enum("format", "safetensors", sorted(export_format.FORMATS),
                    "Tensor file format.")
  flags.register_validator("checkpoint", _checkpoint,
                           "--checkpoint must be 'best', 'latest' or a step number")
  if any(arg in ("-h", "--help", "-?") for arg in sys.argv[1:]):
    # absl's own --help exits with status 1; a help request is not an error.
    print(__doc__)
    print(flags.FLAGS.main_module_help())
    sys.exit(0)
  try:
    flags.FLAGS(sys.argv)
    missing = [f"--{name}" for name in ("workdir", "out") if flags.FLAGS[name].value is None]
    if missing:
      raise flags.Error(f"{' and '.join(missing)} required")
  except flags.Error as error:
    print(f"usage error: {error} (see --help)", file=sys.stderr)
    sys.exit(2)
  app.run(main, argv=sys.argv[:1])


if __name__ == "__main__":
  run()
