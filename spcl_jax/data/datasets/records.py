"""One dataset's images -> TFDS array_record records (a GeneratorBasedBuilder, manual download).

TFDS writes from one process, so the expensive part (reading, decoding DICOM/PNG/JPEG, resizing,
re-encoding, decoding masks) runs in a pool of N worker processes inside the example generator;
the generator only hands encoded bytes to the writer. Examples keep the manifest order
(`disable_shuffling` with integer keys), so record i is the i-th image that decoded, and the
prepare step can write the records index without reading the records back.

Record features: name, patient, view (text), image (S x S x 1, JPEG or PNG bytes), labels (raw
codes, int8, when the dataset has labels), mask (S x S x 1 PNG of 0/1, SIIM only).
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import pathlib
import types
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from spcl_jax.data import decode, dicom, rle
from spcl_jax.data.datasets import manifest as mf

SPLIT = "images"  # The one TFDS split: train/val/test are index lists in OUT/splits/.
ENCODINGS = ("jpeg", "png")


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
  image_size: int = 512
  encoding: str = "jpeg"
  jpeg_quality: int = 95
  resize_filter: str = "bilinear"
  min_side: int = decode.MIN_IMAGE_SIDE  # Images with a smaller side are skipped (too_small).

  def __post_init__(self):
    if self.encoding not in ENCODINGS:
      raise ValueError(f"--encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
    if not 16 <= self.image_size <= 4096:
      raise ValueError(f"--image-size {self.image_size} is outside 16..4096")
    if self.min_side < 1:
      raise ValueError(f"--min-side {self.min_side} must be at least 1")
    if self.resize_filter not in decode.resize_filter_names():
      raise ValueError(f"--resize-filter {self.resize_filter!r} is not one of "
                       f"{', '.join(decode.resize_filter_names())}")


def encode_uint8(image: np.ndarray, settings: EncodeSettings) -> bytes:
  """8-bit grayscale -> JPEG (4:4:4 is moot for one channel) or lossless PNG bytes."""
  buffer = io.BytesIO()
  if settings.encoding == "jpeg":
    Image.fromarray(image, mode="L").save(buffer, "JPEG", quality=settings.jpeg_quality)
  else:
    Image.fromarray(image, mode="L").save(buffer, "PNG", compress_level=6)
  return buffer.getvalue()


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  # Nearest keeps the mask binary; a smoothing filter would invent fractional labels.
  return np.asarray(Image.fromarray(mask, mode="L").resize((size, size), Image.Resampling.NEAREST))


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array, mode="L").save(buffer, "PNG")
  return buffer.getvalue()


def decode_file(data: bytes, path: str, settings: EncodeSettings) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 (S, S). JPEGs use libjpeg's DCT-domain downscaling (`draft`, never
  below S): 2.5x faster on MIMIC-sized 2500 x 3000 JPEGs, and 0.2 gray levels from a full decode
  plus resize on average. Everything else goes through the pipeline's `decode_image`."""
  if data[:2] == b"\xff\xd8":  # JPEG start-of-image marker.
    try:
      with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (settings.image_size, settings.image_size))
        image.load()
        if image.mode == "L":
          return decode.resize_to_uint8(image, settings.image_size, settings.resize_filter)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
      raise ValueError(f"cannot decode image {path!r}: {e}") from e
  return decode.decode_image({"name": path, "encoded": data}, settings.image_size,
                             settings.resize_filter)


def _too_small_detail(width: int, height: int, full_path: pathlib.Path,
                      settings: EncodeSettings) -> str:
  if min(width, height) >= settings.min_side:
    return ""
  return f"{str(full_path)!r} is {width}x{height} px, a side below --min-side {settings.min_side}"


def read_stored_image(full_path: pathlib.Path, path: str, image_format: str,
                      settings: EncodeSettings
                      ) -> tuple[np.ndarray | None, tuple[int, int] | None, str, str]:
  """A raw file -> (uint8 S x S as prepare stores it before encoding, DICOM (rows, cols), "", "")
  or (None, None, problem kind, detail): the one decode prepare and `spcl_jax.predict` share
  (DICOM's modality/VOI LUTs and MONOCHROME1 inversion, 16-bit scaling, --min-side)."""
  try:
    data = full_path.read_bytes()
  except OSError as e:
    return None, None, "undecodable", f"cannot read {str(full_path)!r}: {e}"
  try:
    if image_format == "dicom":
      unit = dicom.decode_dicom(data, path)
      shape = unit.shape
      too_small = _too_small_detail(shape[1], shape[0], full_path, settings)
      if too_small:
        return None, None, "too_small", too_small
      return (decode.resize_to_uint8(unit, settings.image_size, settings.resize_filter), shape,
              "", "")
    too_small = _too_small_detail(*decode.encoded_size(data, path), full_path, settings)
    if too_small:
      return None, None, "too_small", too_small
    return decode_file(data, path, settings), None, "", ""
  except Exception as e:  # pylint: disable=broad-except  (decoders raise many types)
    return None, None, "undecodable", f"{str(full_path)!r}: {e}"


