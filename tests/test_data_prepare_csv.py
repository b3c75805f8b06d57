"""`prepare csv`: a user's own labelled CSV, with the built-ins' report, bad rows and splits,
fine-tuned end to end with configs/finetune/custom.py."""

import contextlib
import csv
import io
import json

import numpy as np
import pytest

import data_fixtures as fx
import finetune_fixtures as ff
from spcl_jax.data import prepare, splits
from spcl_jax.data.datasets import custom_csv
from spcl_jax.data.datasets import manifest as mf

CLASSES = ("Effusion", "Nodule")
HEADER = "file,patient,view,Effusion,Nodule,age"
PATIENTS = [f"p{i:02d}" for i in range(40)]
# p00 has a second image (a lateral, and a frontal follow-up), so the patient column matters.


def _write_raw(root):
  labels = ff._labels_by_patient(PATIENTS + ["missing_p", "uncertain_p"], len(CLASSES))
  rows = []
  for i, patient in enumerate(PATIENTS):
    name = f"{patient}/a.png"
    rows.append(f"{name},{patient},PA,{labels[patient][0]},{labels[patient][1]},50")
    fx.write_png(root / "images" / name, ff._image(i, labels[patient][0]))
  fx.write_png(root / "images/p00/b.png", ff._image(99, labels["p00"][0]))
  fx.write_png(root / "images/p00/lat.png", ff._image(98, 0))
  fx.write_png(root / "images/uncertain_p/a.png", ff._image(97, 1))
  rows += [
      f"p00/b.png,p00,ap,{labels['p00'][0]},{labels['p00'][1]},51",
      "p00/lat.png,p00,LATERAL,0,0,51",
      f"missing_p/a.png,missing_p,PA,{labels['missing_p'][0]},0,60",   # no file on disk
      "uncertain_p/a.png,uncertain_p,PA,-1,,61",                       # uncertain and blank
      "bad/a.png,bad_p,PA,1,0",                                        # a cell short
      "odd/a.png,odd_p,PA,maybe,0,40",                                 # not a label value
  ]
  fx.write_csv(root / "labels.csv", HEADER, rows)


def _prepare(root, out, *extra):
  args = ["csv", "--src", str(root / "labels.csv"), "--image-root", str(root / "images"),
          "--out", str(out), "--label-columns", ",".join(CLASSES), "--patient-column",
          "patient", "--view-column", "view", "--image-column", "file", "--image-size",
          str(ff.SIZE), "--workers", "1", *extra]
  with contextlib.redirect_stdout(io.StringIO()):
    return prepare.main(args)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("own")
  _write_raw(root)
  assert _prepare(root, root / "prepared", "--uncertain", "zeros") == 0
  return root, root / "prepared"


def test_report_lists_the_bad_row_the_missing_file_and_the_uncertain_label(prepared):
  _, out = prepared
  report = json.loads((out / "report.json").read_text())
  problems = {kind: [item["name"] for item in p["items"]]
              for kind, p in report["problems"].items()}
  assert problems == {"bad_row": ["bad/a.png"], "unknown_label": ["odd/a.png"],
                      "missing_file": ["missing_p/a.png"], "non_frontal": ["p00/lat.png"],
                      "uncertain_label": ["uncertain_p/a.png"]}
  detail = report["problems"]["uncertain_label"]["items"][0]["detail"]
  assert "['Effusion', 'Nodule'] set to 0 (--uncertain zeros)" in detail
  assert report["settings"]["label_columns"] == list(CLASSES)
  assert report["counts"]["records"] == 42  # 40 + p00's follow-up + the uncertain one
  with open(out / "records.csv", newline="") as f:
    records = {row["name"]: row for row in csv.DictReader(f)}
  assert records["uncertain_p/a.png"]["labels"] == "0 0"
  assert records["p00/b.png"]["patient"] == "p00" and records["p00/b.png"]["view"] == "AP"


