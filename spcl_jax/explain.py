"""python -m spcl_jax.explain --workdir F | --model OUT.safetensors --images DIR|LIST.txt|CSV
       --class NAME --out DIR [--steps 128] [--batch-per-device 4]

Where a fine-tuned classifier looked: for each image, the patches that drove the logit of class
NAME, by integrated gradients summed per patch (`inference.saliency` says what that is and why
it, not plain gradient x input nor attention rollout). Images are read as `spcl_jax.predict`
reads them (prepare's decode, the run's eval transform). Writes, per image, to DIR:
  <stem>.png   the model's input (grayscale) with the map over it: red pushed the class up,
               blue pushed it down, colour scaled to the image's largest |value|; the title
               gives the class, its probability and the hottest patch
  <stem>.npy   the raw map, float32 (S / P, S / P), one value per patch, row-major
and DIR/saliency.csv (path, probability, hottest patch row/column, map sum). A file that
cannot be read is listed in DIR/saliency_report.json and never stops the others.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from spcl_jax import command_line, inference
from spcl_jax.atomic_file import local_output
from spcl_jax.downstream import CLASSIFICATION_PROTOCOLS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = command_line.ArgumentParser(prog="python -m spcl_jax.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
  inference.add_source_arguments(parser)
  parser.add_argument("--class", required=True, dest="class_name", help="the class to explain")
  parser.add_argument("--out", required=True, help="the folder for the PNGs and .npy maps")
  parser.add_argument("--steps", type=int, default=128, help="integration steps (default 128)")
  parser.add_argument("--batch-per-device", type=int, default=4)
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
  return parser.parse_args(argv)


def overlay_png(image: np.ndarray, saliency_map: np.ndarray, title: str, out: pathlib.Path
                ) -> None:
  """The uint8 input with the per-patch map over it, diverging colours centred at zero."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  size = image.shape[0]
  scale = float(np.abs(saliency_map).max()) or 1.0
  fig, ax = plt.subplots(figsize=(5, 5.4))
  ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=(0, size, size, 0))
  heat = ax.imshow(saliency_map, cmap="bwr", vmin=-scale, vmax=scale, alpha=0.45,
                   extent=(0, size, size, 0), interpolation="nearest")
  fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.03, label="share of the logit")
  ax.set_title(title, fontsize=9)
  ax.axis("off")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def explain_files(scorer, paths, class_name: str, out: pathlib.Path, steps: int) -> dict:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from spcl_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from spcl_jax.finetune.predictions import sigmoid  # pylint: disable=g-import-not-at-top
  from spcl_jax.inference import images, saliency  # pylint: disable=g-import-not-at-top
  loaded = scorer.loaded
  if loaded.protocol not in CLASSIFICATION_PROTOCOLS:
    raise ValueError(f"{loaded.source} is a segmentation model: its masks (python -m "
                     "spcl_jax.predict) already show where it looks")
  if class_name not in loaded.classes:
    raise command_line.UsageError(f"--class {class_name!r} is not one of the model's classes: "
                                f"{', '.join(loaded.classes)}")
  k = loaded.classes.index(class_name)
  model, config = scorer.ft.model, scorer.config
  explain = saliency.integrated_gradients_fn(
      lambda params, x: model.apply({"params": params}, x, train=False),
      model.encoder.patch_size, float(config.data.mean), float(config.data.std), steps)
  out.mkdir(parents=True, exist_ok=True)
  stems = [p.stem for p in paths]
  problems, rows = [], []
  for start in tqdm(range(0, len(paths), scorer.batch_size), desc="explain", unit="batch"):
    batch, kept = [], []
    for index in range(start, min(start + scorer.batch_size, len(paths))):
      encoded, kind, detail = images.stored_bytes(paths[index], loaded.stored)
      if encoded is None:
        problems.append({"path": str(paths[index]), "kind": kind, "detail": detail})
        continue
      batch.append(scorer.model_input(str(paths[index]), encoded))
      kept.append(index)
    if not batch:
      continue
    inputs = np.stack(batch)
    padded = np.concatenate([inputs, np.repeat(inputs[-1:], scorer.batch_size - len(batch), 0)])
    sharded = steps_lib.global_batch(padded, scorer.mesh, config)  # split over every device
    maps = np.asarray(explain(scorer.params, sharded, k), np.float32)[:len(batch)]
    probabilities = sigmoid(scorer.outputs(inputs)[:, k])
    for index, image, saliency_map, p in zip(kept, inputs, maps, probabilities):
      stem = stems[index] if stems.count(stems[index]) == 1 else f"{stems[index]}_{index}"
      row, col = saliency.hottest_patch(saliency_map)
      np.save(out / f"{stem}.npy", saliency_map)
      overlay_png(image, saliency_map, f"{class_name}: p = {p:.3f}; hottest patch (row {row}, "
                  f"col {col})\n{paths[index].name}", out / f"{stem}.png")
      rows.append([str(paths[index]), f"{p:.6g}", row, col, f"{saliency_map.sum():.6g}"])
  with open(out / "saliency.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["path", f"prob_{class_name}", "hottest_row", "hottest_col", "map_sum"])
    writer.writerows(rows)
  report = {"model": loaded.source, "class": class_name, "method": "integrated gradients "
            f"per patch, {steps} steps, mean-intensity baseline", "images": len(paths),
            "explained": len(rows), "problems": problems}
  (out / "saliency_report.json").write_text(json.dumps(report, indent=1) + "\n")
  return report


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)

  def run() -> int:
    if args.steps < 1 or args.batch_per_device < 1:
      raise command_line.UsageError("--steps and --batch-per-device must be >= 1")
    out = local_output(args.out, folder=True)
    from spcl_jax.inference import images, model  # pylint: disable=g-import-not-at-top
    paths = images.list_images(args.images)
    loaded = model.load_workdir(args.workdir) if args.workdir else model.load_export(args.model)
    report = explain_files(model.Scorer(loaded, args.batch_per_device), paths, args.class_name,
                           out, args.steps)
    print(f"explained {report['explained']} of {report['images']} images for "
          f"{args.class_name!r}; wrote PNGs, .npy maps and saliency.csv to {out}")
    for item in report["problems"]:
      print(f"  {item['kind']}: {item['detail']}")
    return 0
  return command_line.run_command(run, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
