"""Patient-level 7:2:1 splits and nested label fractions, identical on every machine.

Everything here is a pure function of (seed, ids): each id is ranked by sha256 of
"seed:purpose:id", never by a random generator, so the files depend neither on numpy's RNG
version nor on the order of rows in the CSV, and every user with the same metadata writes
byte-identical split files (their sha256 is printed and recorded to prove it).
- Splits: unique patients ranked; the first round(0.7 n) go to train, the next round(0.2 n) to
  val, the rest to test. All images of a patient follow the patient.
- Label fractions: train images ranked; the first max(1, round(f * n)) form fraction f. One
  ranking serves every fraction, so the 1% subset lies inside the 10% subset.
- Official scheme: the download's own test list is the test split; the validation split is
  carved by patient out of its train(+val) list (the first round(OFFICIAL_VAL_FRACTION n) ranked
  patients, at least one), the rest is train; fractions as above, of that train split.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Iterable, Mapping, Sequence

from spcl_jax.downstream import FRACTION_SPLIT_FILES

SPLIT_SEED = 0
SPLIT_NAMES = ("train", "val", "test")
SPLIT_RATIOS = (0.7, 0.2, 0.1)
# File stem -> fraction of the train split, smallest first. 100% is train.txt itself.
FRACTION_SHARES = {FRACTION_SPLIT_FILES[percent]: percent / 100
                   for percent in sorted(FRACTION_SPLIT_FILES) if percent != 100}
CHECKSUM_FILE = "SHA256SUMS"
OFFICIAL_PREFIX = "official_"
# Share of the official train(+val) patients kept for validation. Medical MAE's NIH lists keep
# 11,212 of 86,524 train_val images (13%) for validation; 1/8 of the patients gives about that.
OFFICIAL_VAL_FRACTION = 0.125


def _rank_key(seed: int, purpose: str, item: str) -> bytes:
  return hashlib.sha256(f"{seed}:{purpose}:{item}".encode()).digest()


def _ranked(items: Iterable[str], seed: int, purpose: str) -> list[str]:
  """Distinct items in sha256("seed:purpose:item") order: a fixed, uniform shuffle."""
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
                    fractions: Mapping[str, float] = FRACTION_SHARES,
                    prefix: str = "") -> dict[str, list[str]]:
  """Nested uniform subsets of the train images: {prefix + file stem: sorted image names}."""
  ranked = _ranked(train_images, seed, "fraction")
  subsets = {}
  for stem, fraction in fractions.items():
    count = max(1, int(round(fraction * len(ranked)))) if ranked else 0
    subsets[prefix + stem] = sorted(ranked[:count])
  return subsets


def validation_patients(patients: Iterable[str], seed: int = SPLIT_SEED,
                        fraction: float = OFFICIAL_VAL_FRACTION) -> set[str]:
  """The patients carved out for validation: round(fraction n) of n, at least one, never all."""
  ranked = _ranked(patients, seed, "official_val")
  if len(ranked) < 2:
    return set()
  count = min(len(ranked) - 1, max(1, int(round(fraction * len(ranked)))))
  return set(ranked[:count])


def official_splits(train_val: Iterable[str], test: Iterable[str], patient_of: Mapping[str, str],
                    seed: int = SPLIT_SEED) -> dict[str, list[str]]:
  """The official scheme from a download's own lists: {"official_train", "official_val",
  "official_test", "official_train_10pct", "official_train_1pct": sorted image names}.

  Raises ValueError when the two lists share a patient: then the download's test set is not
  what its authors published, and no carving can repair that.
  """
  train_val, test = sorted(set(train_val)), sorted(set(test))
  check_patients_disjoint({"official train_val list": train_val, "official test list": test},
                          patient_of)
  val_patients = validation_patients({patient_of[image] for image in train_val}, seed)
  splits = {
      OFFICIAL_PREFIX + "train": [i for i in train_val if patient_of[i] not in val_patients],
      OFFICIAL_PREFIX + "val": [i for i in train_val if patient_of[i] in val_patients],
      OFFICIAL_PREFIX + "test": test,
  }
  splits.update(label_fractions(splits[OFFICIAL_PREFIX + "train"], seed,
                                prefix=OFFICIAL_PREFIX))
  check_patients_disjoint({name: splits[OFFICIAL_PREFIX + name] for name in SPLIT_NAMES},
                          patient_of)
  return splits


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
