"""`python -m spcl_jax.report`: Tables 1-4 from fixture results.json files (schema of
spcl_jax.finetune), empty cells for missing runs, one-line errors for bad input."""

import csv
import io
import json

import pytest

from spcl_jax.configs.default import get_config
from spcl_jax import accelerator_time, downstream, metrics
from spcl_jax.report import __main__ as report_cli
from spcl_jax.report import runs, tables
from spcl_jax.run_info import write_run_info

NIH = list(tables.NIH_CLASSES)
CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def pretraining_workdir(path, variant="B/16", image_size=512, sessions=((8, 3600.0),)):
  """config.json and accelerator_time.json as a pre-training run leaves them (no weights)."""
  config = get_config()
  config.model.variant, config.model.image_size = variant, image_size
  write_run_info(path, config)
  for devices, seconds in sessions:
    clock = accelerator_time.AcceleratorClock(path, num_devices=devices,
                                              device_kind="NVIDIA H200", clock=lambda: 0.0)
    clock._clock = lambda seconds=seconds: seconds  # pylint: disable=protected-access
    clock.update()
  return path, config


def class_aucs(classes, base):
  """Distinct per-class values, so a swapped column shows."""
  return {name: round(base - 0.01 * i, 4) for i, name in enumerate(classes)}


def write_result(folder, task, fraction, init_path, *, protocol="classification", base=0.8,
                 step=1000, seeds=(0,), split_scheme="paper", std=None):
  folder.mkdir(parents=True, exist_ok=True)
  if protocol == "classification":
    classes = {"nih14": NIH, "chexpert": CHEXPERT, "rsna": ["Pneumonia"]}[task]
    per_class = class_aucs(classes, base)

    def section(shift):
      out = {"epoch": 3, "step": 30, "per_class": {k: v + shift for k, v in per_class.items()},
             "macro_auc": sum(per_class.values()) / len(per_class) + shift}
      if std is not None:
        out["macro_auc_std"] = std
        out["per_class_std"] = {k: std for k in per_class}
      return out
  else:
    classes = ["Pneumothorax"]

    def section(shift):
      return {"epoch": 3, "step": 30, "dice_per_image": base + shift,
              "dice_positive": base / 2 + shift, "dice_global": base / 3 + shift,
              "trivial": {"dice_per_image": 0.75, "dice_positive": 0.0, "dice_global": 0.0}}
  test = {**section(0.0), "ci95": [base - 0.02, base + 0.02], "num_images": 100}
  result = {
      "format": downstream.RESULTS_FORMAT, "task": task, "protocol": protocol, "label_fraction": fraction,
      "split_scheme": split_scheme,
      "init": {"kind": "spcl" if init_path else "random",
               "path": str(init_path) if init_path else None, "step": step if init_path else None},
      "metric": "macro_auc" if protocol == "classification" else "dice_positive",
      "classes": classes, "val_best": section(0.05), "test_at_best_val": test,
      "test_at_last_epoch": {**section(-0.1), "ci95": [0, 1], "num_images": 100},
      "seeds": list(seeds), "config": {"model": {"variant": "B/16"}}, "split_hashes": {},
      "git_commit": None, "versions": {}, "accelerator_seconds": 7200.0,
      "device_kind": "NVIDIA H200", "num_devices": 1,
  }
  (folder / "results.json").write_text(json.dumps(result))
  return result


def read_csv(text):
  return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture
def runs_root(tmp_path):
  vitb, vitb_config = pretraining_workdir(tmp_path / "pretrain" / "vitb512",
                                          sessions=((8, 3600.0), (4, 1800.0)))
  small, _ = pretraining_workdir(tmp_path / "pretrain" / "mu64", "pico/16", 64)
  ft = tmp_path / "finetune"
  for fraction, base in ((1, 0.78), (10, 0.82), (100, 0.84)):
    write_result(ft / f"nih_{fraction}", "nih14", fraction, vitb, base=base)
  write_result(ft / "chexpert_100", "chexpert", 100, vitb, base=0.9, std=0.004)
  write_result(ft / "chexpert_100" / "seed_1", "chexpert", 100, vitb, base=0.1)  # not re-read
  write_result(ft / "rsna_10", "rsna", 10, small / "checkpoints" / "200", base=0.7)
  write_result(ft / "siim_mgca_1", "siim", 1, vitb, protocol="mgca", base=0.38)
  write_result(ft / "siim_uper_100", "siim", 100, vitb, protocol="upernet512", base=0.65)
  write_result(ft / "random_rsna_100", "rsna", 100, None, base=0.6)
  return dict(root=tmp_path, vitb=vitb, vitb_config=vitb_config, small=small, ft=ft)


