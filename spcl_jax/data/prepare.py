"""python -m spcl_jax.data.prepare DATASET --src RAW_DIR --out OUT_DIR [--image-size 512] [--workers N]
       python -m spcl_jax.data.prepare DATASET --out OUT_DIR --splits-only [--src RAW_DIR]
       python -m spcl_jax.data.prepare csv --src labels.csv --image-root DIR --out OUT_DIR
           --label-columns A,B,C --uncertain zeros|ones|exclude [--patient-column P]
           [--view-column V --views frontal] [--image-column path]   (your own data: custom_csv)

Turns one raw download (see docs/datasets.md) into OUT_DIR/:
  splits/*.txt, splits/SHA256SUMS  image names per split, a function of the metadata alone
  tfds/spcl_DATASET/1.0.0/         TFDS array_record records (read with `prepared.py`)
  records.csv                      record index -> name, patient, view, raw label codes
  report.json                      settings, counts, every problem found, split sha256s
Bad rows and files never stop the run: they are counted and listed in report.json. A finished
OUT_DIR is detected and left as it is (no work); a different setting on it is an error.
--splits-only rewrites splits/ (and the report's split summary) of a finished OUT_DIR from the
metadata, e.g. to add split files that a newer version defines; records are not touched.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

from spcl_jax import command_line, errors
from spcl_jax.atomic_file import local_output
from spcl_jax.data import decode
from spcl_jax.data import splits as splits_lib
from spcl_jax.data.datasets import DATASET_NAMES, custom_csv, dataset_module
from spcl_jax.data.datasets import manifest as mf
from spcl_jax.data.datasets import records

REPORT = "report.json"
RECORDS_INDEX = "records.csv"
VIEWS = ("frontal", "all")


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = command_line.ArgumentParser(prog="python -m spcl_jax.data.prepare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=DATASET_NAMES)
  parser.add_argument("--src", help="the raw download folder (with --splits-only: default the "
                      "one in OUT_DIR/report.json)")
  parser.add_argument("--out", required=True, help="output folder (one per dataset)")
  parser.add_argument("--image-size", type=int, default=512)
  parser.add_argument("--encoding", choices=records.ENCODINGS, default="jpeg",
                      help="jpeg (quality 95, default: 2x smaller, 3x faster to decode) or png "
                      "(lossless)")
  parser.add_argument("--resize-filter", default="bilinear")
  parser.add_argument("--min-side", type=int, default=decode.MIN_IMAGE_SIDE,
                      help="images with a side below this many pixels are skipped and reported "
                      "as too_small (default 64)")
  parser.add_argument("--views", choices=VIEWS, default="frontal",
                      help="frontal: PA/AP only (default); all: keep laterals (MIMIC "
                      "pre-training can then choose with prepared:...,views=all)")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--splits-only", action="store_true",
                      help="rewrite the split files of a finished OUT_DIR from the metadata; "
                      "images and records are left as they are")
  own = parser.add_argument_group("your own data (DATASET csv; see spcl_jax.data.datasets."
                                   "custom_csv)")
  own.add_argument("--image-root", help="the folder the CSV's image paths are relative to")
  own.add_argument("--label-columns", help="the label columns, comma-separated: the classes")
  own.add_argument("--uncertain", choices=custom_csv.UNCERTAIN_POLICIES,
                   help="what an uncertain (-1) or blank label cell becomes (required)")
  own.add_argument("--image-column", default=None, help="the column of image paths (default path)")
  own.add_argument("--patient-column", help="patient ids (default: every image its own patient)")
  own.add_argument("--view-column", help="view positions (default: every image frontal)")
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
  args = parser.parse_args(argv)
  if args.src is None and not args.splits_only:
    parser.error("--src is required (except with --splits-only)")
  own_flags = [f"--{key.replace('_', '-')}" for key in custom_csv.SETTINGS
               if getattr(args, key) is not None]
  if args.dataset != "csv" and own_flags:
    parser.error(f"{own_flags[0]} is for the csv dataset only")
  if args.dataset == "csv" and not args.splits_only:
    for key in ("image_root", "label_columns", "uncertain"):
      if getattr(args, key) is None:
        parser.error(f"csv needs --{key.replace('_', '-')}")
  return args


def select_views(entries: list[mf.Entry], views: str, problems: mf.Problems | None
                 ) -> list[mf.Entry]:
  """Frontal entries (reporting the others) or all entries."""
  if views == "all":
    return list(entries)
  kept = []
  for entry in entries:
    if entry.is_frontal:
      kept.append(entry)
    elif problems is not None:
      kind = "blank_view" if not entry.view else "non_frontal"
      problems.add(kind, entry.name, f"view {entry.view!r}")
  return kept


def official_lists(module, manifest: mf.Manifest) -> dict[str, list[str]]:
  """Stem -> names of the lists the download itself defines (NIH's list files, CheXpert's CSVs)."""
  if module.official_lists is not None:
    return module.official_lists(manifest.entries)
  return manifest.official_splits


def make_splits(module, manifest: mf.Manifest, views: str) -> dict[str, list[str]]:
  """Split files from the metadata alone (no file checks), so every user writes the same ones:
  all, the paper's 7:2:1 train/val/test and, where the download defines a test list, the
  official scheme (official_train/val/test), each train split with its nested 10% and 1%."""
  entries = select_views(manifest.entries, views, problems=None)
  names = sorted(entry.name for entry in entries)
  splits = {"all": names}
  if module.PATIENT_SPLIT:
    patient_of = {entry.name: entry.patient for entry in entries}
    splits.update(splits_lib.split_images(patient_of))
    splits.update(splits_lib.label_fractions(splits["train"]))
    splits_lib.check_patients_disjoint(
        {name: splits[name] for name in splits_lib.SPLIT_NAMES}, patient_of)
    selected = set(names)
    for stem, official in official_lists(module, manifest).items():
      splits[stem] = sorted(set(official) & selected)
    if "official_train_val" in splits and "official_test" in splits:
      splits.update(splits_lib.official_splits(splits["official_train_val"],
                                               splits["official_test"], patient_of))
  return splits


def splits_or_exit(module, manifest: mf.Manifest, views: str, src: pathlib.Path
                   ) -> dict[str, list[str]]:
  """make_splits, with a metadata error (e.g. a patient in both official lists) as one line."""
  try:
    return make_splits(module, manifest, views)
  except ValueError as e:
    raise SystemExit(f"error: {str(src)!r}: {e}") from None


def _settings_of(args: argparse.Namespace) -> dict:
  settings = {"dataset": args.dataset, "views": args.views,
              **dataclasses.asdict(records.EncodeSettings(args.image_size, args.encoding,
                                                          resize_filter=args.resize_filter,
                                                          min_side=args.min_side))}
  if args.dataset == "csv":
    settings.update(_csv_settings(args))
  return settings


def _csv_settings(args: argparse.Namespace) -> dict:
  """The csv dataset's options, as report.json keeps them (its classes among them)."""
  src = pathlib.Path(args.src).expanduser()
  if not src.is_file():
    raise SystemExit(f"error: --src {str(src)!r}: the csv dataset reads a CSV file")
  root = pathlib.Path(args.image_root).expanduser()
  if not root.is_dir():
    raise SystemExit(f"error: --image-root {str(root)!r} is not a folder")
  image_column = args.image_column or "path"
  columns = [c.strip() for c in args.label_columns.split(",") if c.strip()]
  if not columns:
    raise SystemExit("error: --label-columns names no column")
  return {"image_root": str(root.resolve()), "label_columns": columns,
          "image_column": image_column, "patient_column": args.patient_column,
          "view_column": args.view_column, "uncertain": args.uncertain,
          "image_format": custom_csv.image_format_of(src, image_column)}


