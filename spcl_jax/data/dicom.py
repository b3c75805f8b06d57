"""DICOM radiographs -> grayscale float32 in [0, 1] (docs/method.md §7).

Order of operations, as the DICOM standard defines the grayscale pipeline:
  stored values -> modality LUT (rescale slope/intercept, or a modality LUT table)
  -> VOI LUT (a LUT table, else the first window centre/width) when the file has one,
     else the image's own min..max -> [0, 1]
  -> MONOCHROME1 (white = low values) inverted, so that bone is bright in every image.
Compressed transfer syntaxes (JPEG baseline/lossless, JPEG-LS, JPEG 2000) decode through the
pylibjpeg plugins that pydicom finds on its own.
"""

from __future__ import annotations

import io

import numpy as np

_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


def _window_to_unit(values: np.ndarray, center: float, width: float, function: str
                    ) -> np.ndarray:
  """VOI windowing (DICOM PS3.3 C.11.2.1.2) straight onto [0, 1] instead of the output bit range."""
  if function == "SIGMOID":
    return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
  if function == "LINEAR_EXACT":
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)
  if width < 1:
    raise ValueError(f"window width {width} < 1 is invalid for the LINEAR VOI function")
  # LINEAR: the standard's half-pixel offsets (center - 0.5, width - 1).
  if width == 1:
    return (values > center - 0.5).astype(np.float64)
  return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first_number(value) -> float:
  """Window centre/width may be multi-valued (several presets); the first is the default one."""
  if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
    value = value[0]
  return float(value)


def _voi_to_unit(values: np.ndarray, ds) -> np.ndarray | None:
  """Applies the file's VOI LUT and returns [0, 1], or None when the file has none."""
  from pydicom.pixels import apply_voi  # pylint: disable=g-import-not-at-top
  if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
    lut_item = ds.VOILUTSequence[0]
    output_bits = int(lut_item.LUTDescriptor[2])
    # A LUT table is indexed by value: give it integers (a rescale may have made floats).
    if not np.issubdtype(values.dtype, np.integer):
      values = np.rint(values).astype(np.int64)
    return apply_voi(values, ds).astype(np.float64) / float(2**output_bits - 1)
  if "WindowCenter" in ds and "WindowWidth" in ds:
    center = _first_number(ds.WindowCenter)
    width = _first_number(ds.WindowWidth)
    function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return _window_to_unit(values.astype(np.float64), center, width, function)
  return None


def _min_max_to_unit(values: np.ndarray, name: str) -> np.ndarray:
  low, high = float(values.min()), float(values.max())
  if high <= low:
    raise ValueError(f"DICOM {name!r}: every pixel has the value {low}: no image to scale")
  return (values - low) / (high - low)


def dataset_to_unit_range(ds, name: str) -> np.ndarray:
  """A read pydicom Dataset -> 2-D float32 image in [0, 1], MONOCHROME1 already inverted."""
  from pydicom.pixels import apply_modality_lut  # pylint: disable=g-import-not-at-top
  photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
  if photometric not in _GRAYSCALE:
    raise ValueError(f"DICOM {name!r}: PhotometricInterpretation {photometric or '(missing)'!r}"
                     f" is not grayscale ({' or '.join(_GRAYSCALE)})")
  if "PixelData" not in ds:
    raise ValueError(f"DICOM {name!r}: no PixelData element")
  try:
    stored = ds.pixel_array
  except Exception as e:  # pydicom raises many types for missing plugins and bad streams.
    raise ValueError(f"DICOM {name!r}: cannot decode pixel data "
                     f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}): {e}") from e
  if stored.ndim != 2:
    raise ValueError(f"DICOM {name!r}: expected one grayscale frame, got pixel array of shape "
                     f"{stored.shape}")
  values = np.asarray(apply_modality_lut(stored, ds))
  unit = _voi_to_unit(values, ds)
  if unit is None:
    unit = _min_max_to_unit(values.astype(np.float64), name)
  if photometric == "MONOCHROME1":
    unit = 1.0 - unit
  return np.clip(unit, 0.0, 1.0).astype(np.float32)


def decode_dicom(data: bytes, name: str) -> np.ndarray:
  """DICOM file bytes -> 2-D float32 in [0, 1]. Errors are ValueErrors that name the file."""
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom.errors import InvalidDicomError  # pylint: disable=g-import-not-at-top
  try:
    ds = pydicom.dcmread(io.BytesIO(data))
  except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as e:
    raise ValueError(f"DICOM {name!r}: cannot parse the file: {e}") from e
  return dataset_to_unit_range(ds, name)
