"""Image sources: random-access collections of raw records that the input pipeline reads.

A source is anything grain can read by index: it has `__len__` and `__getitem__(i)`, and each
record is a dict with
  - "name": a str that identifies the image (a path relative to the source root), and
  - either "encoded": the bytes of an image file (PNG, JPEG, ...; see `decode.py`),
    or "image": a 2-D numpy array (uint8, uint16, or float in [0, 1]).
Sources do no decoding or resizing: that runs in the pipeline's worker processes.

`config.data.source` names a source as "KIND:ARGUMENT" (or a bare "KIND"). New kinds plug in
with `register_source`; `open_source`
is the one place that turns the string into a source.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable
from typing import Any, Protocol

from spcl_jax.data import decode
from spcl_jax.workdir_path import require_local

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MIN_SIDE_OPTION = re.compile(r",\s*min_side=([^,]*)$")
SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / "sample"


class ImageSource(Protocol):
  """What the input pipeline needs of a source (grain's RandomAccessDataSource)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


class FolderSource:
  """Every PNG/JPEG file under a folder, found recursively, in sorted path order.

  Sorting makes the index -> file map identical on every machine and process, which the
  per-process sharding and the checkpointed iterator state rely on.
  """

  def __init__(self, root: str | os.PathLike[str], min_side: int = decode.MIN_IMAGE_SIDE):
    require_local(root, "config.data.source: folder")
    self.root = pathlib.Path(root).expanduser()
    self.min_side = min_side
    if not self.root.is_dir():
      raise ValueError(f"config.data.source: folder {str(self.root)!r} does not exist "
                       "or is not a directory")
    self.paths = sorted(
        p for p in self.root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not self.paths:
      raise ValueError(f"config.data.source: no {'/'.join(IMAGE_SUFFIXES)} files found "
                       f"under {str(self.root)!r}")

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.paths[index]
    try:
      data = path.read_bytes()
    except OSError as e:
      raise OSError(f"cannot read image file {str(path)!r}: {e}") from e
    # Checked here, from the header alone, rather than by scanning every file up front: a
    # folder of 377k MIMIC JPEGs would take minutes to open before the first step.
    width, height = decode.encoded_size(data, str(path))
    if min(width, height) < self.min_side:
      raise ValueError(f"image {str(path)!r} is {width}x{height} px, a side below the minimum "
                       f"{self.min_side} (config.data.source 'folder:PATH,min_side=N' lowers it; "
                       "or remove the file)")
    return {"name": self.name(index), "encoded": data}

  def name(self, index: int) -> str:
    """Record `index`'s name without reading the file."""
    return str(self.paths[index].relative_to(self.root))

  def __repr__(self) -> str:
    return f"FolderSource({str(self.root)!r}, {len(self)} images)"


def _sample_source(argument: str) -> FolderSource:
  if argument:
    raise ValueError("config.data.source: 'sample' takes no argument "
                     f"(got 'sample:{argument}')")
  return FolderSource(SAMPLE_DIR)


def _folder_source(argument: str) -> FolderSource:
  """'PATH' or 'PATH,min_side=N' (only a trailing option is read: a path may hold commas)."""
  option = _MIN_SIDE_OPTION.search(argument)
  min_side = decode.MIN_IMAGE_SIDE
  if option:
    argument = argument[:option.start()]
    if not option.group(1).strip().isdigit() or int(option.group(1)) < 1:
      raise ValueError(f"config.data.source: folder option min_side={option.group(1)!r} is not "
                       "a whole number of pixels >= 1")
    min_side = int(option.group(1))
  if not argument:
    raise ValueError("config.data.source: 'folder' needs a path, e.g. 'folder:/data/cxr'")
  return FolderSource(argument, min_side)


def _prepared_source(argument: str) -> ImageSource:
  # Imported on use: the prepared-folder readers pull in array_record and the dataset modules.
  from spcl_jax.data import prepared  # pylint: disable=g-import-not-at-top
  return prepared.open_prepared(argument)


_SOURCE_KINDS: dict[str, Callable[[str], ImageSource]] = {
    "sample": _sample_source,
    "folder": _folder_source,
    "prepared": _prepared_source,
}


def register_source(kind: str, factory: Callable[[str], ImageSource]) -> None:
  """Adds a source kind: `factory(argument)` builds it from the text after 'KIND:'."""
  if kind in _SOURCE_KINDS:
    raise ValueError(f"source kind {kind!r} is already registered")
  _SOURCE_KINDS[kind] = factory


def source_kinds() -> list[str]:
  return sorted(_SOURCE_KINDS)


def split_source_spec(spec: str) -> tuple[str, str]:
  kind, _, argument = spec.partition(":")
  return kind.strip(), argument.strip()


def check_source_spec(spec: str) -> None:
  """Fails with a message naming the field when the kind is unknown (no files touched)."""
  kind, _ = split_source_spec(spec)
  if kind not in source_kinds():
    raise ValueError(f"config.data.source={spec!r}: unknown source kind {kind!r}; "
                     f"known kinds: {', '.join(source_kinds())}")


def open_source(spec: str) -> ImageSource:
  """Builds the source that `config.data.source` names."""
  check_source_spec(spec)
  kind, argument = split_source_spec(spec)
  return _SOURCE_KINDS[kind](argument)
