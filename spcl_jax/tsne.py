"""t-SNE of pre-trained features, disease vs No Finding, as the paper's Figure 3.

  python -m spcl_jax.tsne --workdir W (--images DIR | --data PREPARED [--split S]) --out tsne.png
  python -m spcl_jax.tsne --features feats.npz [--data PREPARED] --out tsne.png
      [--labels CSV | --name-label PATTERN=LABEL ...] [--max-images N] [--perplexity 30]
      [--seed 0] [--feature cls|mean_patch] [--step S] [--batch-size 32]

Features are those of `spcl_jax.extract` (the CLS output, the S-PCL embedding), computed here from
the workdir or read from a .npz it wrote. They are L2-normalised (S-PCL compares views by
cosine) and embedded with scikit-learn's Barnes-Hut TSNE. Writes the scatter (PNG, or any
format matplotlib knows by the suffix) and, beside it with a .csv suffix, `name,label,x,y` for
every image.

Labels: from a prepared folder's records (`--data`): "No Finding" when CheXpert's No Finding
column is positive, or, for the other datasets, when none of the dataset's findings is positive;
"Disease" otherwise. For single-finding sets (RSNA, SIIM): the finding vs "No <finding>".
For `--images`: a CSV (`--labels`, columns name,label) or regular expressions on the file names
(`--name-label PATTERN=LABEL`, searched case-insensitively, the first match wins).
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import re
import sys
from collections.abc import Sequence

import numpy as np

from spcl_jax import command_line
from spcl_jax.atomic_file import local_output
from spcl_jax.workdir_path import as_path

NO_FINDING, DISEASE, UNLABELLED = "No Finding", "Disease", "all images"
MIN_POINTS = 4  # t-SNE needs a few neighbours per point


# ---- labels ---------------------------------------------------------------------------------

def prepared_labels(data: str) -> dict[str, str]:
  """name -> label for every record of a prepared folder (see the module docstring)."""
  from spcl_jax.data.datasets import manifest  # pylint: disable=g-import-not-at-top
  from spcl_jax.data.prepared_folder import PreparedFolder  # pylint: disable=g-import-not-at-top
  folder = PreparedFolder(data)
  findings = list(folder.module.LABELS)
  if not findings:
    raise ValueError(f"--data {data!r}: {folder.dataset} has no labels; give --labels CSV or "
                     "--name-label PATTERN=LABEL")
  positive = folder.codes == manifest.POSITIVE
  if NO_FINDING in findings:
    normal = positive[:, findings.index(NO_FINDING)]
    names = (DISEASE, NO_FINDING)
  else:
    normal = ~positive.any(axis=1)
    names = (findings[0], f"No {findings[0]}") if len(findings) == 1 else (DISEASE, NO_FINDING)
  return {name: names[int(is_normal)] for name, is_normal in zip(folder.names, normal)}


def csv_labels(path: str) -> dict[str, str]:
  with open(pathlib.Path(path).expanduser(), newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or not {"name", "label"} <= set(reader.fieldnames):
      raise ValueError(f"--labels {path!r}: needs the columns 'name' and 'label' "
                       f"(has {reader.fieldnames})")
    return {row["name"]: row["label"] for row in reader}


def parse_name_labels(pairs: Sequence[str]) -> list[tuple[re.Pattern[str], str]]:
  rules = []
  for pair in pairs:
    pattern, sep, label = pair.rpartition("=")
    if not sep or not pattern or not label:
      raise ValueError(f"--name-label {pair!r}: expected PATTERN=LABEL")
    try:
      rules.append((re.compile(pattern, re.IGNORECASE), label))
    except re.error as e:
      raise ValueError(f"--name-label {pair!r}: bad regular expression ({e})") from e
  return rules


def label_names(names: Sequence[str], *, table: dict[str, str] | None = None,
                rules: Sequence[tuple[re.Pattern[str], str]] = (), source: str = "") -> list[str]:
  """One label per name; a name that the table or the rules do not cover is an error."""
  if table is None and not rules:
    return [UNLABELLED] * len(names)
  labels = []
  for name in names:
    if table is not None:
      label = table.get(name)
    else:
      label = next((label for pattern, label in rules if pattern.search(name)), None)
    if label is None:
      raise ValueError(f"{source}: no label for image {name!r}")
    labels.append(label)
  return labels


# ---- embedding and figure -------------------------------------------------------------------

def effective_perplexity(perplexity: float, num_points: int) -> float:
  """At most (n - 1) / 3: Barnes-Hut t-SNE looks at 3 x perplexity neighbours of each point."""
  if num_points < MIN_POINTS:
    raise ValueError(f"t-SNE needs at least {MIN_POINTS} images, got {num_points}")
  if perplexity <= 0:
    raise ValueError(f"--perplexity {perplexity}: must be positive")
  return min(float(perplexity), (num_points - 1) / 3)


def embed(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
  """(M, D) -> (M, 2) with scikit-learn's TSNE on L2-normalised features."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  features = np.asarray(features, np.float64)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  if not np.all(np.isfinite(features)) or np.any(norms == 0):
    raise ValueError("features contain NaN/Inf or all-zero rows")
  tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
              random_state=seed)
  return tsne.fit_transform(features / norms).astype(np.float32)


