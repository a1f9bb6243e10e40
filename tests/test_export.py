"""Export for PyTorch, import back, and the PyTorch reference as the cross-framework oracle.

The trained tiny run (conftest `trained_workdir`: random frozen encoders, 6 steps) is
exported once; the PyTorch reference loads it and must give the JAX logits within 1e-4
(f32, CPU), every HF encoder class must take its folder strictly, and an import back must
reproduce the JAX outputs exactly.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from s4eca_jax import export, export_format, partition, run_setup, sharding, torch_reference
from s4eca_jax.models import hf_weights, s4eca, text
from tests import run_fixtures

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


def _inputs(config, batch=2, seed=0):
  rng = np.random.RandomState(seed)
  images = rng.randn(batch, config.image_size, config.image_size, 3).astype(np.float32)
  mask = np.zeros((batch, config.max_length), np.int32)
  for i, length in enumerate(rng.randint(4, config.max_length, size=batch)):
    mask[i, :length] = 1
  ids = rng.randint(3, 1000, size=mask.shape).astype(np.int32) * mask
  return images, ids, mask


def _jax_logits(config, params, inputs):
  model = s4eca.build_model(config)
  return np.asarray(model.apply({"params": params}, *map(jnp.asarray, inputs))["logits"])


def _torch_logits(reference, inputs):
  with torch.no_grad():
    return reference(*torch_reference.to_torch_inputs(*inputs))["logits"].numpy()


@pytest.fixture(scope="module")
def run(trained_workdir):
  """(config, params of the latest checkpoint, export folder) of the trained tiny run."""
  config, setup = run_setup.load_run(trained_workdir)
  trainable, _ = run_setup.restore_trainable(setup, config, trained_workdir, "latest")
  params = jax.device_get(partition.merge(trainable, setup.frozen))
  folder = trained_workdir / "export"
  export.export_run(trained_workdir, folder, "latest")
  return config, params, folder


@pytest.mark.parametrize("language_guidance", [True, False], ids=["language", "blind"])
def test_reference_matches_jax_on_the_trained_export(run, language_guidance):
  config, params, folder = run
  config = config.copy_and_resolve_references()
  config.model.language_guidance = language_guidance
  reference = torch_reference.S4ECAReference.from_export(folder)
  reference.language_guidance = language_guidance
  inputs = _inputs(config)
  ours, theirs = _jax_logits(config, params, inputs), _torch_logits(reference, inputs)
  assert ours.shape == theirs.shape == (2, config.image_size, config.image_size)
  assert np.abs(ours - theirs).max() < TOL
  # The words matter: other tokens (same lengths) change the logits unless it is blind.
  images, ids, mask = inputs
  other_ids = np.random.RandomState(1).randint(3, 1000, size=mask.shape).astype(np.int32) * mask
  changed = np.abs(_torch_logits(reference, (images, other_ids, mask)) - theirs).max()
  assert (changed > 1e-3) == language_guidance


@pytest.mark.parametrize("overrides", [
    {},
    {"model.textual_adapter.enabled": False, "model.visual_adapter.scale_selection": False,
     "model.visual_adapter.dense_connectivity": False, "model.decoder.sentence_gate": False,
     "model.decoder.pixel_dim": 8, "model.decoder.coordinate_freqs": 2,
     "model.visual_adapter.spatial_standardize": False, "model.decoder.tap_norm": True},
    {"model.language_guidance": False},
], ids=["default", "switches", "blind"])
def test_reference_matches_jax_on_random_params(tmp_path, overrides):
  """Every leaf random (zero-initialised up-projections and spatial convs included), so
  that each adapter and decoder part moves the logits."""
  config = run_fixtures.config("rrsisd", "variant=tiny")
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  model = s4eca.build_model(config)
  params = model.init(jax.random.PRNGKey(0), *s4eca.example_inputs(config))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  export_format.export_params(model, config, params, tmp_path)
  reference = torch_reference.S4ECAReference.from_export(tmp_path)
  inputs = _inputs(config)
  ours = _jax_logits(config, params, inputs)
  assert np.abs(ours - _torch_logits(reference, inputs)).max() < TOL
  assert np.abs(ours).max() > 1.0  # not a vacuous comparison of near-zero maps


def test_encoders_load_strictly_into_hf(run):
  _, _, folder = run
  sidecar = export_format.read_sidecar(folder)
  classes = {name: sidecar["files"][f"{name}/model.safetensors"]["hf_class"]
             for name in export_format.ENCODERS}
  assert classes == {"image_encoder": "Dinov2WithRegistersModel",
                     "text_encoder": "CLIPTextModelWithProjection"}
  for name, cls in classes.items():
    model, info = getattr(transformers, cls).from_pretrained(folder / name,
                                                             output_loading_info=True)
    assert not any(info.values()), info
    model.load_state_dict(torch_reference._torch_tensors(  # pylint: disable=protected-access
        folder / name / "model.safetensors"), strict=True)
  # The text tower without its projection is a CLIPTextModel (no "text_model." prefix).
  text = torch_reference._torch_tensors(  # pylint: disable=protected-access
      folder / "text_encoder" / "model.safetensors")
  del text["text_projection.weight"]
  text = {name.removeprefix("text_model."): tensor for name, tensor in text.items()}
  config = transformers.CLIPTextConfig.from_pretrained(folder / "text_encoder")
  transformers.CLIPTextModel(config).load_state_dict(text, strict=True)


def test_sidecar_documents_every_tensor(run):
  config, params, folder = run
  sidecar = export_format.read_sidecar(folder)
  assert sidecar["source"]["step"] == 6 and sidecar["format"] == "safetensors"
  by_param = {e["param"]: e for e in sidecar["tensors"] if e["param"]}
  assert set(by_param) == set(partition.flatten(params))  # every leaf, once
  down = by_param["image_encoder/block_2/adapter/down/kernel"]
  assert down["name"] == "visual_adapters.block_2.down.weight" and down["trainable"]
  assert down["shape"] == [16, 32] and down["layout"] == "linear weight (out, in)"
  conv = by_param["image_encoder/block_2/adapter/multi_scale/branch_1_depthwise/kernel"]
  assert conv["shape"] == [16, 1, 5, 5] and conv["layout"] == "conv weight (O, I, H, W)"
  qkv = by_param["image_encoder/block_1/attn/query/kernel"]
  assert qkv["name"] == "encoder.layer.0.attention.q_proj.weight" and not qkv["trainable"]
  assert (folder / "tokenizer" / "tokenizer.json").exists()


def test_cli_help_usage_and_npz(run, tmp_path):
  _, params, folder = run
  workdir = folder.parent
  command = [sys.executable, "-m", "s4eca_jax.export"]
  help_run = subprocess.run(command + ["--help"], capture_output=True, text=True, cwd=REPO)
  assert help_run.returncode == 0 and "--checkpoint" in help_run.stdout
  usage = subprocess.run(command + ["--workdir", str(workdir)], capture_output=True,
                         text=True, cwd=REPO)
  assert usage.returncode == 2 and usage.stderr.strip().count("\n") == 0
  assert "--out" in usage.stderr
  out = tmp_path / "npz"
  done = subprocess.run(command + ["--workdir", str(workdir), "--out", str(out),
                                   "--checkpoint", "latest", "--format", "npz"],
                        capture_output=True, text=True, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  # The same tensors as the safetensors export, under the same names.
  for file in ("s4eca", "image_encoder/model", "text_encoder/model"):
    with np.load(out / f"{file}.npz") as npz:
      reference = load_file(folder / f"{file}.safetensors")
      assert set(npz.files) == set(reference)
      for name in reference:
        np.testing.assert_array_equal(npz[name], reference[name])


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_export_import_gives_identical_jax_outputs(run, tmp_path, fmt):
  config, params, folder = run
  if fmt == "npz":
    workdir, folder = folder.parent, tmp_path / "npz"
    export.export_run(workdir, folder, "latest", fmt)
  config = config.copy_and_resolve_references()
  config.seed = 123  # a different random init: frozen and trainable must come from DIR
  mesh = sharding.make_mesh(config.mesh)
  fresh = run_setup.build(config, mesh, None)
  config.init_from = str(folder)
  imported = run_setup.build(config, mesh, None)
  inputs = _inputs(config)
  expected = _jax_logits(config, params, inputs)
  got = _jax_logits(config, jax.device_get(partition.merge(imported.state["params"],
                                                          imported.frozen)), inputs)
  np.testing.assert_array_equal(got, expected)
  without = _jax_logits(config, jax.device_get(partition.merge(fresh.state["params"],
                                                              fresh.frozen)), inputs)
  assert np.abs(without - expected).max() > 1e-3


def _copy(folder, tmp_path):
  target = tmp_path / "copy"
  shutil.copytree(folder, target)
  return target


def _import(config, folder):
  model = s4eca.build_model(config)
  params = model.init(jax.random.PRNGKey(0), *s4eca.example_inputs(config))["params"]
  return export_format.import_params(model, config, params, folder)


def test_corrupted_tensor_is_named(run, tmp_path):
  config, _, folder = run
  folder = _copy(folder, tmp_path)
  file = folder / "s4eca.safetensors"
  tensors = load_file(file)
  tensors["decoder.layer_1.ffn.fc2.weight"][3, 5] += 1.0  # one flipped value, same shape
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(export_format.ExportError,
                     match=r"Tensor decoder\.layer_1\.ffn\.fc2\.weight in .*s4eca\.safetensors "
                           r"does not match the checksum"):
    _import(config, folder)
  file.write_bytes(file.read_bytes()[:1000])  # truncated
  with pytest.raises(hf_weights.CheckpointMismatchError, match=r"s4eca\.safetensors could not "
                                                                r"be read"):
    _import(config, folder)


def test_foreign_files_are_named(run, tmp_path):
  config, _, folder = run
  folder = _copy(folder, tmp_path)
  # A BERT checkpoint where the CLIP text tower should be.
  shutil.copy(run_fixtures.MINILM / "model.safetensors", folder / "text_encoder")
  with pytest.raises(hf_weights.CheckpointMismatchError,
                     match=r"text_model\.embeddings\.token_embedding\.weight"):
    _import(config, folder)
  # An export of a different model: a decoder with fewer layers does not take its file.
  shutil.rmtree(folder)
  folder = _copy(run[2], tmp_path)
  config = config.copy_and_resolve_references()
  config.model.decoder.num_layers = 1
  with pytest.raises(export_format.ExportError,
                     match=r"unexpected tensors:\n  decoder\.layer_1\.cross_attn\.key\.weight"):
    _import(config, folder)


def _random_params(module):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
                      hf_weights.encoder_abstract_params(module))


@pytest.mark.parametrize("use_pooler", [True, False])
def test_bert_export_loads_strictly(tmp_path, use_pooler):
  encoder = text.BertEncoder(vocab_size=60, width=16, depth=2, num_heads=2, mlp_dim=32,
                             max_positions=24, use_pooler=use_pooler)
  params = _random_params(encoder)
  export_format.write_encoder(encoder, "bert", params, tmp_path)
  hf_config = json.loads((tmp_path / "config.json").read_text())
  kwargs = hf_weights.module_kwargs(hf_config, "bert", load_file(tmp_path / "model.safetensors"))
  assert kwargs == {field: getattr(encoder, field) for field in kwargs}  # config round trip
  model = transformers.BertModel(transformers.BertConfig(**hf_config), add_pooling_layer=use_pooler)
  model.load_state_dict(torch_reference._torch_tensors(  # pylint: disable=protected-access
      tmp_path / "model.safetensors"), strict=True)
  np.testing.assert_array_equal(model.encoder.layer[1].attention.self.key.weight.detach(),
                                params["block_2"]["attn"]["key"]["kernel"].T)


def test_minilm_round_trips_exactly(tmp_path):
  """The real MiniLM: loaded by our loader and exported again, every tensor is the
  original one under its original name (only the position_ids buffer is not ours)."""
  pretrained = hf_weights.load_pretrained(run_fixtures.MINILM)
  export_format.write_encoder(pretrained.module, "bert", pretrained.params, tmp_path)
  original = load_file(run_fixtures.MINILM / "model.safetensors")
  exported = load_file(tmp_path / "model.safetensors")
  assert set(original) - set(exported) == {"embeddings.position_ids"}
  assert set(exported) <= set(original)
  for name, tensor in exported.items():
    np.testing.assert_array_equal(tensor, original[name])
  transformers.BertModel.from_pretrained(tmp_path)


def test_rrsisd_sized_encoders_export_and_load_strictly(tmp_path):
  """DINOv2-B/14-reg4 and CLIP B/16 text at their real shapes, random weights, loaded into
  the HF classes on the meta device (no forward pass)."""
  from safetensors.torch import load_file as load_torch  # pylint: disable=import-outside-toplevel

  config = run_fixtures.config("rrsisd")
  model = s4eca.build_model(config)
  # Ours plus, for DINOv2, HF's mask_token (768), which export writes as zeros.
  expected = {"image_encoder": ("Dinov2WithRegistersModel", 86_582_784 + 768),
              "text_encoder": ("CLIPTextModelWithProjection", 63_428_096)}
  for name, (cls, count) in expected.items():
    module = getattr(model, name).clone(adapter=None, adapter_blocks=())
    params = _random_params(module)
    assert sum(x.size for x in jax.tree.leaves(params)) + (768 if name == "image_encoder"
                                                           else 0) == count
    tensors = export_format.write_encoder(module, config[name].kind, params, tmp_path / name)
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / name)
    assert type(hf_config).__name__ == cls.replace("ModelWithProjection", "Config").replace(
        "Model", "Config")
    with torch.device("meta"):
      hf_model = getattr(transformers, cls)(hf_config)
    state = load_torch(tmp_path / name / "model.safetensors")
    hf_model.load_state_dict(state, strict=True, assign=True)
    assert sum(t.numel() for t in state.values()) == count
    assert len(tensors) == len(state)
    del state, hf_model
