import jax
import numpy as np
import pytest

from spcl_jax import masking


def test_sizes_follow_method_section_2():
  assert masking.visible_count(1024, 0.6) == 409
  assert masking.view_size(1024, 0.6) == 204
  assert masking.view_size(64, 0.6) == 12      # n = 25 is odd: one visible patch dropped
  with pytest.raises(ValueError, match="mask_ratio"):
    masking.visible_count(1024, 1.0)
  with pytest.raises(ValueError, match="fewer than 2"):
    masking.view_size(16, 0.99)


def test_partition_shapes_disjoint_and_in_range():
  idx1, idx2 = jax.jit(masking.partition, static_argnums=(1, 2, 3))(
      jax.random.key(0), 32, 1024, 0.6)
  idx1, idx2 = np.asarray(idx1), np.asarray(idx2)
  assert idx1.shape == idx2.shape == (32, 204)
  assert idx1.dtype == idx2.dtype == np.int32
  for a, b in zip(idx1, idx2):
    assert len(set(a)) == len(set(b)) == 204       # no repeats inside a view
    assert not set(a) & set(b)                     # the views are disjoint
    assert min(a.min(), b.min()) >= 0 and max(a.max(), b.max()) < 1024


def test_partition_differs_per_example_and_is_deterministic():
  key = jax.random.key(3)
  idx1, _ = masking.partition(key, 8, 256, 0.5)
  again, _ = masking.partition(key, 8, 256, 0.5)
  np.testing.assert_array_equal(idx1, again)
  rows = {tuple(np.sort(r)) for r in np.asarray(idx1)}
  assert len(rows) == 8
  other, _ = masking.partition(jax.random.key(4), 8, 256, 0.5)
  assert not np.array_equal(idx1, other)


@pytest.mark.slow
def test_rows_depend_only_on_global_example_index():
  """A slice of the global batch (another device/process/micro-batch) sees the same masks."""
  key = jax.random.key(7)
  full1, full2 = masking.partition(key, 12, 196, 0.6)
  part1, part2 = masking.partition(key, 4, 196, 0.6, first_example=8)
  np.testing.assert_array_equal(full1[8:], part1)
  np.testing.assert_array_equal(full2[8:], part2)


def test_every_patch_is_chosen_with_frequency_2h_over_n():
  n_patches, ratio, draws = 64, 0.6, 4000
  h = masking.view_size(n_patches, ratio)
  idx1, idx2 = masking.partition(jax.random.key(0), draws, n_patches, ratio)
  counts = np.bincount(np.concatenate([np.ravel(idx1), np.ravel(idx2)]), minlength=n_patches)
  freq = counts / draws
  expected = 2 * h / n_patches
  # Binomial std of a frequency over 4000 draws is ~0.008 here; 5 sigma bound.
  assert np.abs(freq - expected).max() < 5 * np.sqrt(expected * (1 - expected) / draws)
  # And each view alone is uniform too (no bias towards the first h of the grid).
  freq1 = np.bincount(np.ravel(idx1), minlength=n_patches) / draws
  assert np.abs(freq1 - h / n_patches).max() < 5 * np.sqrt(h / n_patches / draws)