def finished_report(out: pathlib.Path, settings: dict) -> dict | None:
  """The report of a finished preparation with these settings; raises on other settings."""
  path = out / REPORT
  if not path.is_file():
    return None
  report = json.loads(path.read_text())
  if not report.get("complete"):
    return None
  for key, value in settings.items():
    if report["settings"].get(key) != value:
      raise SystemExit(f"error: {str(out)!r} was prepared with {key}="
                       f"{report['settings'].get(key)!r}, not {value!r}; use another --out "
                       "or delete it")
  return report


def _remove_unfinished(records_dir: pathlib.Path) -> None:
  # Without a complete report.json nothing under tfds/ is trusted: an interrupted TFDS build
  # leaves VERSION.incomplete* folders, and records whose index was never written cannot be
  # mapped to names. TFDS cannot resume a split, so the image pass starts over.
  if records_dir.exists():
    shutil.rmtree(records_dir)


@contextlib.contextmanager
def _scratch_tempdir():
  """Points `tempfile` at a folder of ours and removes it afterwards: TFDS's builder makes a
  `tmp*tfds` folder (for DatasetInfo it would fetch from GCS) that it never deletes."""
  previous = tempfile.tempdir
  with tempfile.TemporaryDirectory(prefix="spcl_prepare_") as scratch:
    tempfile.tempdir = scratch
    try:
      yield
    finally:
      tempfile.tempdir = previous