def legend_order(labels: Sequence[str]) -> list[tuple[str, int]]:
  """(label, count), most frequent first, as Figure 3's legend."""
  values, counts = np.unique(np.asarray(labels), return_counts=True)
  return sorted(zip(values.tolist(), counts.tolist()), key=lambda item: (-item[1], item[0]))


def plot(coordinates: np.ndarray, labels: Sequence[str], out: pathlib.Path, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only: no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = np.asarray(labels)
  size = float(np.clip(3000 / len(labels), 2, 30))  # small dots for 10k points, visible for 16
  fig, ax = plt.subplots(figsize=(7, 6), dpi=150)
  colours = matplotlib.colormaps["tab10"]
  for i, (label, count) in enumerate(legend_order(labels)):
    points = coordinates[labels == label]
    ax.scatter(points[:, 0], points[:, 1], s=size, alpha=0.7, color=colours(i % 10),
               label=f"{label} (n={count})", linewidths=0)
  ax.legend(loc="best", markerscale=max(1.0, 20 / size) ** 0.5, frameon=True)
  ax.set_xticks([])  # t-SNE axes have no units
  ax.set_yticks([])
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def write_csv(path: pathlib.Path, names: Sequence[str], labels: Sequence[str],
              coordinates: np.ndarray) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["name", "label", "x", "y"])
    for name, label, (x, y) in zip(names, labels, coordinates):
      writer.writerow([name, label, f"{x:.6g}", f"{y:.6g}"])


# ---- features -------------------------------------------------------------------------------

def subset_indices(total: int, max_images: int | None, seed: int) -> np.ndarray:
  """All indices, or a seeded random `max_images` of them in their original order."""
  if max_images is None or max_images >= total:
    return np.arange(total)
  if max_images < 1:
    raise ValueError(f"--max-images {max_images}: must be at least 1")
  return np.sort(np.random.default_rng(seed).choice(total, max_images, replace=False))


