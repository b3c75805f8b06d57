"""Patient-level 7:2:1 splits and nested label fractions, identical on every machine.

Everything here is a pure function of (seed, ids): each id is ranked by sha256 of
"seed:purpose:id", never by a random generator, so the files depend neither on numpy's RNG
version nor on the order of rows in the CSV, and every user with the same metadata writes
byte-identical split files (their sha256 is printed and recorded to prove it).
- Splits: unique patients ranked; the first round(0.7 n) go to train, the next round(0.2 n) to
  val, the rest to test. All images of a patient follow the patient.
- Label fractions: train images ranked; the first max(1, round(f * n)) form fraction f. One
  ranking serves every fraction, so the 1% subset lies inside the 10% subset.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Iterable, Mapping, Sequence

SPLIT_SEED = 0
SPLIT_NAMES = ("train", "val", "test")
SPLIT_RATIOS = (0.7, 0.2, 0.1)
# File stem -> fraction of the train split. 100% is train.txt itself.
LABEL_FRACTIONS = {"train_1pct": 0.01, "train_10pct": 0.10}
CHECKSUM_FILE = "SHA256SUMS"


def _rank_key(seed: int, purpose: str, item: str) -> bytes:
  return hashlib.sha256(f"{seed}:{purpose}:{item}".encode()).digest()


def _ranked(items: Iterable[str], seed: int, purpose: str) -> list[str]:
  # Sorting first makes ties (impossible for sha256 in practice) order-independent too.
  return sorted(sorted(set(items)), key=lambda item: _rank_key(seed, purpose, item))


def split_counts(n: int, ratios: Sequence[float] = SPLIT_RATIOS) -> list[int]:
  """Group sizes for n patients: rounded for all but the last group, which takes the rest."""
  counts = [int(round(ratio * n)) for ratio in ratios[:-1]]
  if sum(counts) > n:  # Only possible for tiny n; keep the earlier (larger) groups whole.
    counts[-1] -= sum(counts) - n
  return counts + [n - sum(counts)]


def assign_patients(patients: Iterable[str], seed: int = SPLIT_SEED,
                    names: Sequence[str] = SPLIT_NAMES,
                    ratios: Sequence[float] = SPLIT_RATIOS) -> dict[str, str]:
  """Patient id -> split name."""
  ranked = _ranked(patients, seed, "split")
  assignment = {}
  start = 0
  for name, count in zip(names, split_counts(len(ranked), ratios)):
    for patient in ranked[start:start + count]:
      assignment[patient] = name
    start += count
  return assignment


def split_images(patient_of: Mapping[str, str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
  """{image name: patient id} -> {"train"|"val"|"test": sorted image names}."""
  assignment = assign_patients(patient_of.values(), seed)
  splits: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
  for image, patient in patient_of.items():
    splits[assignment[patient]].append(image)
  return {name: sorted(images) for name, images in splits.items()}


def label_fractions(train_images: Iterable[str], seed: int = SPLIT_SEED,
                    fractions: Mapping[str, float] = LABEL_FRACTIONS) -> dict[str, list[str]]:
  """Nested uniform subsets of the train images: {file stem: sorted image names}."""
  ranked = _ranked(train_images, seed, "fraction")
  subsets = {}
  for stem, fraction in fractions.items():
    count = max(1, int(round(fraction * len(ranked)))) if ranked else 0
    subsets[stem] = sorted(ranked[:count])
  return subsets


def check_patients_disjoint(splits: Mapping[str, Iterable[str]],
                            patient_of: Mapping[str, str]) -> None:
  """Raises ValueError naming the first patient found in two splits."""
  split_of_patient: dict[str, str] = {}
  for split, images in splits.items():
    for image in images:
      patient = patient_of[image]
      other = split_of_patient.setdefault(patient, split)
      if other != split:
        raise ValueError(f"patient {patient!r} is in both split {other!r} and split {split!r} "
                         f"(image {image!r})")


def file_sha256(path: str | pathlib.Path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def write_split_files(split_dir: str | pathlib.Path, splits: Mapping[str, Sequence[str]]
                      ) -> dict[str, str]:
  """Writes STEM.txt (one image name a line) per split and SHA256SUMS; returns file -> sha256."""
  split_dir = pathlib.Path(split_dir)
  split_dir.mkdir(parents=True, exist_ok=True)
  digests = {}
  for stem in sorted(splits):
    path = split_dir / f"{stem}.txt"
    path.write_text("".join(f"{name}\n" for name in splits[stem]), encoding="utf-8")
    digests[path.name] = file_sha256(path)
  (split_dir / CHECKSUM_FILE).write_text(
      "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items())),
      encoding="utf-8")
  return digests


def read_split_file(path: str | pathlib.Path) -> list[str]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"split file {str(path)!r} does not exist")
  return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def verify_split_files(split_dir: str | pathlib.Path) -> None:
  """Checks every file against SHA256SUMS; raises ValueError naming a changed file."""
  split_dir = pathlib.Path(split_dir)
  for line in (split_dir / CHECKSUM_FILE).read_text(encoding="utf-8").splitlines():
    digest, _, name = line.partition("  ")
    if file_sha256(split_dir / name) != digest:
      raise ValueError(f"split file {str(split_dir / name)!r} does not match its sha256 in "
                       f"{CHECKSUM_FILE}: it was edited after preparation")