def by_method(table):
  return {row["Method"]: row for row in read_csv(table.csv())}


def test_all_four_tables_from_results_files(runs_root):
  built, lines = report_cli.build([str(runs_root["ft"])])
  assert [t.name for t in built] == ["table1", "table2", "table3", "table4"]
  assert len(lines) == 8  # the seed_1 file sits below its run's own results.json
  table1, table2, table3, table4 = (by_method(t) for t in built)
  assert set(table1) == {"vitb512", "mu64", "random init", tables.SPLIT_SCHEME_ROW}
  schemes = table1[tables.SPLIT_SCHEME_ROW]
  assert schemes["ChestX-ray14 1%"] == "paper" and schemes["CheXpert 1%"] == ""

  vitb = table1["vitb512"]
  config = runs_root["vitb_config"]
  assert vitb["Backbone"] == "ViT-B/16"
  assert float(vitb["train GFLOPs/image"]) == pytest.approx(
      metrics.train_flops_per_image(config) / 1e9, rel=1e-5)
  assert float(vitb["fwd GFLOPs/view"]) == pytest.approx(
      metrics.view_forward_flops(config) / 1e9, rel=1e-5)
  assert float(vitb["accelerator-hours"]) == pytest.approx((8 * 3600 + 4 * 1800) / 3600)
  assert vitb["accelerators"] == "8 x NVIDIA H200 + 4 x NVIDIA H200"
  nih100 = sum(class_aucs(NIH, 0.84).values()) / 14
  assert vitb["ChestX-ray14 100%"] == f"{100 * nih100:.2f}"
  assert vitb["ChestX-ray14 1%"] == f"{100 * sum(class_aucs(NIH, 0.78).values()) / 14:.2f}"
  assert vitb["CheXpert 100%"] == f"{100 * (0.9 - 0.02):.2f}"
  assert vitb["RSNA Pneu. 10%"] == "" and vitb["CheXpert 1%"] == ""  # no such runs
  assert table1["mu64"]["RSNA Pneu. 10%"] == "70.00"  # init.path inside the workdir
  assert table1["mu64"]["ChestX-ray14 100%"] == ""
  assert table1["random init"]["accelerator-hours"] == ""
  assert table1["random init"]["RSNA Pneu. 100%"] == "60.00"

  # Table 2: the paper's column order, each class's own value.
  assert list(table2["vitb512"])[2:] == CHEXPERT + ["mAUC"]
  for name, value in class_aucs(CHEXPERT, 0.9).items():
    assert table2["vitb512"][name] == f"{100 * value:.2f}"
  assert all(v == "" for k, v in table2["mu64"].items() if k not in ("Method", "Backbone"))
  assert "| 88.0 ± 0.4 |" in built[1].markdown()  # mean ± std over seeds

  assert list(table3["vitb512"])[2:] == [c.replace("_", " ") for c in NIH] + ["mAUC"]
  assert table3["vitb512"]["Pleural Thickening"] == f"{100 * class_aucs(NIH, 0.84)['Pleural_Thickening']:.2f}"

  assert table4["vitb512"]["MGCA-style 1%"] == "38.00"  # dice_per_image, the default
  assert table4["vitb512"]["UperNet 512 100%"] == "65.00"
  assert table4["vitb512"]["MGCA-style 100%"] == "" and table4["mu64"]["UperNet 512 100%"] == ""
  trivial = table4[tables.TRIVIAL_ROW]
  assert trivial["MGCA-style 1%"] == "75.00" and trivial["MGCA-style 10%"] == ""


