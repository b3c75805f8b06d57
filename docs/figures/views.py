"""Draws docs/figures/views.png: one bundled radiograph cut into S-PCL's two views.

The partition is the training step's own (`spcl_jax.masking.partition`, mask ratio 0.6, 16 x 16
patches at 256 x 256); rerun with `python docs/figures/views.py` after changing the masking.
"""

import pathlib

import jax
import matplotlib
import numpy as np
from PIL import Image

from spcl_jax import masking
from spcl_jax.data.sources import SAMPLE_DIR

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  # pylint: disable=g-import-not-at-top

SIZE, PATCH, MASK_RATIO = 256, 16, 0.6
GRID = SIZE // PATCH


def patches_shown(image: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """The image with every patch outside `indices` blanked to white."""
  keep = np.zeros(GRID * GRID, bool)
  keep[indices] = True
  keep = np.kron(keep.reshape(GRID, GRID), np.ones((PATCH, PATCH), bool))
  return np.where(keep, image, 1.0)


def main() -> None:
  path = SAMPLE_DIR / "person1946_bacteria_4874.png"
  image = np.asarray(Image.open(path).convert("L").resize((SIZE, SIZE), Image.BICUBIC)) / 255.0
  view1, view2 = masking.partition(jax.random.key(0), 1, GRID * GRID, MASK_RATIO)
  panels = [("image", image),
            (f"view 1 ({view1.shape[1]} patches)", patches_shown(image, np.asarray(view1[0]))),
            (f"view 2 ({view2.shape[1]} patches)", patches_shown(image, np.asarray(view2[0])))]
  figure, axes = plt.subplots(1, 3, figsize=(9, 3.3))
  for axis, (title, panel) in zip(axes, panels):
    axis.imshow(panel, cmap="gray", vmin=0, vmax=1)
    axis.set_title(title, fontsize=10)
    axis.set_xticks([])
    axis.set_yticks([])
  figure.suptitle("60% of the patches dropped; the rest split at random into two disjoint views",
                  fontsize=10)
  figure.tight_layout()
  figure.savefig(pathlib.Path(__file__).with_name("views.png"), dpi=110)


if __name__ == "__main__":
  main()