# Per-worker-process state, set once by the pool initializer (not shipped with every task).
_WORKER: dict = {}


def init_worker(src: str, image_format: str, settings: EncodeSettings) -> None:
  _WORKER.update(src=pathlib.Path(src), image_format=image_format, settings=settings)


def process_entry(task: tuple[int, str, str, tuple[str, ...]]
                  ) -> tuple[int, dict | None, str, str]:
  """(key, path, name, mask rles) -> (key, {"image": bytes[, "mask": bytes]}, "", "")
  or (key, None, problem kind, detail). Bad input never raises: one bad file must not stop
  the run (only a mask on a non-DICOM dataset, a programming error, does)."""
  key, path, name, mask_rles = task
  settings: EncodeSettings = _WORKER["settings"]
  full_path = _WORKER["src"] / path
  image, shape, kind, detail = read_stored_image(full_path, path, _WORKER["image_format"],
                                                 settings)
  if image is None:
    return key, None, kind, detail
  payload = {"image": encode_uint8(image, settings)}
  if mask_rles:
    if shape is None:
      raise ValueError("masks are only defined for DICOM datasets (their size comes from the "
                       "image)")
    try:
      mask = rle.rle_union(mask_rles, *shape)
    except ValueError as e:
      return key, None, "bad_mask", f"{name}: {e}"
    payload["mask"] = _png(_resize_mask(mask, settings.image_size))
  return key, payload, "", ""


def process_all(tasks: list, src: pathlib.Path, image_format: str, settings: EncodeSettings,
                workers: int) -> Iterator[tuple[int, dict | None, str, str]]:
  """Results in task order; a spawn pool (safe beside threads of TFDS/absl) when workers > 1."""
  if workers <= 1:
    init_worker(str(src), image_format, settings)
    yield from map(process_entry, tasks)
    return
  context = multiprocessing.get_context("spawn")
  with context.Pool(workers, initializer=init_worker,
                    initargs=(str(src), image_format, settings)) as pool:
    yield from pool.imap(process_entry, tasks, chunksize=8)


def _features(module: types.ModuleType, settings: EncodeSettings):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  size = settings.image_size
  features = {
      "name": tfds.features.Text(),
      "patient": tfds.features.Text(),
      "view": tfds.features.Text(),
      "image": tfds.features.Image(shape=(size, size, 1), encoding_format=settings.encoding),
  }
  if module.LABELS:
    features["labels"] = tfds.features.Tensor(shape=(len(module.LABELS),), dtype=np.int8)
  if module.HAS_MASKS:
    features["mask"] = tfds.features.Image(shape=(size, size, 1), encoding_format="png")
  return tfds.features.FeaturesDict(features)


def builder_name(dataset: str) -> str:
  return f"spcl_{dataset}"


def make_builder(module: types.ModuleType, *, data_dir: pathlib.Path, src: pathlib.Path,
                 entries: list[mf.Entry], settings: EncodeSettings, workers: int,
                 on_result: Callable[[int, str, str], None]):
  """The builder for one dataset. `on_result(key, problem kind or "", detail)` sees every image."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class CxrRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Resized grayscale radiographs with their raw labels; see spcl_jax.data.datasets."""
    name = builder_name(module.NAME)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = module.__doc__

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # pylint: disable=no-self-argument
      # No checksums or metadata files live beside this code. TFDS's default probes the package
      # through `importlib_resources`, which it only declares for Python < 3.9, so it fails.
      return None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=module.__doc__, features=_features(module, settings),
          disable_shuffling=True,
          metadata=tfds.core.MetadataDict(
              dataset=module.NAME, label_names=list(module.LABELS),
              **dataclasses.asdict(settings)))

    def _split_generators(self, dl_manager):
      del dl_manager  # Entries already carry paths relative to src.
      return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
      tasks = [(key, e.path, e.name, e.mask_rles) for key, e in enumerate(entries)]
      for key, payload, kind, detail in process_all(tasks, src, module.IMAGE_FORMAT, settings,
                                                    workers):
        on_result(key, kind, detail)
        if payload is None:
          continue
        entry = entries[key]
        example = {"name": entry.name, "patient": entry.patient, "view": entry.view, **payload}
        if module.LABELS:
          example["labels"] = np.asarray(entry.labels, dtype=np.int8)
        yield key, example

  return CxrRecords(data_dir=str(data_dir), file_format="array_record")
