"""python -m spcl_jax.report RUN_DIRS... --out DIR [--name PATH=LABEL]... [--at best_val]
      [--per-class-fraction 100] [--dice dice_per_image]

RUN_DIRS: fine-tuning workdirs (each with a results.json), results.json files, or folders of
runs (searched recursively). Writes to DIR: table1..table4 as .md and .csv, tables.md (all four)
and runs.csv (one line per results file, with what each cell came from); prints tables.md.
Also, per run (per seed of a multi-seed run), figures/<run>_roc.png (ROC curve per class, test
at the best val epoch, AUC in the legend) and figures/<run>_curves.png (loss per step, val
metric per epoch; `report.figures`), and report.html: tables and figures on one page that opens
from disk (images embedded).
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import re
import sys
from collections.abc import Sequence

from spcl_jax import command_line, downstream
from spcl_jax.atomic_file import local_output
from spcl_jax.report import figures, html_page, runs, tables

RUNS_COLUMNS = ("results", "method", "task", "protocol", "label_fraction", "split_scheme",
                "seeds", "metric", "test", "test_std", "val_best", "test_images", "init_kind",
                "init_path", "init_step", "finetune_accelerator_hours", "device_kind",
                "num_devices")


def build(run_dirs: Sequence[str], *, names: Sequence[str] = (), selection: str = "best_val",
          per_class_fraction: int = 100, dice_metric: str = "dice_per_image"
          ) -> tuple[list[tables.Table], list[dict[str, object]]]:
  """The four tables and the runs.csv lines, from the results under `run_dirs`."""
  namer = runs.MethodNamer(runs.parse_names(names))
  cells = tables.Cells(selection)
  loaded = []
  for path in runs.find_results(run_dirs):
    result = runs.load_result(path, selection)
    row = namer.row_of(result)
    cells.add(row, result, path)
    loaded.append((path, result, row))
  labels = runs.final_labels(namer.methods)
  lines = [_runs_line(path, result, labels[row], selection, dice_metric)
           for path, result, row in loaded]
  built = tables.all_tables(cells, namer.methods, per_class_fraction=per_class_fraction,
                            dice_metric=dice_metric)
  return built, lines


def _runs_line(path, result, label, selection, dice_metric) -> dict[str, object]:
  metric = ("macro_auc" if result["protocol"] in downstream.CLASSIFICATION_PROTOCOLS
            else dice_metric)
  test = result[downstream.SELECTIONS[selection]]
  seconds = result.get("accelerator_seconds")
  return {
      "results": str(path), "method": label, "task": result["task"],
      "protocol": result["protocol"], "label_fraction": result["label_fraction"],
      "split_scheme": result.get("split_scheme", ""),
      "seeds": " ".join(str(s) for s in result.get("seeds", [])), "metric": metric,
      "test": test.get(metric), "test_std": test.get(f"{metric}_std"),
      "val_best": result.get("val_best", {}).get(metric),
      "test_images": test.get("num_images"), "init_kind": result["init"]["kind"],
      "init_path": result["init"]["path"], "init_step": result["init"].get("step"),
      "finetune_accelerator_hours": None if seconds is None else seconds / 3600,
      "device_kind": result.get("device_kind"), "num_devices": result.get("num_devices"),
  }


def write(out: pathlib.Path, built: list[tables.Table], lines: list[dict[str, object]]) -> str:
  out.mkdir(parents=True, exist_ok=True)
  for table in built:
    (out / f"{table.name}.md").write_text(table.markdown(), encoding="utf-8")
    (out / f"{table.name}.csv").write_text(table.csv(), encoding="utf-8")
  combined = "\n".join(table.markdown() for table in built)
  (out / "tables.md").write_text(combined, encoding="utf-8")
  with open(out / "runs.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=RUNS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in line.items()} for line in lines)
  return combined


def _run_dirs(results_path: pathlib.Path, result: dict[str, object]) -> list[pathlib.Path]:
  """The folders holding a run's own files: the run's, or each seed's of an aggregate."""
  folder = results_path.parent
  return [(folder / p).parent for p in result.get("per_seed", [])] or [folder]


def write_figures(out: pathlib.Path, lines: list[dict[str, object]]
                  ) -> tuple[list[dict[str, object]], list[str]]:
  """PNGs under OUT/figures for every run in `lines` (runs.csv's); what was drawn and skipped."""
  folder = out / "figures"
  folder.mkdir(parents=True, exist_ok=True)
  drawn, skipped = [], []
  for index, line in enumerate(lines):
    results_path = pathlib.Path(str(line["results"]))
    result = json.loads(results_path.read_text())
    for run_dir in _run_dirs(results_path, result):
      seed_result = json.loads((run_dir / downstream.RESULTS_FILE).read_text())
      title = (f"{line['method']}: {line['task']} {line['protocol']} {line['label_fraction']}% "
               f"({run_dir.name})")
      stem = f"{index:02d}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", f"{line['method']}_{line['task']}_"
                                      f"{line['label_fraction']}pct_{run_dir.name}")
      written, missing = figures.figures_for_run(run_dir, seed_result, title, folder, stem)
      skipped += missing
      if written:
        drawn.append({"title": title, "results": run_dir / downstream.RESULTS_FILE,
                      "figures": written})
  return drawn, skipped


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = command_line.ArgumentParser(prog="python -m spcl_jax.report",
                                   description="The paper's Tables 1-4 from results.json files.")
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="fine-tuning workdir, results.json, or a folder of runs")
  parser.add_argument("--out", required=True, help="folder for the tables")
  parser.add_argument("--name", action="append", default=[], metavar="PATH=LABEL",
                      help="row label for the pre-training workdir (or init checkpoint) PATH; "
                      "default: the workdir's folder name")
  parser.add_argument("--at", default="best_val", choices=tuple(downstream.SELECTIONS),
                      help="which test numbers: at the best validation epoch (default) or the last")
  parser.add_argument("--per-class-fraction", type=int, default=100, choices=downstream.LABEL_FRACTIONS,
                      help="label fraction of Tables 2 and 3 (default 100, as the paper)")
  parser.add_argument("--dice", default="dice_per_image", choices=tables.DICE_METRICS,
                      help="Table 4's Dice (default: per-image Dice averaged over all test "
                      "images, empty ones included, what GLoRIA, MGCA and MedKLIP report; "
                      "dice_positive: the mean over images with a pneumothorax, the metric "
                      "segmentation selects on)")
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)

  def report() -> int:
    out = local_output(args.out, folder=True)  # before the work: a bucket URL is refused
    built, lines = build(args.run_dirs, names=args.name, selection=args.at,
                         per_class_fraction=args.per_class_fraction, dice_metric=args.dice)
    combined = write(out, built, lines)
    drawn, skipped = write_figures(out, lines)
    (out / "report.html").write_text(html_page.render(built, drawn, skipped), encoding="utf-8")
    print(combined)
    print(f"wrote {len(built)} tables (.md, .csv), tables.md and runs.csv to {args.out} from "
          f"{len(lines)} results file(s); figures of {len(drawn)} run(s) in "
          f"{out / 'figures'} and {out / 'report.html'}")
    for note in skipped:
      print(f"  {note}")
    return 0
  # One `error:` line naming the file or field, not a traceback (spcl_jax.command_line).
  return command_line.run_command(report, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
