"""What every dataset's `read_manifest` returns: one Entry per image, plus the problems found.

Problems are never raised: bad rows and files are counted and listed (OUT/report.json) so that a
million-row CSV with a few bad lines still prepares, and nothing is silently dropped or
mislabelled. Raised errors are kept for what makes the whole dataset unusable (no metadata file,
a CSV without the expected columns).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import gzip
import io
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

# Raw label codes, stored as they are so that the uncertainty policy stays a reader option.
POSITIVE, NEGATIVE, UNCERTAIN, BLANK = 1, 0, -1, -2
FRONTAL_VIEWS = frozenset({"PA", "AP", "FRONTAL"})

# Problem kinds (keys of report.json "problems"), with what each one means.
PROBLEM_KINDS = {
    "missing_file": "listed in the metadata but not on disk (skipped)",
    "unlisted_file": "image on disk that no metadata row lists (ignored)",
    "duplicate_row": "a row repeating an earlier row for the same image (the repeat is ignored)",
    "conflicting_rows": "rows for one image that disagree (resolution given in detail)",
    "unknown_label": "a label value outside the dataset's vocabulary (image excluded, with "
                     "every other row naming it)",
    "bad_row": "a row with a missing or malformed field, or more or fewer cells than the header "
               "(image excluded, with every other row naming it)",
    "duplicate_file": "one image name found in several folders (identical copies: the first "
                      "path in sorted order is used; different files: image excluded)",
    "too_small": "image with a side below --min-side pixels (skipped)",
    "blank_view": "no view position in the metadata (excluded where frontal views are asked)",
    "non_frontal": "a lateral or other non-frontal view (excluded where frontal views are asked)",
    "undecodable": "file unreadable, truncated or not a valid image (skipped)",
    "bad_mask": "mask runs that do not fit the image (image skipped)",
    "not_in_metadata": "name in an official list file that the metadata does not have",
    "uncertain_label": "an uncertain or blank label cell (csv dataset): set by --uncertain ones "
                       "or zeros (image kept), or the image excluded by --uncertain exclude",
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One image. `name` is its download-independent id: split files list names."""
  name: str
  path: str  # The file to read, relative to the raw download folder.
  patient: str
  view: str  # "PA", "AP", "FRONTAL" (frontal, position unknown), "LATERAL", ... or "" unknown.
  labels: tuple[int, ...] = ()  # Raw codes in the dataset's LABELS order.
  mask_rles: tuple[str, ...] = ()  # SIIM: every RLE row of the image ("-1" = empty).
  boxes: tuple[tuple[float, float, float, float], ...] = ()  # RSNA: (x, y, width, height).

  @property
  def is_frontal(self) -> bool:
    return self.view in FRONTAL_VIEWS


class Problems:
  """Problem kind -> list of {"name", "detail"} items, in the order they were found."""

  def __init__(self):
    self.items: dict[str, list[dict[str, str]]] = {}

  def add(self, kind: str, name: str, detail: str = "") -> None:
    if kind not in PROBLEM_KINDS:
      raise KeyError(f"unknown problem kind {kind!r}")
    self.items.setdefault(kind, []).append({"name": name, "detail": detail})

  def count(self, kind: str) -> int:
    return len(self.items.get(kind, ()))

  def names(self, kind: str) -> list[str]:
    return [item["name"] for item in self.items.get(kind, ())]

  def to_json(self) -> dict[str, dict]:
    return {kind: {"count": len(items), "meaning": PROBLEM_KINDS[kind], "items": items}
            for kind, items in sorted(self.items.items())}

  def __repr__(self) -> str:
    return f"Problems({ {k: len(v) for k, v in self.items.items()} })"


def positive_targets(codes: Any, policy: str = "ones") -> np.ndarray:
  """Raw codes -> float32 targets for a dataset without uncertain labels: POSITIVE -> 1, else 0.

  `policy` (CheXpert's uncertainty policy) means nothing here and is accepted for the contract.
  """
  del policy
  return (np.asarray(codes) == POSITIVE).astype(np.float32)


