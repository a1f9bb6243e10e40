"""Expression tokenisation with Hugging Face `tokenizers`, read from a checkpoint folder.

The data pipeline calls a `TextTokenizer` on a list of expressions and gets fixed-length
int32 arrays (`input_ids`, `attention_mask`) that the text encoders consume. The folder is
the same one the text encoder weights come from (see models/hf_weights.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import tokenizers


@dataclasses.dataclass
class TextTokenizer:
  """Pads/truncates to `max_length` tokens, specials ([CLS]/[SEP], <|startoftext|>...) included."""

  tokenizer: tokenizers.Tokenizer
  max_length: int
  pad_id: int

  def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
    encodings = self.tokenizer.encode_batch(list(texts))
    input_ids = np.array([e.ids for e in encodings], np.int32)  # (B, max_length)
    attention_mask = np.array([e.attention_mask for e in encodings], np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _pad_token(folder: Path) -> str | None:
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = folder / name
    if path.exists():
      token = json.loads(path.read_text()).get("pad_token")
      if isinstance(token, dict):
        token = token.get("content")
      if token:
        return token
  return None


_SLOW_FILES = ("vocab.txt", "vocab.json")


def has_tokenizer(folder: str | Path) -> bool:
  return any((Path(folder) / name).exists() for name in ("tokenizer.json",) + _SLOW_FILES)


def _backend_tokenizer(folder: Path) -> tokenizers.Tokenizer:
  if (folder / "tokenizer.json").exists():
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  if any((folder / name).exists() for name in _SLOW_FILES):
    # Slow-tokenizer files only (vocab.txt for BERT, vocab.json + merges.txt for CLIP):
    # transformers converts them to the same fast `tokenizers` backend.
    import transformers  # pylint: disable=g-import-not-at-top

    return transformers.AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer
  raise FileNotFoundError(
      f"No tokenizer in {folder}: expected tokenizer.json, or vocab.txt (BERT), or "
      "vocab.json + merges.txt (CLIP). Point the config's text checkpoint at a Hugging "
      "Face model folder saved with save_pretrained().")


def load_tokenizer(folder: str | Path, max_length: int) -> TextTokenizer:
  """Tokenizer from a Hugging Face folder, padded and truncated to `max_length`."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"Tokenizer folder {folder} does not exist.")
  tokenizer = _backend_tokenizer(folder)
  pad_token = _pad_token(folder)
  pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
  if pad_id is None:
    pad_id = 0
    pad_token = tokenizer.id_to_token(0)
  tokenizer.enable_truncation(max_length=max_length)
  tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
  return TextTokenizer(tokenizer=tokenizer, max_length=max_length, pad_id=pad_id)
