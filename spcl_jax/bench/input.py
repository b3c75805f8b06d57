"""Input benchmark: decoded images/s from a prepared folder, and the storage format trade-off.

  python -m spcl_jax.bench input --data OUT_DIR [--workers N] [--seconds 10] [--split all]
      images/s on one core (source read + decode in this process, no pipeline) and through the
      training input pipeline with N grain worker processes (shuffled reads, decode, batching).
      With --target-rate R (default 2300, one H200's vitb512 step), also the CPU cores that
      would feed R images/s per accelerator at each measured per-core rate.
  python -m spcl_jax.bench input --formats [--image-size 512]
      JPEG quality 95 vs lossless PNG on the bundled sample radiographs: bytes per image,
      encode ms, decode images/s on one core, PSNR. This is what chose the default encoding.
The last line printed is a JSON object with every number, for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import signal
import time

import numpy as np
from PIL import Image

from spcl_jax.configs import default
from spcl_jax.data import decode, pipeline
from spcl_jax.data.datasets import records
from spcl_jax.data.sources import SAMPLE_DIR


def one_core_rate(source, image_size: int, seconds: float, seed: int = 0) -> dict:
  """Reads and decodes shuffled records in this process until `seconds` have passed."""
  order = np.random.default_rng(seed).permutation(len(source))
  read_s = decode_s = 0.0
  count = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    t0 = time.perf_counter()
    record = source[int(order[count % len(order)])]
    t1 = time.perf_counter()
    image = decode.decode_image(record, image_size)
    t2 = time.perf_counter()
    assert image.shape == (image_size, image_size)
    read_s, decode_s, count = read_s + t1 - t0, decode_s + t2 - t1, count + 1
  elapsed = time.perf_counter() - start
  return {"images_per_s": count / elapsed, "images": count,
          "read_ms": 1e3 * read_s / count, "decode_ms": 1e3 * decode_s / count}


_STALL_SECONDS = 300


@contextlib.contextmanager
def _watchdog(seconds: int):
  """Fails loudly instead of waiting forever if the pipeline's workers stop answering."""
  def on_alarm(signum, frame):
    del signum, frame
    raise TimeoutError(f"the input pipeline gave no batch for {seconds} s: its workers are "
                       "stuck or dead (see their errors above)")
  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def pipeline_rate(source, image_size: int, workers: int, seconds: float,
                  batch_size: int) -> dict:
  """images/s of the training input pipeline itself (`pipeline.train_dataset`: shuffled
  reads, decode, batching, `workers` grain processes), after a warm-up batch per worker."""
  config = default.get_config()  # the shipped defaults: the pipeline a real run gets
  config.batch_size, config.model.image_size = batch_size, image_size
  config.data.num_workers = workers
  iterator = iter(pipeline.train_dataset(config, source=source))
  try:
    with _watchdog(_STALL_SECONDS):
      for _ in range(max(1, workers)):  # Worker start-up is not throughput.
        next(iterator)
      count = 0
      start = time.perf_counter()
      while time.perf_counter() - start < seconds:
        count += next(iterator).shape[0]
      elapsed = time.perf_counter() - start
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  return {"images_per_s": count / elapsed, "images": count, "workers": workers,
          "images_per_s_per_worker": count / elapsed / max(1, workers)}


# images/s one accelerator consumes at the performance target (vitb512, batch 256, one H200).
TARGET_IMAGES_PER_S = 2300.0


def cores_for_rate(target_images_per_s: float, images_per_s_per_core: float) -> int:
  """Cores (decode workers) that feed `target_images_per_s` at the measured per-core rate."""
  if images_per_s_per_core <= 0:
    raise ValueError(f"a per-core rate must be positive, got {images_per_s_per_core}")
  return int(np.ceil(target_images_per_s / images_per_s_per_core))


def _sample_images(image_size: int) -> list[np.ndarray]:
  paths = sorted(SAMPLE_DIR.glob("*.png"))
  return [decode.decode_image({"name": p.name, "encoded": p.read_bytes()}, image_size)
          for p in paths]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
  return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def _finite_or_none(value: float) -> float | None:
  return value if np.isfinite(value) else None