class _Subset:
  """The chosen records of an image source, in order (extraction reads only these)."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[int(self.indices[index])]

  def __repr__(self) -> str:
    return f"{len(self)} images of {self.source!r}"


def features_from_npz(path: str, feature: str, max_images: int | None, seed: int):
  with np.load(pathlib.Path(path).expanduser()) as npz:
    if feature not in npz or "names" not in npz:
      raise ValueError(f"--features {path!r} has no {feature!r} (keys: {', '.join(npz.files)}); "
                       "write it with python -m spcl_jax.extract" +
                       (" --mean-patch" if feature == "mean_patch" else ""))
    keep = subset_indices(len(npz["names"]), max_images, seed)
    where = (f"{pathlib.Path(str(npz['workdir'])).name} @ step {int(npz['step'])}"
             if "workdir" in npz else path)
    return npz["names"][keep].tolist(), npz[feature][keep], where


def features_from_workdir(args: argparse.Namespace):
  from spcl_jax import extract  # pylint: disable=g-import-not-at-top
  from spcl_jax.pretrained import load_pretrained  # pylint: disable=g-import-not-at-top
  source = extract.open_images(args.images, args.data, args.split)
  source = _Subset(source, subset_indices(len(source), args.max_images, args.seed))
  pretrained = load_pretrained(args.workdir, args.step)
  feats = extract.extract_features(pretrained, source, batch_size=args.batch_size,
                                   mean_patch=args.feature == "mean_patch",
                                   progress=not args.no_progress)
  where = f"{as_path(pretrained.workdir).name} @ step {pretrained.step}"
  return feats["names"].tolist(), feats[args.feature], where


# ---- command line ---------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = command_line.ArgumentParser(prog="python -m spcl_jax.tsne",
                                   description="t-SNE scatter of pre-trained features (Figure 3).")
  parser.add_argument("--workdir", help="the pre-training workdir (features computed here)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--features", help="a .npz from python -m spcl_jax.extract instead")
  parser.add_argument("--images", help="a folder of PNG/JPEG images (with --workdir)")
  parser.add_argument("--data", help="a prepared dataset folder: images (with --workdir) and "
                      "labels")
  parser.add_argument("--split", default=None, help="split of --data, e.g. test")
  parser.add_argument("--out", required=True, help="the figure (.png); the .csv goes beside it")
  labels = parser.add_mutually_exclusive_group()
  labels.add_argument("--labels", help="CSV with columns name,label")
  labels.add_argument("--name-label", action="append", default=[], metavar="PATTERN=LABEL",
                      help="label images whose name matches the regex PATTERN (repeatable)")
  parser.add_argument("--max-images", type=int, default=None,
                      help="a seeded random subset of this many images (the paper: 10000)")
  parser.add_argument("--perplexity", type=float, default=30.0,
                      help="clamped to (images - 1) / 3 for small sets")
  parser.add_argument("--seed", type=int, default=0, help="subset and t-SNE seed")
  parser.add_argument("--feature", default="cls", choices=("cls", "mean_patch"))
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
  args = parser.parse_args(argv)
  if (args.workdir is None) == (args.features is None):
    parser.error("give exactly one of --workdir (with --images or --data) and --features")
  if args.features is not None and (args.images or args.split):
    parser.error("--features takes no --images/--split (its images are already chosen); "
                 "--data only gives their labels")
  if args.data and (args.labels or args.name_label):
    parser.error("--data gives the labels: drop --labels/--name-label")
  return args


def run(args: argparse.Namespace) -> tuple[pathlib.Path, pathlib.Path, list[tuple[str, int]]]:
  out = local_output(args.out)
  if not out.parent.is_dir():
    raise FileNotFoundError(f"--out {args.out!r}: folder {str(out.parent)!r} does not exist")
  rules = parse_name_labels(args.name_label)
  table = csv_labels(args.labels) if args.labels else None
  if args.data:
    table = prepared_labels(args.data)  # before extraction: a bad folder fails fast
  if args.features:
    names, features, where = features_from_npz(args.features, args.feature, args.max_images,
                                               args.seed)
  else:
    names, features, where = features_from_workdir(args)
  source = args.data or args.labels or "--name-label"
  labels = label_names(names, table=table, rules=rules, source=source)
  perplexity = effective_perplexity(args.perplexity, len(names))
  if perplexity != args.perplexity:
    print(f"perplexity {args.perplexity:g} -> {perplexity:g} for {len(names)} images")
  print(f"t-SNE of {len(names)} {args.feature} features ({features.shape[1]}-d), "
        f"perplexity {perplexity:g}", flush=True)
  coordinates = embed(features, perplexity, args.seed)
  plot(coordinates, labels, out, f"t-SNE of {args.feature} features, {where} "
       f"({len(names)} images, perplexity {perplexity:g})")
  table_path = out.with_suffix(".csv")
  write_csv(table_path, names, labels, coordinates)
  return out, table_path, legend_order(labels)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)

  def tsne() -> int:
    figure, table, counts = run(args)
    summary = ", ".join(f"{label} (n={count})" for label, count in counts)
    print(f"wrote {figure} and {table}: {summary}")
    return 0
  # One `error:` line naming the file or field, not a traceback (spcl_jax.command_line).
  return command_line.run_command(tsne, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
