"""python -m spcl_jax.predict --workdir F | --model OUT.safetensors --images DIR|LIST.txt|CSV
       [--out predictions.csv] [--masks DIR] [--batch-per-device 16] [--workers N]

Scores image files (PNG, JPEG, DICOM) with a fine-tuned model: F's best-on-val parameters, or
a classifier exported by `python -m spcl_jax.export --workdir F --format timm`. Each file is
decoded as prepare decodes (DICOM MONOCHROME1 inverted), stored at the size and encoding the
run's prepared folder used, and put through fine-tuning's eval transform (`inference.images`),
then batched over every device. Writes
  OUT (CSV)            one row per scored image: path, then prob_<class> per class (sigmoid of
                       the logit, 17 digits); segmentation: path, predicted_pixels,
                       predicted_area (fraction of the input) and mask (the PNG's path)
  OUT_report.json      the model, the counts, and every file that could not be scored (with why:
                       undecodable, too_small); such a file never stops the others
  --masks DIR          segmentation: one 0/255 PNG per image at the model's input size
                       (default: OUT's folder / OUT's stem + "_masks")
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from spcl_jax import command_line, inference
from spcl_jax.atomic_file import check_writable, local_output
from spcl_jax.downstream import CLASSIFICATION_PROTOCOLS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = command_line.ArgumentParser(prog="python -m spcl_jax.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
  inference.add_source_arguments(parser)
  parser.add_argument("--out", default="predictions.csv", help="the CSV to write")
  parser.add_argument("--masks", default=None, help="segmentation: folder for the mask PNGs")
  parser.add_argument("--batch-per-device", type=int, default=16)
  parser.add_argument("--workers", type=int, default=4, help="threads decoding files")
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
  return parser.parse_args(argv)


def _prepared_inputs(scorer, paths, workers: int):
  """(index, path, uint8 input or None, problem kind, detail) per file, in order."""
  from spcl_jax.inference import images  # pylint: disable=g-import-not-at-top
  stored = scorer.loaded.stored

  def prepare(item):
    index, path = item
    encoded, kind, detail = images.stored_bytes(path, stored)
    if encoded is None:
      return index, path, None, kind, detail
    return index, path, scorer.model_input(str(path), encoded), "", ""
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    yield from pool.map(prepare, enumerate(paths))


def _batches(items, size: int):
  batch, problems = [], []
  for item in items:
    (problems if item[2] is None else batch).append(item)
    if len(batch) == size:
      yield batch, problems
      batch, problems = [], []
  if batch or problems:
    yield batch, problems


def _mask_names(paths: Sequence[pathlib.Path]) -> list[str]:
  """One PNG name per image: its stem, made unique with the image's index where stems repeat."""
  stems = [p.stem for p in paths]
  repeated = {s for s in stems if stems.count(s) > 1}
  return [f"{s}_{i}.png" if s in repeated else f"{s}.png" for i, s in enumerate(stems)]


def predict_files(scorer, paths: Sequence[pathlib.Path], out: pathlib.Path,
                  masks: pathlib.Path | None, workers: int = 4) -> dict:
  """Scores `paths`; writes OUT and its report; returns the report."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from spcl_jax.finetune import dice  # pylint: disable=g-import-not-at-top
  from spcl_jax.finetune.predictions import format_number, sigmoid  # pylint: disable=g-import-not-at-top
  loaded = scorer.loaded
  classification = loaded.protocol in CLASSIFICATION_PROTOCOLS
  if classification:
    header = ["path", *(f"prob_{c}" for c in loaded.classes)]
  else:
    header = ["path", "predicted_pixels", "predicted_area", "mask"]
    masks.mkdir(parents=True, exist_ok=True)
    mask_names = _mask_names(paths)
  problems: dict[str, list[dict[str, str]]] = {}
  rows: list[tuple[int, list[str]]] = []
  bar = tqdm(total=len(paths), desc="predict", unit="img", dynamic_ncols=True, mininterval=1.0)
  for batch, bad in _batches(_prepared_inputs(scorer, paths, workers), scorer.batch_size):
    for index, path, _, kind, detail in bad:
      problems.setdefault(kind, []).append({"path": str(path), "detail": detail})
    if batch:
      outputs = scorer.outputs(np.stack([item[2] for item in batch]))
      for (index, path, *_), output in zip(batch, outputs):
        if classification:
          rows.append((index, [str(path), *(format_number(p) for p in sigmoid(output))]))
          continue
        mask = dice.binarize(output[None])[0]
        mask_path = masks / mask_names[index]
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_path)
        pixels = int(mask.sum())
        rows.append((index, [str(path), str(pixels),
                             format_number(pixels / mask.size), str(mask_path)]))
    bar.update(len(batch) + len(bad))
    bar.set_postfix(bad=sum(len(v) for v in problems.values()), refresh=False)
  bar.close()
  with open(out, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(row for _, row in sorted(rows))
  report = {"model": loaded.source, "classes": loaded.classes, "protocol": loaded.protocol,
            "images": len(paths), "scored": len(rows), "out": str(out),
            "problems": {kind: {"count": len(items), "items": items}
                         for kind, items in sorted(problems.items())}}
  report_path(out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
  return report


def report_path(out: pathlib.Path) -> pathlib.Path:
  return out.with_name(out.stem + "_report.json")


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)

  def run() -> int:
    if args.batch_per_device < 1 or args.workers < 1:
      raise command_line.UsageError("--batch-per-device and --workers must be >= 1")
    out = local_output(args.out)
    check_writable(out)
    from spcl_jax.inference import images, model  # pylint: disable=g-import-not-at-top
    paths = images.list_images(args.images)
    loaded = model.load_workdir(args.workdir) if args.workdir else model.load_export(args.model)
    scorer = model.Scorer(loaded, args.batch_per_device)
    masks = None
    if loaded.protocol not in CLASSIFICATION_PROTOCOLS:
      masks = pathlib.Path(args.masks or out.with_name(out.stem + "_masks")).expanduser()
    report = predict_files(scorer, paths, out, masks, args.workers)
    print(f"scored {report['scored']} of {report['images']} images with {loaded.source}; "
          f"wrote {out}" + (f" and masks in {masks}" if masks else ""))
    for kind, problem in report["problems"].items():
      for item in problem["items"]:
        print(f"  {kind}: {item['detail']}")
    print(f"report: {report_path(out)}")
    return 0
  return command_line.run_command(run, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