def format_comparison(image_size: int, seconds: float) -> dict:
  """Stored size and decode speed of each encoding on the sample radiographs."""
  images = _sample_images(image_size)
  results = {}
  for encoding in records.ENCODINGS:
    settings = records.EncodeSettings(image_size, encoding)
    t0 = time.perf_counter()
    encoded = [records.encode_uint8(image, settings) for image in images]
    encode_ms = 1e3 * (time.perf_counter() - t0) / len(images)
    decoded = [np.asarray(Image.open(io.BytesIO(data))) for data in encoded]
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      decode.decode_image({"name": "x", "encoded": encoded[count % len(encoded)]}, image_size)
      count += 1
    results[encoding] = {
        "kib_per_image": sum(map(len, encoded)) / len(encoded) / 1024,
        "encode_ms": encode_ms,
        "decode_images_per_s_per_core": count / (time.perf_counter() - start),
        # None = lossless (JSON has no infinity).
        "min_psnr_db": _finite_or_none(min(_psnr(a, b) for a, b in zip(images, decoded))),
        "max_abs_error": int(max(np.abs(a.astype(int) - b).max() for a, b in zip(images, decoded))),
    }
  return results


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m spcl_jax.bench input", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", help="a prepared folder (python -m spcl_jax.data.prepare)")
  parser.add_argument("--split", default="all")
  parser.add_argument("--views", default="frontal", choices=("frontal", "all"))
  parser.add_argument("--workers", type=int, default=0,
                      help="also measure the training input pipeline with this many workers")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
  parser.add_argument("--formats", action="store_true",
                      help="compare JPEG q95 and PNG on the bundled sample images")
  parser.add_argument("--image-size", type=int, default=512, help="for --formats")
  parser.add_argument("--target-rate", type=float, default=TARGET_IMAGES_PER_S,
                      help="images/s per accelerator to feed (default: %(default)g)")
  args = parser.parse_args(argv)
  if not args.data and not args.formats:
    parser.error("give --data OUT_DIR, --formats, or both")
  return args


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  results: dict = {}
  if args.formats:
    results["formats"] = format_comparison(args.image_size, args.seconds)
    for encoding, r in results["formats"].items():
      r["cores_for_target"] = cores_for_rate(args.target_rate, r["decode_images_per_s_per_core"])
      print(f"{encoding}: {r['kib_per_image']:.1f} KiB/image at {args.image_size}x"
            f"{args.image_size}, encode {r['encode_ms']:.1f} ms, decode "
            f"{r['decode_images_per_s_per_core']:.0f} images/s/core "
            f"({r['cores_for_target']} cores for {args.target_rate:g} images/s), PSNR >= "
            f"{r['min_psnr_db'] or float('inf'):.1f} dB, max abs error {r['max_abs_error']}")
  if args.data:
    from spcl_jax.data.prepared_folder import PreparedSource  # pylint: disable=g-import-not-at-top
    source = PreparedSource(pathlib.Path(args.data), split=args.split, views=args.views)
    image_size = source.folder.report["settings"]["image_size"]
    results["data"] = {"path": str(args.data), "images": len(source), "image_size": image_size,
                       "encoding": source.folder.report["settings"]["encoding"]}
    results["one_core"] = one_core_rate(source, image_size, args.seconds)
    r = results["one_core"]
    r["cores_for_target"] = cores_for_rate(args.target_rate, r["images_per_s"])
    print(f"{source}: one core {r['images_per_s']:.0f} images/s ({image_size}x{image_size}; "
          f"read {r['read_ms']:.2f} ms + decode {r['decode_ms']:.2f} ms per image); "
          f"{r['cores_for_target']} cores would feed {args.target_rate:g} images/s per "
          "accelerator")
    if args.workers > 0:
      results["pipeline"] = pipeline_rate(source, image_size, args.workers, args.seconds,
                                          args.batch_size)
      r = results["pipeline"]
      r["cores_for_target"] = cores_for_rate(args.target_rate, r["images_per_s_per_worker"])
      print(f"training input pipeline, {args.workers} workers: {r['images_per_s']:.0f} "
            f"images/s ({r['images_per_s_per_worker']:.0f} per worker); at that rate "
            f"{r['cores_for_target']} workers feed {args.target_rate:g} images/s per accelerator")
  results["target_images_per_s"] = args.target_rate
  print(json.dumps(results))
  return 0
