"""python -m spcl_jax.report RUN_DIRS... --out DIR [--name PATH=LABEL]... [--at best_val]
      [--per-class-fraction 100] [--dice dice_per_image]

RUN_DIRS: fine-tuning workdirs (each with a results.json), results.json files, or folders of
runs (searched recursively). Writes to DIR: table1..table4 as .md and .csv, tables.md (all four)
and runs.csv (one line per results file, with what each cell came from); prints tables.md.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
from collections.abc import Sequence

from spcl_jax import cli_errors, downstream
from spcl_jax.atomic_file import local_output
from spcl_jax.report import runs, tables

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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = cli_errors.ArgumentParser(prog="python -m spcl_jax.report",
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
    print(combined)
    print(f"wrote {len(built)} tables (.md, .csv), tables.md and runs.csv to {args.out} from "
          f"{len(lines)} results file(s)")
    return 0
  # One `error:` line naming the file or field, not a traceback (spcl_jax.cli_errors).
  return cli_errors.run_command(report, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