def keep_first_entry(entries: dict[str, Entry], entry: Entry, problems: Problems,
                     where: str) -> None:
  """Adds `entry` unless its image is already listed: a repeat is a duplicate_row, a repeat with
  other values a conflicting_rows problem; either way the first row stays."""
  if entry.name not in entries:
    entries[entry.name] = entry
    return
  same = entries[entry.name] == entry
  problems.add("duplicate_row" if same else "conflicting_rows", entry.name,
               f"{where}: repeats {entry.name}" + ("" if same else "; first row kept"))


@dataclasses.dataclass
class Manifest:
  dataset: str
  entries: list[Entry]
  problems: Problems
  label_names: tuple[str, ...] = ()
  # Extra split files that the download itself defines (NIH's official lists): stem -> names.
  official_splits: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def by_name(self) -> dict[str, Entry]:
    return {entry.name: entry for entry in self.entries}


def find_first(src: pathlib.Path, patterns: Sequence[str], what: str) -> pathlib.Path:
  """The first file matching a glob pattern (tried in order) or a FileNotFoundError naming them."""
  for pattern in patterns:
    matches = sorted(src.glob(pattern))
    if matches:
      return matches[0]
  raise FileNotFoundError(f"{what}: none of {', '.join(patterns)} found under {str(src)!r}")


@dataclasses.dataclass(frozen=True)
class CsvRow:
  """One CSV record. `cells` is None when its width differs from the header's (`error` says
  so): a cut row loses its last labels and a row with one extra cell shifts every later one, so
  no cell of it can be trusted as a label. `cell_at` still reads a key column, to know which
  image to exclude."""
  where: str  # "train.csv line 7" (or "lines 7-9" for a quoted cell spanning lines).
  cells: dict[str, str] | None
  raw: list[str]
  header: tuple[str, ...]
  error: str = ""

  def cell_at(self, column: str) -> str:
    index = self.header.index(column)
    return self.raw[index].strip() if index < len(self.raw) else ""


def _lines_kept(lines: Iterator[str], consumed: list[str]) -> Iterator[str]:
  # csv.reader gives cells, not the text they came from; the report quotes the text.
  for line in lines:
    consumed.append(line)
    yield line


def _decoded_lines(raw: Iterable[bytes], not_utf8: dict[int, str]) -> Iterator[str]:
  """Each line decoded as UTF-8 on its own (a BOM dropped); a line that is not UTF-8 is decoded
  with replacement characters and `not_utf8[line number]` says which byte: its row becomes a
  bad_row instead of a codec error that names no file or line."""
  for number, data in enumerate(raw, start=1):
    if number == 1 and data.startswith(codecs.BOM_UTF8):
      data = data[len(codecs.BOM_UTF8):]
    try:
      yield data.decode("utf-8")
    except UnicodeDecodeError as e:
      not_utf8[number] = f"byte {data[e.start]:#04x} at column {e.start + 1} is not UTF-8"
      yield data.decode("utf-8", "replace")


def read_csv_rows(path: pathlib.Path, required: Iterable[str]) -> Iterator[CsvRow]:
  """Every non-blank record of a .csv or .csv.gz; header names are stripped of spaces.

  Stripping matters: SIIM's header is "ImageId, EncodedPixels" with a leading space.
  """
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as raw:
    consumed: list[str] = []
    not_utf8: dict[int, str] = {}
    reader = csv.reader(_lines_kept(_decoded_lines(raw, not_utf8), consumed))
    try:
      header = tuple(column.strip() for column in next(reader))
    except StopIteration:
      raise ValueError(f"{str(path)!r} is empty: expected a CSV header") from None
    if not_utf8:
      raise ValueError(f"{str(path)!r} line {min(not_utf8)}, the header: "
                       f"{not_utf8[min(not_utf8)]}")
    missing = [column for column in required if column not in header]
    if missing:
      raise ValueError(f"{str(path)!r}: missing column(s) {missing}; header is {list(header)}")
    consumed.clear()
    while True:
      try:
        row, error = next(reader), ""
      except StopIteration:
        return
      except csv.Error as e:  # E.g. a quote left open makes one cell of the lines after it.
        row, error = [], f"unreadable CSV record ({e})"
      first_line = reader.line_num - len(consumed) + 1
      lines = (f"line {first_line}" if first_line == reader.line_num
               else f"lines {first_line}-{reader.line_num}")
      record_text = "".join(consumed).rstrip("\r\n")
      consumed.clear()
      undecodable = [not_utf8[n] for n in range(first_line, reader.line_num + 1) if n in not_utf8]
      if not error and undecodable:
        error = undecodable[0]
      if not error and not any(cell.strip() for cell in row):
        continue
      if not error and len(row) != len(header):
        error = (f"{len(row)} cells where the header has {len(header)}: "
                 f"{record_text[:300]!r}")
      cells = None if error else dict(zip(header, (cell.strip() for cell in row)))
      yield CsvRow(f"{path.name} {lines}", cells, row, header, error)


