"""Host-side image decoding: bytes or arrays -> grayscale in [0, 1] -> resized -> uint8.

The pipeline sends uint8 to the device (a quarter of float32's bytes) and the train step
normalises with the dataset mean/std. Here we only bring every input onto one intensity scale:
8-bit images as they are, 16-bit images divided by their format's largest code value (65535),
float arrays taken as already in [0, 1].
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

# Images with a smaller side are refused (prepare: too_small; folder: an error): resized to the
# model's input, a 1x1 image becomes a flat square that would train as if it were a radiograph.
MIN_IMAGE_SIDE = 64

_RESIZE_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


def resize_filter_names() -> list[str]:
  return sorted(_RESIZE_FILTERS)


def _pil_to_unit_float(im: Image.Image, name: str) -> np.ndarray | Image.Image:
  """Returns an 8-bit 'L' image untouched, or a float32 array in [0, 1] for other depths."""
  if im.mode == "L":
    return im
  if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
    return np.asarray(im, dtype=np.float32) / 65535.0
  if im.mode == "I":
    # PIL opens 16-bit grayscale PNGs as 32-bit 'I'; values never exceed 16 bits there.
    arr = np.asarray(im, dtype=np.float32)
    if arr.min() < 0 or arr.max() > 65535:
      raise ValueError(f"image {name!r}: 32-bit integer pixels outside the 16-bit range")
    return arr / 65535.0
  if im.mode in ("1", "P", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "PA", "RGBX"):
    # Colour-encoded radiographs: luminance is the grayscale image they carry.
    return im.convert("L")
  raise ValueError(f"image {name!r}: unsupported pixel mode {im.mode!r}")


def to_unit_range(array: np.ndarray, name: str) -> np.ndarray:
  """A 2-D array of any supported dtype -> float32 in [0, 1]."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 2:
    raise ValueError(f"image {name!r}: expected a 2-D grayscale array, got shape {array.shape}")
  if array.dtype == np.uint8:
    return array.astype(np.float32) / 255.0
  if array.dtype == np.uint16:
    return array.astype(np.float32) / 65535.0
  if np.issubdtype(array.dtype, np.floating):
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
      raise ValueError(f"image {name!r}: float pixels must be finite and in [0, 1]")
    return array.astype(np.float32)
  raise ValueError(f"image {name!r}: unsupported array dtype {array.dtype}")


def resize_to_uint8(image: np.ndarray | Image.Image, size: int, resize_filter: str) -> np.ndarray:
  """Direct (no crop) resize to size x size, then rounding to 8 bits."""
  resample = _RESIZE_FILTERS[resize_filter]
  if isinstance(image, Image.Image):  # 8-bit 'L': resize in PIL's integer path.
    if image.size != (size, size):
      image = image.resize((size, size), resample=resample)
    return np.asarray(image, dtype=np.uint8)
  if image.shape != (size, size):
    image = np.asarray(
        Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), resample=resample))
  return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def encoded_size(data: bytes, name: str) -> tuple[int, int]:
  """(width, height) of PNG/JPEG/... bytes from the header alone (no pixels are decoded)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.size
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot decode image {name!r}: {e}") from e


def decode_image(record: dict[str, Any], image_size: int, resize_filter: str = "bilinear"
                 ) -> np.ndarray:
  """One source record -> a (image_size, image_size) uint8 grayscale image.

  Errors name the record, so a corrupt file in a million-image folder can be found.
  """
  name = record.get("name", "<unnamed>")
  if "image" in record:
    array = np.asarray(record["image"])
    if array.dtype == np.uint8 and array.ndim == 2:
      return resize_to_uint8(Image.fromarray(array, mode="L"), image_size, resize_filter)
    return resize_to_uint8(to_unit_range(array, name), image_size, resize_filter)
  if "encoded" not in record:
    raise ValueError(f"record {name!r} has neither 'image' nor 'encoded'")
  try:
    with Image.open(io.BytesIO(record["encoded"])) as im:
      im.load()
      image = _pil_to_unit_float(im, name)
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot decode image {name!r}: {e}") from e
  return resize_to_uint8(image, image_size, resize_filter)