def build_records(module, args, src, out, entries, problems) -> list[mf.Entry]:
  """Writes the records (skipped by TFDS when already complete); returns the written entries."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()  # Ours shows images/s, ETA and the bad count instead.
  written = [False] * len(entries)
  bar = tqdm(total=len(entries), desc=f"{module.NAME} images", unit="img", mininterval=1.0,
             smoothing=0.05, dynamic_ncols=True)
  bad = [0]

  def on_result(key: int, kind: str, detail: str) -> None:
    if kind:
      problems.add(kind, entries[key].name, detail)
      bad[0] += 1
      bar.set_postfix(bad=bad[0], refresh=False)
    else:
      written[key] = True
    bar.update(1)

  tfds_dir = out / "tfds"
  _remove_unfinished(tfds_dir / records.builder_name(module.NAME))
  settings = records.EncodeSettings(args.image_size, args.encoding,
                                    resize_filter=args.resize_filter, min_side=args.min_side)
  with _scratch_tempdir():
    builder = records.make_builder(module, data_dir=tfds_dir, src=src, entries=entries,
                                   settings=settings, workers=args.workers, on_result=on_result)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(src), compute_stats=tfds.download.ComputeStatsMode.SKIP))
  bar.close()
  return [entry for entry, ok in zip(entries, written) if ok]


def write_records_index(path: pathlib.Path, entries: list[mf.Entry]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["index", "name", "patient", "view", "labels"])
    for index, entry in enumerate(entries):
      writer.writerow([index, entry.name, entry.patient, entry.view,
                       " ".join(str(code) for code in entry.labels)])


def split_summary(splits, digests, patient_of, recorded: set[str]) -> dict:
  return {f"{stem}.txt": {
      "images": len(names),
      "patients": len({patient_of[name] for name in names}),
      "without_record": sum(name not in recorded for name in names),
      "sha256": digests[f"{stem}.txt"]} for stem, names in splits.items()}


def print_split_summary(report: dict) -> None:
  for name, split in report["splits"].items():
    print(f"  splits/{name}: {split['images']} images, {split['patients']} patients, "
          f"{split['without_record']} without record, sha256 {split['sha256']}")


def print_summary(report: dict, out: pathlib.Path) -> None:
  counts = report["counts"]
  print(f"{report['settings']['dataset']}: {counts['records']} images written to {out} "
        f"({counts['metadata_images']} in the metadata, {counts['selected']} with a file and "
        f"the asked views) "
        f"in {report['elapsed_s']:.0f} s")
  for kind, problem in report["problems"].items():
    examples = ", ".join(item["name"] for item in problem["items"][:3])
    print(f"  {kind}: {problem['count']} ({problem['meaning']}), e.g. {examples}")
  print_split_summary(report)
  print(f"details: {out / REPORT}")


def prepare(args: argparse.Namespace) -> dict:
  out = pathlib.Path(args.out).expanduser()
  src = pathlib.Path(args.src).expanduser()
  settings = _settings_of(args)
  report = finished_report(out, settings)
  if report is not None:
    print(f"{str(out)!r} is already prepared with these settings: nothing to do.")
    return report
  if not src.is_dir() and args.dataset != "csv":
    raise SystemExit(f"error: --src {str(src)!r} is not a folder")
  start = time.time()
  module = dataset_module(args.dataset, settings)
  metadata = module.read_manifest(src, check_files=False)
  splits = splits_or_exit(module, metadata, args.views, src)
  manifest = module.read_manifest(src, check_files=True)
  # Records in name order: the same record indices for every copy of the metadata.
  selected = sorted(select_views(manifest.entries, args.views, manifest.problems),
                    key=lambda entry: entry.name)
  out.mkdir(parents=True, exist_ok=True)
  digests = splits_lib.write_split_files(out / "splits", splits)
  images = getattr(module, "IMAGE_ROOT", src)  # csv: --src is the CSV, the images lie apart
  written = build_records(module, args, images, out, selected, manifest.problems)
  write_records_index(out / RECORDS_INDEX, written)
  patient_of = {entry.name: entry.patient
                for entry in select_views(metadata.entries, args.views, None)}
  report = {
      "complete": True,
      "settings": settings,
      "src": str(src.resolve()),
      "counts": {"metadata_images": len(metadata.entries), "selected": len(selected),
                 "records": len(written)},
      "splits": split_summary(splits, digests, patient_of, {e.name for e in written}),
      "problems": manifest.problems.to_json(),
      "elapsed_s": round(time.time() - start, 1),
  }
  (out / REPORT).write_text(json.dumps(report, indent=1))
  return report


def rewrite_splits(args: argparse.Namespace) -> dict:
  """--splits-only: new split files and split summary for a finished OUT_DIR, from the metadata
  and the views it was prepared with; records, records.csv and problems stay as they are."""
  out = pathlib.Path(args.out).expanduser()
  path = out / REPORT
  report = json.loads(path.read_text()) if path.is_file() else {}
  if not report.get("complete"):
    raise SystemExit(f"error: --splits-only needs a finished preparation; {str(out)!r} has no "
                     f"complete {REPORT} (run without --splits-only first)")
  if report["settings"]["dataset"] != args.dataset:
    raise SystemExit(f"error: {str(out)!r} holds {report['settings']['dataset']}, not "
                     f"{args.dataset}")
  src = pathlib.Path(args.src or report["src"]).expanduser()
  if not src.is_dir() and args.dataset != "csv":
    raise SystemExit(f"error: --src {str(src)!r} is not a folder")
  module = dataset_module(args.dataset, report["settings"])
  metadata = module.read_manifest(src, check_files=False)
  views = report["settings"]["views"]
  splits = splits_or_exit(module, metadata, views, src)
  split_dir = out / "splits"
  # A file that is not in the new SHA256SUMS could not be verified: remove it.
  stale = sorted(p for p in split_dir.glob("*.txt") if p.stem not in splits)
  digests = splits_lib.write_split_files(split_dir, splits)
  for old in stale:
    old.unlink()
  with open(out / RECORDS_INDEX, newline="", encoding="utf-8") as f:
    recorded = {row["name"] for row in csv.DictReader(f)}
  patient_of = {entry.name: entry.patient
                for entry in select_views(metadata.entries, views, None)}
  report["splits"] = split_summary(splits, digests, patient_of, recorded)
  report["splits_src"] = str(src.resolve())
  tmp = path.with_suffix(".json.tmp")  # Replaced in one step: a finished folder stays finished.
  tmp.write_text(json.dumps(report, indent=1))
  tmp.replace(path)
  if stale:
    print(f"removed split files no longer defined: {', '.join(p.name for p in stale)}")
  return report


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)

  def run() -> int:
    local_output(args.out, folder=True)  # records are written to local disk, never to a bucket
    if args.workers < 1:
      raise errors.UsageError("--workers must be >= 1")
    if args.splits_only:
      report = rewrite_splits(args)
      print(f"{report['settings']['dataset']}: split files of {args.out} rewritten")
      print_split_summary(report)
      return 0
    report = prepare(args)
    print_summary(report, pathlib.Path(args.out).expanduser())
    return 0
  # One `error:` line for anything unexpected too; the traceback only with --debug.
  return command_line.run_command(run, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