def test_selection_and_dice_options_pick_other_numbers(runs_root):
  built, _ = report_cli.build([str(runs_root["ft"])], selection="last_epoch",
                              dice_metric="dice_positive", per_class_fraction=1)
  table1, table2, table3, table4 = (by_method(t) for t in built)
  assert table1["random init"]["RSNA Pneu. 100%"] == "50.00"  # test_at_last_epoch
  assert table4["vitb512"]["MGCA-style 1%"] == f"{100 * (0.38 / 2 - 0.1):.2f}"
  assert table4[tables.TRIVIAL_ROW]["MGCA-style 1%"] == "0.00"
  assert table3["vitb512"]["Atelectasis"] == f"{100 * (0.78 - 0.1):.2f}"  # the 1% run
  assert table2["vitb512"]["Atelectasis"] == ""  # no 1% CheXpert run
  assert "Dice (%): dice_positive, the mean Dice over the test images with" in (
      built[3].markdown())


def test_a_missing_run_is_an_empty_cell(runs_root, tmp_path, capsys):
  unfinished = tmp_path / "finetune_unfinished"  # a fine-tuning workdir without results yet
  unfinished.mkdir()
  built, lines = report_cli.build([str(runs_root["ft"] / "nih_10"), str(unfinished)])
  assert "no results.json in or below" in capsys.readouterr().err
  assert len(lines) == 1
  schemes, row = read_csv(built[0].csv())
  assert schemes["Method"] == tables.SPLIT_SCHEME_ROW
  filled = {k for k, v in row.items() if v}
  assert "ChestX-ray14 10%" in filled
  assert not filled & {f"{d} {f}%" for d in ("ChestX-ray14", "CheXpert", "RSNA Pneu.")
                       for f in (1, 100)}
  assert "|  |" in built[0].markdown()


def test_names_steps_and_the_command_line(runs_root, tmp_path, capsys):
  vitb = runs_root["vitb"]
  write_result(tmp_path / "other_step", "nih14", 100, vitb, step=500, base=0.7)
  out = tmp_path / "tables"
  code = report_cli.main([str(runs_root["ft"]), str(tmp_path / "other_step"), "--out", str(out),
                          "--name", f"{vitb}=S-PCL ViT-B"])
  assert code == 0, capsys.readouterr().err
  table1 = {r["Method"]: r for r in read_csv((out / "table1.csv").read_text())}
  # One pre-training run fine-tuned from two checkpoints: one row per step.
  assert table1["S-PCL ViT-B @ step 500"]["ChestX-ray14 100%"] == f"{100 * (0.7 - 0.065):.2f}"
  assert table1["S-PCL ViT-B @ step 1000"]["ChestX-ray14 100%"] != ""
  for name in ("table1", "table2", "table3", "table4"):
    assert (out / f"{name}.md").read_text().startswith(f"**Table {name[-1]}")
  assert "Table 4" in (out / "tables.md").read_text() and "Table 1" in capsys.readouterr().out
  lines = read_csv((out / "runs.csv").read_text())
  assert len(lines) == 9 and {line["method"] for line in lines} == {
      "S-PCL ViT-B @ step 1000", "S-PCL ViT-B @ step 500", "mu64", "random init"}
  assert {line["finetune_accelerator_hours"] for line in lines} == {"2.0"}


def test_two_results_for_one_cell_are_refused(runs_root, tmp_path):
  write_result(tmp_path / "again", "nih14", 10, runs_root["vitb"], base=0.5)
  with pytest.raises(ValueError, match=r"two results for one cell \(vitb512, nih14, "
                                       r"classification, 10%\).*nih_10.*again"):
    report_cli.build([str(runs_root["ft"]), str(tmp_path / "again")])


