import numpy as np
import pytest

from spcl_jax.data import rle


def test_decode_is_column_major_with_relative_starts():
  # Runs (0, 1) and (2, 1): pixel 0, then skip 2 pixels past the end of the first run -> pixel 3.
  mask = rle.rle_decode("0 1 2 1", height=3, width=2)
  expected = np.zeros((3, 2), np.uint8)
  expected[0, 0] = 1  # flat index 0: row 0, column 0
  expected[0, 1] = 1  # flat index 3 in column-major order: row 0, column 1
  np.testing.assert_array_equal(mask, expected)


def test_minus_one_is_an_empty_mask():
  assert rle.rle_decode("-1", 4, 5).sum() == 0
  assert rle.rle_decode(" -1", 4, 5).shape == (4, 5)
  assert rle.rle_encode(np.zeros((4, 5))) == "-1"


@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 0.9, 1.0])
def test_random_masks_round_trip(density):
  rng = np.random.default_rng(int(density * 100))
  for height, width in [(17, 23), (64, 64), (1, 9)]:
    mask = (rng.random((height, width)) < density).astype(np.uint8)
    text = rle.rle_encode(mask)
    np.testing.assert_array_equal(rle.rle_decode(text, height, width), mask)


def test_first_and_last_pixel_round_trip():
  mask = np.zeros((8, 8), np.uint8)
  mask[0, 0] = mask[-1, -1] = 1
  assert rle.rle_encode(mask) == "0 1 62 1"
  np.testing.assert_array_equal(rle.rle_decode("0 1 62 1", 8, 8), mask)


def test_union_of_rows():
  a = np.zeros((10, 10), np.uint8)
  b = np.zeros((10, 10), np.uint8)
  a[2:4, 1:3] = 1
  b[3:7, 2:5] = 1
  union = rle.rle_union([rle.rle_encode(a), rle.rle_encode(b), "-1"], 10, 10)
  np.testing.assert_array_equal(union, a | b)


@pytest.mark.parametrize("text, message", [
    ("1 2 3", "odd number"),
    ("1 x", "not an integer"),
    ("0 5 0 0", "negative or empty"),
    ("90 20", "past the"),
])
def test_bad_runs_are_errors(text, message):
  with pytest.raises(ValueError, match=message):
    rle.rle_decode(text, 10, 10)
