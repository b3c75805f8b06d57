import random

import pytest

from spcl_jax.data import splits


def _images(n_patients: int, images_per_patient=lambda p: 1 + p % 3) -> dict[str, str]:
  return {f"img_{p}_{k}.png": f"patient{p}"
          for p in range(n_patients) for k in range(images_per_patient(p))}


def test_patient_split_is_7_2_1_and_disjoint():
  patient_of = _images(1000)
  result = splits.split_images(patient_of)
  patients = {name: {patient_of[i] for i in images} for name, images in result.items()}
  assert [len(patients[s]) for s in splits.SPLIT_NAMES] == [700, 200, 100]
  assert not patients["train"] & patients["val"]
  assert not patients["train"] & patients["test"]
  assert not patients["val"] & patients["test"]
  assert sorted(sum(result.values(), [])) == sorted(patient_of)  # Every image exactly once.
  splits.check_patients_disjoint(result, patient_of)


@pytest.mark.parametrize("n, expected", [(10, [7, 2, 1]), (7, [5, 1, 1]), (3, [2, 1, 0]),
                                         (1, [1, 0, 0]), (1001, [701, 200, 100])])
def test_split_counts_within_rounding(n, expected):
  assert splits.split_counts(n) == expected


def test_split_does_not_depend_on_row_order():
  patient_of = _images(300)
  items = list(patient_of.items())
  random.Random(1).shuffle(items)
  assert splits.split_images(dict(items)) == splits.split_images(patient_of)


def test_split_is_pinned_across_machines_and_versions():
  # sha256 ranks, no RNG: these exact assignments must never change (users compare files).
  assignment = splits.assign_patients([f"p{i}" for i in range(10)])
  assert assignment == {"p0": "val", "p1": "train", "p2": "val", "p3": "test",
                        "p4": "train", "p5": "train", "p6": "train", "p7": "train",
                        "p8": "train", "p9": "train"}


def test_other_seed_gives_another_split():
  patients = [f"p{i}" for i in range(200)]
  assert splits.assign_patients(patients, seed=0) != splits.assign_patients(patients, seed=1)


def test_fractions_are_nested_uniform_subsets_of_train():
  train = [f"img{i}" for i in range(2000)]
  subsets = splits.label_fractions(train)
  one, ten = set(subsets["train_1pct"]), set(subsets["train_10pct"])
  assert (len(one), len(ten)) == (20, 200)
  assert one <= ten <= set(train)
  # Uniform, not a prefix of the sorted list: the 10% subset spans the whole train split.
  positions = sorted(train.index(name) for name in ten)
  assert positions[0] < 100 and positions[-1] > 1900
  shuffled = list(train)
  random.Random(0).shuffle(shuffled)
  assert splits.label_fractions(shuffled) == subsets


def test_fraction_keeps_at_least_one_image():
  assert len(splits.label_fractions(["a", "b", "c"])["train_1pct"]) == 1


def test_patient_in_two_splits_is_an_error():
  with pytest.raises(ValueError, match="patient 'p1' is in both"):
    splits.check_patients_disjoint({"train": ["a"], "val": ["b"]}, {"a": "p1", "b": "p1"})


def test_split_files_and_checksums(tmp_path):
  digests = splits.write_split_files(tmp_path, {"train": ["b", "a"], "val": []})
  assert (tmp_path / "train.txt").read_text() == "b\na\n"
  assert splits.read_split_file(tmp_path / "train.txt") == ["b", "a"]
  assert digests["val.txt"] == splits.file_sha256(tmp_path / "val.txt")
  splits.verify_split_files(tmp_path)
  (tmp_path / "train.txt").write_text("a\n")
  with pytest.raises(ValueError, match="train.txt.*does not match"):
    splits.verify_split_files(tmp_path)
