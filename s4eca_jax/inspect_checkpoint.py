"""CLI: load a Hugging Face checkpoint folder into our Flax encoder and report on it.

    python -m s4eca_jax.inspect_checkpoint DIR [--tower text] [--sentence "a" --sentence "b" ...]

Prints what was loaded (tensors, ignored keys), parameter counts per top-level module,
and, for text encoders given sentences, the cosine similarity of their sentence vectors.
"""

from __future__ import annotations

from absl import flags
import jax.numpy as jnp
import numpy as np

from s4eca_jax import cli, partition, run_setup
from s4eca_jax.models import hf_weights

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: modules import each other)."""
  flags.DEFINE_enum("tower", None, ["vision", "text"],
                    "Which tower of a CLIPModel folder to load.")
  flags.DEFINE_multi_string("sentence", [], "Text encoders: a sentence whose "
                            "sentence vector to compare (repeat the flag).")
  flags.DEFINE_integer("max_length", 22, "Tokenizer length.")


@cli.positional
def main(argv) -> None:
  if len(argv) != 2:
    raise cli.UsageError("give one folder: python -m s4eca_jax.inspect_checkpoint DIR "
                         "(a HF model folder: config.json + model.safetensors)")
  folder, sentences = run_setup.expand_path(argv[1]), FLAGS.sentence

  pretrained = hf_weights.load_pretrained(folder, tower=FLAGS.tower,
                                          max_length=FLAGS.max_length)
  print(f"{type(pretrained.module).__name__} ({pretrained.kind}) from {folder}")
  print(pretrained.report.summary())
  if pretrained.report.ignored:
    print("ignored:", ", ".join(pretrained.report.ignored))
  counts = {name: partition.count_params(tree) for name, tree in pretrained.params.items()}
  print(f"parameters: {sum(counts.values()):,}")
  for name, count in counts.items():
    print(f"  {name:<20} {count:>12,}")
  if sentences:
    if pretrained.tokenizer is None:
      raise cli.UsageError("--sentence needs a text encoder folder with tokenizer files")
    batch = pretrained.tokenizer(sentences)
    out = pretrained.module.apply({"params": pretrained.params},
                                  jnp.asarray(batch["input_ids"]),
                                  jnp.asarray(batch["attention_mask"]))
    vectors = np.asarray(out["sentence"])
    vectors = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    similarity = vectors @ vectors.T
    print("cosine similarity of sentence vectors:")
    for i, sentence in enumerate(sentences):
      row = " ".join(f"{s:5.2f}" for s in similarity[i])
      print(f"  {row}  {sentence}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