class Exclusions:
  """Images that one bad row excludes, whatever their other rows say.

  A row that cannot be read may be the one that carried the right label (or a mask region, or
  a box), so the image is left out rather than labelled from the rows that remain. Problems are
  written at the end, when it is known which valid rows of the image were ignored.
  """

  def __init__(self):
    self.rows: list[tuple[str, str, str, str]] = []  # (kind, name, where, why)
    self.names: set[str] = set()

  def add(self, kind: str, name: str, where: str, why: str) -> None:
    self.rows.append((kind, name, where, why))
    if name:
      self.names.add(name)

  def report(self, problems: Problems, valid_rows_of: dict[str, list[str]]) -> None:
    for kind, name, where, why in self.rows:
      if not name:
        problems.add(kind, where, f"{where}: {why}; no image name to exclude")
        continue
      ignored = valid_rows_of.get(name, [])
      tail = f"; valid row(s) {', '.join(ignored)} ignored" if ignored else ""
      problems.add(kind, name, f"{where}: {why}; image excluded{tail}")


def files_on_disk(root: pathlib.Path, suffixes: Sequence[str]) -> dict[str, pathlib.Path]:
  """Relative posix path -> path for every file under root with one of the suffixes."""
  suffixes = tuple(s.lower() for s in suffixes)
  if not root.is_dir():
    return {}
  return {p.relative_to(root).as_posix(): p for p in root.rglob("*")
          if p.suffix.lower() in suffixes and p.is_file()}


def index_by_file_name(on_disk: dict[str, pathlib.Path], key: Callable[[str], str],
                       problems: Problems) -> tuple[dict[str, str], set[str]]:
  """Image name -> relative path for downloads whose images are found by name at any depth.

  One name in several folders is a duplicate_file problem: identical copies are one image (the
  first path in sorted order is used, whatever order the file system lists them in); copies
  that differ are different images under one name, so the name is excluded (second value).
  """
  paths_of: dict[str, list[str]] = {}
  for rel in sorted(on_disk):
    paths_of.setdefault(key(rel), []).append(rel)
  chosen, ambiguous = {}, set()
  for name, rels in paths_of.items():
    if len(rels) > 1:
      first = on_disk[rels[0]].read_bytes()
      if all(on_disk[rel].read_bytes() == first for rel in rels[1:]):
        problems.add("duplicate_file", name, f"identical copies {rels}: {rels[0]!r} used")
      else:
        problems.add("duplicate_file", name, f"different files {rels} share the name; "
                     "image excluded")
        ambiguous.add(name)
        continue
    chosen[name] = rels[0]
  return chosen, ambiguous


def check_listed_files(src: pathlib.Path, entries: list[Entry], problems: Problems,
                       present: set[str], scanned_dirs: Sequence[str],
                       excluded_paths: Iterable[str] = ()) -> list[Entry]:
  """Keeps entries whose file is present; reports missing ones and files nobody lists.

  `present` holds paths relative to src; only files under `scanned_dirs` count as unlisted
  (a download folder also holds test images and other files that are not this dataset's).
  `excluded_paths` are files of images already reported as excluded: not unlisted.
  """
  kept = []
  for entry in entries:
    if entry.path in present:
      kept.append(entry)
    else:
      problems.add("missing_file", entry.name, f"{str(src / entry.path)!r} does not exist")
  listed = {entry.path for entry in entries} | set(excluded_paths)
  for path in sorted(present - listed):
    if any(path.startswith(d.rstrip("/") + "/") for d in scanned_dirs):
      problems.add("unlisted_file", path, "no metadata row names this file")
  return kept
