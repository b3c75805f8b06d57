"""Features of every image of a folder or prepared dataset, from a pre-training checkpoint.

  python -m spcl_jax.extract --workdir W (--images DIR | --data PREPARED [--split S]) \
      --out feats.npz [--step S] [--batch-size 32] [--mean-patch] [--dtype float32|bfloat16]

Each image is seen whole (all N patches + CLS, as fine-tuning sees it, not a masking partition)
and preprocessed exactly as in pre-training, from WORKDIR/config.json: `decode_image` at the
run's image size and resize filter, then (u8 / 255 - mean) / std in float32 on the device.

feats.npz holds `names` (M,) str, `cls` (M, D) float32 (the CLS output after the final norm,
the S-PCL embedding z), with --mean-patch `mean_patch` (M, D) (the mean of the final-norm patch
tokens), and `step`, `variant`, `image_size`, `workdir` to say where they came from.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from spcl_jax import cli_errors, features
from spcl_jax.atomic_file import check_writable, local_output, write_atomically
from spcl_jax.cli_errors import run_command
from spcl_jax.data import sources
from spcl_jax.pretrained import PretrainedEncoder, load_pretrained
from spcl_jax.workdir_path import as_path

PREPARED_KIND = "prepared"


def prepared_source_spec(data: str, split: str | None) -> str:
  """The `open_source` spec for a prepared dataset (spcl_jax.data.prepared's kind)."""
  # spcl_jax.data.prepared's syntax: prepared:OUT_DIR[,split=S][,views=...][,fraction=...]
  return f"{PREPARED_KIND}:{data}" if split is None else f"{PREPARED_KIND}:{data},split={split}"


def open_images(images: str | None = None, data: str | None = None,
                split: str | None = None) -> sources.ImageSource:
  """--images DIR (every PNG/JPEG under it) or --data PREPARED [--split S]."""
  if (images is None) == (data is None):
    raise ValueError("give exactly one of --images DIR and --data PREPARED")
  if images is not None:
    if split is not None:
      raise ValueError("--split applies to --data PREPARED only, not to --images")
    return _image_folder(images)
  return sources.open_source(prepared_source_spec(data, split))


def _image_folder(images: str) -> sources.FolderSource:
  folder = pathlib.Path(images).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"--images {images!r} does not exist or is not a directory")
  if not any(p.suffix.lower() in sources.IMAGE_SUFFIXES for p in folder.rglob("*")):
    raise ValueError(f"--images {images!r}: no {'/'.join(sources.IMAGE_SUFFIXES)} files in it")
  return sources.FolderSource(folder)


def extract_features(pretrained: PretrainedEncoder, source: sources.ImageSource, *,
                     batch_size: int = 32, mean_patch: bool = False,
                     progress: bool = True) -> dict[str, np.ndarray]:
  """Features of every image of `source`, in source order, on every local device.

  `spcl_jax.features` does the work (shared with the evaluators): the batch is split over all
  devices, rounded up to a multiple of them, and the last batch's padding is masked out.
  """
  if batch_size < 1:
    raise ValueError(f"--batch-size {batch_size}: must be at least 1")
  if len(source) == 0:
    raise ValueError(f"{source!r} has no images")
  poolings = ("cls", "mean_patch") if mean_patch else ("cls",)
  _, batch_sharding = features.data_parallel_mesh()
  encode = features.make_encode_fn(pretrained.model, pretrained.mean, pretrained.std, poolings,
                                   batch_sharding)
  params = jax.device_put(pretrained.params, NamedSharding(batch_sharding.mesh, P()))
  # float32 features at full precision: accelerators otherwise round float32 matmuls.
  with jax.default_matmul_precision("highest"):
    result = features.extract(encode, params, source, batch_sharding=batch_sharding,
                              image_size=pretrained.image_size,
                              resize_filter=pretrained.resize_filter, batch_size=batch_size,
                              progress=progress)
  result["names"] = np.asarray(features.record_names(source), dtype=str)
  return result


def check_out(out: str | os.PathLike[str]) -> pathlib.Path:
  out = local_output(out)
  check_writable(out)
  return out


def write_features(features: dict[str, np.ndarray], pretrained: PretrainedEncoder,
                   out: str | os.PathLike[str]) -> pathlib.Path:
  out = check_out(out)
  provenance = dict(step=np.int64(pretrained.step),
                    variant=np.asarray(pretrained.info["model"]["variant"]),
                    image_size=np.int64(pretrained.image_size),
                    workdir=np.asarray(str(as_path(pretrained.workdir))))
  def write(tmp: pathlib.Path) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to other names
      np.savez(f, **features, **provenance)
  return write_atomically(out, write)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = cli_errors.ArgumentParser(
      prog="python -m spcl_jax.extract",
      description="CLS features (and optionally mean patch tokens) of whole images.")
  parser.add_argument("--workdir", required=True, help="the pre-training workdir")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  inputs = parser.add_mutually_exclusive_group(required=True)
  inputs.add_argument("--images", help="a folder of PNG/JPEG images (searched recursively)")
  inputs.add_argument("--data", help="a prepared dataset folder (the dataset preparation's OUT_DIR)")
  parser.add_argument("--split", default=None, help="split of the prepared dataset (--data)")
  parser.add_argument("--out", required=True, help="the .npz file to write")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--mean-patch", action="store_true",
                      help="also store the mean of the patch tokens")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="computation dtype; float32 reproduces the exported models")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)

  def extract() -> int:
    check_out(args.out)  # before hours of extraction, not after
    source = open_images(args.images, args.data, args.split)
    pretrained = load_pretrained(args.workdir, args.step, dtype=args.dtype)
    features = extract_features(pretrained, source, batch_size=args.batch_size,
                                mean_patch=args.mean_patch, progress=not args.no_progress)
    out = write_features(features, pretrained, args.out)
    print(f"wrote {out}: {len(features['names'])} images, features of width "
          f"{features['cls'].shape[1]} (checkpoint step {pretrained.step})")
    return 0
  # One `error:` line naming the file or field, not a traceback (spcl_jax.cli_errors).
  return run_command(extract, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
