"""CLI: load a Hugging Face checkpoint folder into our Flax encoder and report on it.

    python -m s4eca_jax.inspect_checkpoint DIR [--tower text] [--sentences "a" "b" ...]

Prints what was loaded (tensors, ignored keys), parameter counts per top-level module,
and, for text encoders given sentences, the cosine similarity of their sentence vectors.
"""

from __future__ import annotations

import argparse
import collections

import flax
import jax.numpy as jnp
import numpy as np

from s4eca_jax.models import hf_weights


def parameter_counts(params) -> dict[str, int]:
  counts = collections.Counter()
  for path, leaf in flax.traverse_util.flatten_dict(params).items():
    counts[path[0]] += int(np.prod(leaf.shape))
  return dict(counts)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("folder", help="HF model folder: config.json + model.safetensors")
  parser.add_argument("--tower", choices=["vision", "text"],
                      help="which tower of a CLIPModel folder to load")
  parser.add_argument("--sentences", nargs="*", default=[],
                      help="text encoders: sentences whose sentence vectors to compare")
  parser.add_argument("--max_length", type=int, default=22, help="tokenizer length")
  args = parser.parse_args(argv)

  pretrained = hf_weights.load_pretrained(args.folder, tower=args.tower,
                                          max_length=args.max_length)
  print(f"{type(pretrained.module).__name__} ({pretrained.kind}) from {args.folder}")
  print(pretrained.report.summary())
  if pretrained.report.ignored:
    print("ignored:", ", ".join(pretrained.report.ignored))
  counts = parameter_counts(pretrained.params)
  print(f"parameters: {sum(counts.values()):,}")
  for name, count in counts.items():
    print(f"  {name:<20} {count:>12,}")
  if args.sentences:
    if pretrained.tokenizer is None:
      parser.error("--sentences needs a text encoder folder with tokenizer files")
    batch = pretrained.tokenizer(args.sentences)
    out = pretrained.module.apply({"params": pretrained.params},
                                  jnp.asarray(batch["input_ids"]),
                                  jnp.asarray(batch["attention_mask"]))
    vectors = np.asarray(out["sentence"])
    vectors = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    similarity = vectors @ vectors.T
    print("cosine similarity of sentence vectors:")
    for i, sentence in enumerate(args.sentences):
      row = " ".join(f"{s:5.2f}" for s in similarity[i])
      print(f"  {row}  {sentence}")


if __name__ == "__main__":
  main()
