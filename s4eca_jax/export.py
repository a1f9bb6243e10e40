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

from pathlib import Path

from absl import flags

from s4eca_jax import cli, export_format, partition, run_setup


def export_run(workdir: str | Path, out: str | Path, checkpoint: str = "best",
               fmt: str = "safetensors") -> dict:
  """Exports checkpoint `checkpoint` of the run in `workdir` to `out`; returns the sidecar."""
  workdir = Path(run_setup.expand_path(workdir))
  config, setup = run_setup.load_run(workdir)
  trainable, step = run_setup.restore_trainable(setup, config, workdir, checkpoint)
  params = partition.merge(trainable, setup.frozen)
  tokenizer = config.get("tokenizer") or config.text_encoder.get("checkpoint")
  source = {"workdir": str(workdir.absolute()), "checkpoint": checkpoint, "step": step,
            "frozen_encoders": {name: config[name].get("checkpoint") or
                                f"random init (seed {config.seed})"
                                for name in export_format.ENCODERS}}
  return export_format.export_params(setup.model, config, params,
                                     run_setup.expand_path(out), fmt=fmt, source=source,
                                     tokenizer_folder=tokenizer)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: modules import each other)."""
  flags.DEFINE_string("workdir", None, "Run directory of s4eca_jax.train.", required=True)
  flags.DEFINE_string("out", None, "Folder to write the export to (created if needed).",
                      required=True)
  flags.DEFINE_string("checkpoint", "best", "'best' (by oIoU on the run's eval_split; the "
                      "latest when the run never evaluated), 'latest' or a step number.")
  flags.DEFINE_enum("format", "safetensors", sorted(export_format.FORMATS),
                    "Tensor file format.")


def main(argv) -> None:
  del argv
  if FLAGS.checkpoint not in ("best", "latest") and not FLAGS.checkpoint.isdigit():
    raise cli.UsageError(f"--checkpoint={FLAGS.checkpoint!r}: use best, latest or a step "
                         "number")
  if not (Path(run_setup.expand_path(FLAGS.workdir)) / "config.json").exists():
    raise cli.UsageError(f"--workdir={FLAGS.workdir}: no config.json there; pass the "
                         "--workdir of a training run")
  sidecar = export_run(FLAGS.workdir, FLAGS.out, FLAGS.checkpoint, FLAGS.format)
  counts = {file: entry["tensors"] for file, entry in sidecar["files"].items()}
  print(f"exported step {sidecar['source']['step']} of {FLAGS.workdir} to {FLAGS.out}: "
        + ", ".join(f"{file} ({n} tensors)" for file, n in counts.items()))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
