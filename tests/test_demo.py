"""The demo path end to end at tiny sizes (configs/demo.py:variant=tiny): synthetic layout
-> rrsis_d build -> train -> evaluate -> tables and pictures; a rerun reuses all of it."""

from s4eca_jax import demo
from tfds_builders import layout_writer
from tfds_builders.synthetic_rrsis import expressions


def test_demo_end_to_end_and_rerun(tmp_path, capsys):
  run = lambda: demo.run_demo(tmp_path / "runs", tmp_path / "data", config_arg="variant=tiny")
  result = run()["s4eca"]
  assert result["step"] == 2 and result["val"]["n"] == 8
  assert set(result["val_per_type"]) <= set(expressions.EXPRESSION_TYPES)
  assert sum(m["n"] for m in result["val_per_type"].values()) == 8
  for path in result["pictures"].values():
    assert path.exists(), path
  assert len(list(result["pictures"]["predictions"].glob("*_overlay.png"))) == 4
  tables = (tmp_path / "runs" / "results.md").read_text()
  assert "| s4eca | 8 |" in tables and "per expression type" in tables
  first = capsys.readouterr().out
  assert "rrsis_d built from the layout" in first and "pictures:" in first

  again = run()["s4eca"]
  second = capsys.readouterr().out
  assert "rrsis_d reused" in second and "writing" not in second
  assert again["step"] == 2 and again["val"] == result["val"]


def test_layout_records_balanced_expression_types(tmp_path):
  layout = layout_writer.write_rrsis_layout(tmp_path, num_train=40, num_val=1, num_test=1,
                                        image_size=96, seed=0, progress=False)
  types = demo.expression_types(layout)
  counts = {t: list(types.values()).count(t) for t in expressions.EXPRESSION_TYPES}
  assert len(types) == 42 and min(counts.values()) >= 5, counts


def test_ablation_config_and_side_by_side_tables():
  data = {"tfds_data_dir": "/nowhere"}
  assert demo.run_config("variant=tiny", True, data).model.language_guidance
  blind = demo.run_config("variant=tiny", False, data)
  assert not blind.model.language_guidance and blind.dataset == "rrsis_d"
  row = {"n": 4, "mIoU": 0.5, "oIoU": 0.6, "P@0.5": 0.5, "P@0.7": 0.25, "P@0.9": 0.0}
  results = {name: {"val": row, "step": 2, "train_seconds": 1.0,
                    "val_per_type": {"colour": row}} for name in demo.RUNS}
  tables = demo.markdown_tables(results)
  assert "| s4eca | 4 | 50.0 | 60.0 | 50.0 | 25.0 | 0.0 | 2 | 1.0 |" in tables
  assert "| colour | 4 | 50.0 | 50.0 | 50.0 | 50.0 |" in tables


def test_cpu_devices_split_the_batch_evenly():
  assert demo.cpu_devices(2, (8, 16)) == 2
  assert demo.cpu_devices(16, (8, 16)) == 8  # not 16: batch 8 would not split
  assert demo.cpu_devices(6, (8, 16)) == 4
  assert demo.cpu_devices(3, (8, 12)) == 2
  assert demo.cpu_devices(1, (8,)) == 1 and demo.cpu_devices(0, (8,)) == 1
