"""Image files to score: which ones (`list_images`) and each one as its model input.

--images takes a folder (every .png/.jpg/.jpeg/.dcm/.dicom below it, in sorted order), a .txt
list (one path a line, relative to the list's folder; blank and # lines skipped) or a .csv
(its `path` column, else its first column, relative to the CSV's folder). Each file goes
through prepare's own decode (`records.read_stored_image`: DICOM LUTs and MONOCHROME1
inversion, 16-bit scaling, the --min-side check) at the size and encoding the run's prepared
folder stored, then through fine-tuning's eval transform: what the run's eval split saw.
"""

from __future__ import annotations

import csv
import pathlib

from spcl_jax.data.datasets import records

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
_DICOM_MAGIC_OFFSET = 128  # a DICOM file's preamble, then "DICM"


def list_images(argument: str) -> list[pathlib.Path]:
  path = pathlib.Path(argument).expanduser()
  if path.is_dir():
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file())
    if not found:
      raise ValueError(f"--images {argument!r}: no {'/'.join(IMAGE_SUFFIXES)} file below it")
    return found
  if not path.is_file():
    raise FileNotFoundError(f"--images {argument!r} is neither a folder nor a file")
  if path.suffix.lower() == ".csv":
    with open(path, newline="", encoding="utf-8-sig") as f:
      rows = list(csv.reader(f))
    if not rows:
      raise ValueError(f"--images {argument!r} is empty: expected a header and one path a row")
    header = [cell.strip() for cell in rows[0]]
    column = header.index("path") if "path" in header else 0
    names = [row[column].strip() for row in rows[1:] if len(row) > column and row[column].strip()]
  elif path.suffix.lower() == ".txt":
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.strip().startswith("#")]
  else:
    raise ValueError(f"--images {argument!r}: give a folder, a .txt list or a .csv")
  if not names:
    raise ValueError(f"--images {argument!r} lists no image")
  return [path.parent / name for name in names]


def image_format(path: pathlib.Path) -> str:
  """'dicom' by suffix or by the DICM marker (DICOMs often have no suffix), else 'file'."""
  if path.suffix.lower() in DICOM_SUFFIXES:
    return "dicom"
  try:
    with open(path, "rb") as f:
      head = f.read(_DICOM_MAGIC_OFFSET + 4)
  except OSError:
    return "file"  # the read in `stored_bytes` reports it
  return "dicom" if head[_DICOM_MAGIC_OFFSET:] == b"DICM" else "file"


def stored_bytes(path: pathlib.Path, settings: records.EncodeSettings
                 ) -> tuple[bytes | None, str, str]:
  """(the file as prepare would store it, "", "") or (None, problem kind, detail)."""
  image, _, kind, detail = records.read_stored_image(path, str(path), image_format(path),
                                                     settings)
  if image is None:
    return None, kind, detail
  return records.encode_uint8(image, settings), "", ""