def test_two_workdirs_with_one_name_are_refused(runs_root, tmp_path):
  twin, _ = pretraining_workdir(tmp_path / "elsewhere" / "vitb512")
  write_result(tmp_path / "twin_run", "rsna", 1, twin)
  with pytest.raises(ValueError, match="both named 'vitb512'.*--name"):
    report_cli.build([str(runs_root["ft"]), str(tmp_path / "twin_run")])


@pytest.mark.parametrize("field, value, message", [
    ("format", "something/2", "'format' is 'something/2'"),
    ("task", "mimic", "'task' 'mimic' is not one of"),
    ("label_fraction", 5, "'label_fraction' 5 is not one of"),
])
def test_bad_results_files_are_named(tmp_path, field, value, message):
  result = write_result(tmp_path / "run", "rsna", 1, None)
  result[field] = value
  (tmp_path / "run" / "results.json").write_text(json.dumps(result))
  with pytest.raises(ValueError, match=f"results.json: {message}"):
    report_cli.build([str(tmp_path / "run")])


def test_a_result_missing_a_class_names_the_field(tmp_path):
  result = write_result(tmp_path / "run", "chexpert", 100, None)
  del result["test_at_best_val"]["per_class"]["Edema"]
  (tmp_path / "run" / "results.json").write_text(json.dumps(result))
  with pytest.raises(ValueError, match="no field 'test_at_best_val.per_class.Edema'"):
    report_cli.build([str(tmp_path / "run")])


def test_flops_come_from_config_json_and_an_old_one_leaves_the_cells_empty(tmp_path, capsys):
  workdir, config = pretraining_workdir(tmp_path / "vitb512")
  info = json.loads((workdir / "config.json").read_text())
  assert info["flops"]["train_per_image"] == pytest.approx(metrics.train_flops_per_image(config))
  info["flops"]["train_per_image"] = 7e9  # the report shows what the run recorded
  (workdir / "config.json").write_text(json.dumps(info))
  assert runs.describe_pretraining(workdir, "x").train_gflops_per_image == pytest.approx(7.0)
  del info["flops"]
  (workdir / "config.json").write_text(json.dumps(info))
  method = runs.describe_pretraining(workdir, "x")
  assert method.train_gflops_per_image is None and method.view_forward_gflops is None
  assert "records no FLOPs" in capsys.readouterr().err


def test_protocol_and_pooling_get_rows_of_their_own_and_split_schemes_show_per_column(
    runs_root, tmp_path):
  vitb = runs_root["vitb"]
  tmp_path = tmp_path / "variants"  # apart from runs_root's runs
  for name, protocol, pool, base in (("cls", "classification", "cls", 0.8),
                                     ("avg", "classification", "avg", 0.7),
                                     ("linear", "linear", "cls", 0.6)):
    result = write_result(tmp_path / name, "nih14", 10, vitb, base=base)
    result.update(protocol=protocol, pool=pool)
    (tmp_path / name / "results.json").write_text(json.dumps(result))
  write_result(tmp_path / "chexpert", "chexpert", 10, vitb, split_scheme="official")
  write_result(tmp_path / "chexpert_paper", "chexpert", 1, vitb, split_scheme="paper")
  built, lines = report_cli.build([str(tmp_path)])
  table1 = by_method(built[0])
  nih = "ChestX-ray14 10%"
  assert table1["vitb512 [full, pool cls]"][nih] == f"{100 * sum(class_aucs(NIH, 0.8).values()) / 14:.2f}"
  assert table1["vitb512 [full, pool avg]"][nih] == f"{100 * sum(class_aucs(NIH, 0.7).values()) / 14:.2f}"
  assert table1["vitb512 [linear, pool cls]"][nih] == f"{100 * sum(class_aucs(NIH, 0.6).values()) / 14:.2f}"
  assert table1["vitb512"]["CheXpert 10%"] != ""  # no pooling named: the plain label
  schemes = table1[tables.SPLIT_SCHEME_ROW]
  assert (schemes["CheXpert 10%"], schemes["CheXpert 1%"], schemes[nih]) == (
      "official", "paper", "paper")
  assert {line["protocol"] for line in lines} == {"classification", "linear"}
  assert all(line["metric"] == "macro_auc" for line in lines)
