"""Kaggle run-length encoding of SIIM-ACR pneumothorax masks (docs/method.md §7).

A mask is written as whitespace-separated integers read in (start, length) pairs over the mask
flattened column-major (down the first column, then the next: numpy order "F"). In the SIIM
variant each start is *relative*: it counts pixels from the end of the previous run (the first
run's start counts from pixel 0). The text "-1" means an empty mask. Several CSV rows for one
image are several regions of one mask and are united.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

EMPTY_MASK = "-1"


def parse_runs(text: str) -> list[tuple[int, int]]:
  """RLE text -> relative (start, length) pairs; [] for "-1". Raises ValueError on bad syntax."""
  text = text.strip()
  if text in (EMPTY_MASK, ""):
    return []
  try:
    numbers = [int(token) for token in text.split()]
  except ValueError as e:
    raise ValueError(f"RLE has a token that is not an integer: {e}") from e
  if len(numbers) % 2:
    raise ValueError(f"RLE has an odd number of integers ({len(numbers)}): starts and "
                     "lengths must come in pairs")
  runs = list(zip(numbers[0::2], numbers[1::2]))
  for start, length in runs:
    if start < 0 or length <= 0:
      raise ValueError(f"RLE run (start {start}, length {length}) is negative or empty")
  return runs


def rle_decode(text: str, height: int, width: int) -> np.ndarray:
  """One RLE string -> a (height, width) uint8 mask of 0/1; raises ValueError on bad runs."""
  flat = np.zeros(height * width, dtype=np.uint8)
  position = 0
  for start, length in parse_runs(text):
    position += start
    if position + length > flat.size:
      raise ValueError(f"RLE run ends at pixel {position + length}, past the "
                       f"{height}x{width} mask ({flat.size} pixels)")
    flat[position:position + length] = 1
    position += length
  return flat.reshape((height, width), order="F")


def rle_union(texts: Iterable[str], height: int, width: int) -> np.ndarray:
  """Several RLE rows of one image -> one mask holding every region."""
  mask = np.zeros((height, width), dtype=np.uint8)
  for text in texts:
    mask |= rle_decode(text, height, width)
  return mask


def rle_encode(mask: np.ndarray) -> str:
  """A 2-D mask (nonzero = inside) -> the relative Kaggle RLE string; "-1" when empty."""
  flat = (np.asarray(mask).reshape(-1, order="F") != 0).astype(np.int8)
  # Edges of runs: +1 where a run starts, -1 one past where it ends.
  edges = np.diff(np.concatenate([[0], flat, [0]]))
  starts = np.flatnonzero(edges == 1)
  ends = np.flatnonzero(edges == -1)
  if starts.size == 0:
    return EMPTY_MASK
  lengths = ends - starts
  previous_ends = np.concatenate([[0], ends[:-1]])
  relative_starts = starts - previous_ends
  pairs = np.stack([relative_starts, lengths], axis=1).reshape(-1)
  return " ".join(str(int(n)) for n in pairs)