def test_splits_are_by_patient_with_nested_fractions(prepared):
  _, out = prepared
  read = {stem: splits.read_split_file(out / "splits" / f"{stem}.txt")
          for stem in ("train", "val", "test", "train_10pct", "train_1pct")}
  with open(out / "records.csv", newline="") as f:
    patient_of = {row["name"]: row["patient"] for row in csv.DictReader(f)}
  patient_of["missing_p/a.png"] = "missing_p"
  by_split = {s: {patient_of[n] for n in read[s]} for s in ("train", "val", "test")}
  assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
              or by_split["val"] & by_split["test"])
  assert {"p00/a.png", "p00/b.png"} <= set(read[splits.assign_patients(
      list(set(patient_of.values())))["p00"]])
  assert set(read["train_1pct"]) <= set(read["train_10pct"]) <= set(read["train"])
  assert [len(by_split[s]) for s in ("train", "val", "test")] == splits.split_counts(42)
  # Pre-training reads the folder as `prepared:` like any other.
  from spcl_jax.data.sources import open_source
  source = open_source(f"prepared:{out},split=train")
  assert {source.name(i) for i in range(len(source))} == set(read["train"]) - {"missing_p/a.png"}


@pytest.mark.parametrize("policy, expected", [
    ("zeros", ((0, 1), "set to 0")), ("ones", ((1, 1), "set to 1")),
    ("exclude", (None, "image excluded"))])
def test_uncertain_policy(policy, expected):
  codes, kind, why = custom_csv.label_codes({"A": "-1", "B": "1"}, ("A", "B"), policy)
  assert codes == expected[0] and expected[1] in why
  assert kind == ("uncertain_label" if policy == "exclude" else "")
  blank, _, _ = custom_csv.label_codes({"A": "", "B": "no"}, ("A", "B"), policy)
  assert blank == {"zeros": (0, 0), "ones": (1, 0), "exclude": None}[policy]
  assert custom_csv.label_codes({"A": "Yes", "B": "0.0"}, ("A", "B"), policy)[0] == (1, 0)


def test_without_a_patient_column_every_image_is_its_own_patient(tmp_path):
  fx.write_csv(tmp_path / "l.csv", "path,A", ["x.png,1", "y.png,0"])
  manifest = custom_csv.configured({
      "image_root": str(tmp_path), "label_columns": ["A"], "image_column": "path",
      "uncertain": "zeros"}).read_manifest(tmp_path / "l.csv", check_files=False)
  assert [(e.name, e.patient, e.view, e.labels) for e in manifest.entries] == [
      ("x.png", "x.png", "FRONTAL", (mf.POSITIVE,)), ("y.png", "y.png", "FRONTAL", (mf.NEGATIVE,))]


def test_command_line_mistakes_are_one_line(tmp_path, capsys):
  _write_raw(tmp_path)
  with pytest.raises(SystemExit):
    prepare.parse_args(["csv", "--src", "l.csv", "--out", "o", "--image-root", "i",
                        "--label-columns", "A"])
  assert "csv needs --uncertain" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    prepare.parse_args(["nih_chestxray14", "--src", "r", "--out", "o", "--uncertain", "ones"])
  assert "--uncertain is for the csv dataset only" in capsys.readouterr().err
  code = _prepare(tmp_path, tmp_path / "out", "--uncertain", "ones", "--label-columns",
                  "Effusion,Mass")
  assert code != 0 and "missing column(s) ['Mass']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("xla_compilation_cache")
def test_fine_tunes_end_to_end_into_its_own_report_column(prepared, tmp_path):
  from spcl_jax.finetune import trainer
  from spcl_jax.report import __main__ as report_cli
  _, out = prepared
  config = ff.finetune_config("custom", out, epochs=1, **{"optim.warmup_epochs": 0})
  with contextlib.redirect_stdout(io.StringIO()):
    outcome = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert outcome["task"] == "custom" and outcome["classes"] == list(CLASSES)
  assert list(outcome["test_at_best_val"]["per_class"]) == list(CLASSES)
  built, _ = report_cli.build([str(tmp_path / "run")])
  table1 = next(t for t in built if t.name == "table1")
  from spcl_jax.report import tables
  method_rows = [row for row in table1.rows if row[0] != tables.SPLIT_SCHEME_ROW]
  assert len(method_rows) == 1
  cell = method_rows[0][table1.columns.index("Own data 100%")]
  assert cell.mean == pytest.approx(outcome["test_at_best_val"]["macro_auc"])
  assert np.isfinite(cell.mean)
