r"""Parameter table of an S4ECA config: frozen encoders, adapters, decoder, per module.

    python -m s4eca_jax.param_table --config configs/rrsisd.py
    python -m s4eca_jax.param_table --config configs/rrsisd.py:variant=tiny \
        --config.model.visual_adapter.width=64

Shapes come from jax.eval_shape of the model's init: nothing is allocated or downloaded.
"Adapters as % of encoder params" is the paper's 2.4% budget (decoder excluded).
Names with numbers are folded: "block_*" (x12) sums all blocks.
"""

from __future__ import annotations

import collections
import re

from absl import flags
from ml_collections import config_flags

from s4eca_jax import cli, partition
from s4eca_jax.models import s4eca

# Which part of the model a parameter belongs to (first match wins).
GROUPS = (
    ("adapters", r"image_encoder/block_\d+/adapter/.*|textual_adapter/.*|sentence_proxy/.*"),
    ("encoders", r"(image|text)_encoder/.*"),
    ("decoder", r"decoder/.*"),
)
_VISUAL_ADAPTER = r"image_encoder/block_\d+/adapter/.*"


def group_of(path: str) -> str:
  group = next((name for name, pattern in GROUPS if re.fullmatch(pattern, path)), None)
  if group is None:
    raise ValueError(f"Parameter {path} belongs to no group of s4eca_jax.param_table.GROUPS.")
  return group


def summary(params) -> dict[str, int]:
  """Parameter counts: {"encoders", "adapters", "decoder", "total"}."""
  counts = collections.Counter()
  for path, leaf in partition.flatten(params).items():
    counts[group_of(path)] += partition.count_params(leaf)
  counts["total"] = sum(counts.values())
  return dict(counts)


def adapter_percent(counts: dict[str, int]) -> float:
  return 100.0 * counts["adapters"] / counts["encoders"]


def _row_key(path: str) -> tuple[str, str]:
  """(folded row name, the instance it came from): block_3 and block_7 share "block_*"."""
  parts = path.split("/")
  depth = 4 if re.fullmatch(_VISUAL_ADAPTER, path) else 2
  instance = "/".join(parts[:depth])
  return re.sub(r"_\d+(?=/|_|$)", "_*", instance), instance


def table(params, rules) -> str:
  """The printed table: one row per (folded) module, then the totals."""
  mask = partition.flatten(partition.trainable_mask(params, rules))
  rows = collections.defaultdict(lambda: [0, set(), set()])  # params, instances, train?
  for path, leaf in partition.flatten(params).items():
    name, instance = _row_key(path)
    row = rows[(group_of(path), name)]
    row[0] += partition.count_params(leaf)
    row[1].add(instance)
    row[2].add("train" if mask[path] else "frozen")
  counts = summary(params)
  lines = [f"{'module':<52}{'params':>14}  trainable"]
  for group in ("encoders", "adapters", "decoder"):
    lines.append(f"{group}: {counts.get(group, 0):,}")
    for (row_group, name), (count, instances, train) in sorted(rows.items()):
      if row_group == group:
        label = f"  {name}" + (f" (x{len(instances)})" if len(instances) > 1 else "")
        lines.append(f"{label:<52}{count:>14,}  {'/'.join(sorted(train))}")
  trainable = partition.count_params(
      [leaf for path, leaf in partition.flatten(params).items() if mask[path]])
  lines += [
      "",
      f"{'encoder params (frozen)':<52}{counts['encoders']:>14,}",
      f"{'adapter params (textual + visual)':<52}{counts['adapters']:>14,}",
      f"{'adapters as % of encoder params':<52}{adapter_percent(counts):>13.2f}%",
      f"{'decoder params':<52}{counts.get('decoder', 0):>14,}",
      f"{'trainable params (config.trainable)':<52}{trainable:>14,}",
      f"{'total params':<52}{counts['total']:>14,}",
  ]
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: modules import each other)."""
  cli.define_config()


def main(argv) -> None:
  del argv
  params = s4eca.abstract_params(FLAGS.config)
  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  print(f"S4ECA parameters for {filename} (shapes from jax.eval_shape, nothing loaded)\n")
  print(table(params, FLAGS.config.trainable))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
