"""Host-side fine-tuning augmentation: Medical MAE's timm recipe, every image op from Pillow.

Medical MAE fine-tunes with timm's `create_transform(is_training=True, interpolation='bicubic',
auto_augment='rand-m6-mstd0.5-inc1')` and evaluates with resize 256 + centre crop 224. timm's
RandAugment (`timm/data/auto_augment.py`) is itself a set of Pillow calls, so running the same
Pillow calls here gives the same pixels as Medical MAE's pipeline on a grey image, without torch.
Library choice: Pillow (maintained, already a dependency, needs nothing else). albumentations was
declared unmaintained in 2025 and its successor AlbumentationsX is AGPL, which an Apache-2.0
project cannot depend on; neither has RandAugment anyway.

Train (`TrainAugment`), in timm's order:
  1. RandomResizedCrop to S x S, bicubic: area fraction uniform in `scale`, log-uniform aspect
     ratio in [3/4, 4/3], 10 tries then a centre crop (timm's transforms.py
     `RandomResizedCropAndInterpolation.get_params`).
  2. Horizontal flip with probability 1/2.
  3. RandAugment `rand-m6-mstd0.5-inc1`: 2 ops drawn with replacement from `RAND_INCREASING_OPS`
     (timm's `_RAND_INCREASING_TRANSFORMS`), each applied with probability 1/2 at magnitude
     m ~ N(6, 0.5) clipped to [0, 10]; `_ARGUMENTS` maps m to each op's argument as timm's
     `LEVEL_TO_ARG` does. Geometric ops use bicubic and fill with `fill` (timm fills with the
     normalisation mean: Medical MAE's 0.5056 -> 129).
Eval (`EvalTransform`): resize the short side to floor(S / crop_fraction), bicubic, centre crop S.
A mask (segmentation labels) follows every geometric step with nearest-neighbour sampling and
fill 0, and no photometric step. All randomness comes from the caller's numpy Generator (timm
draws from Python's global `random`), so a seeded worker reproduces its batches exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_BICUBIC = Image.Resampling.BICUBIC
_NEAREST = Image.Resampling.NEAREST
MAX_MAGNITUDE = 10.0  # timm's _LEVEL_DENOM: magnitudes are tenths of each op's full range.
MEDICAL_MAE_FILL = round(255 * 0.5056)  # timm's img_mean for Medical MAE's mean 0.5056.

# timm's _RAND_INCREASING_TRANSFORMS (the `inc1` policy), in its order.
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})


def _signed(value: float, rng: np.random.Generator) -> float:
  """timm's _randomly_negate: the sign is a fair coin."""
  return -value if rng.random() > 0.5 else value


def _enhance_factor(level: float, rng: np.random.Generator) -> float:
  # timm's _enhance_increasing_level_to_arg: 1 +- 0.9 level, kept >= 0.1.
  return max(0.1, 1.0 + _signed(level * 0.9, rng))


# Op name -> argument from level = magnitude / 10 (timm's LEVEL_TO_ARG for the inc1 ops).
_ARGUMENTS = {
    "AutoContrast": lambda level, rng: None,
    "Equalize": lambda level, rng: None,
    "Invert": lambda level, rng: None,
    "Rotate": lambda level, rng: _signed(level * 30.0, rng),  # degrees
    "PosterizeIncreasing": lambda level, rng: 4 - int(level * 4),  # bits kept
    "SolarizeIncreasing": lambda level, rng: 256 - min(256, int(level * 256)),  # threshold
    "SolarizeAdd": lambda level, rng: min(128, int(level * 110)),  # added below 128
    "ColorIncreasing": _enhance_factor,
    "ContrastIncreasing": _enhance_factor,
    "BrightnessIncreasing": _enhance_factor,
    "SharpnessIncreasing": _enhance_factor,
    "ShearX": lambda level, rng: _signed(level * 0.3, rng),  # shear factor
    "ShearY": lambda level, rng: _signed(level * 0.3, rng),
    "TranslateXRel": lambda level, rng: _signed(level * 0.45, rng),  # fraction of the width
    "TranslateYRel": lambda level, rng: _signed(level * 0.45, rng),
}


def _photometric(name: str, image: Image.Image, arg) -> Image.Image:
  if name == "AutoContrast":
    return ImageOps.autocontrast(image)
  if name == "Equalize":
    return ImageOps.equalize(image)
  if name == "Invert":
    return ImageOps.invert(image)
  if name == "PosterizeIncreasing":
    # timm's argument is 0 bits at magnitude 10, which Pillow >= 11 refuses; 1 bit is the
    # strongest posterize it accepts (m6 +- 0.5 reaches 10 with probability ~1e-15).
    return image if arg >= 8 else ImageOps.posterize(image, max(1, arg))
  if name == "SolarizeIncreasing":
    return ImageOps.solarize(image, arg)
  if name == "SolarizeAdd":
    return image.point(lambda value: min(255, value + arg) if value < 128 else value)
  enhancer = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
              "BrightnessIncreasing": ImageEnhance.Brightness,
              "SharpnessIncreasing": ImageEnhance.Sharpness}[name]
  return enhancer(image).enhance(arg)


def _geometric(name: str, image: Image.Image, arg: float, resample, fill: int) -> Image.Image:
  if name == "Rotate":
    return image.rotate(arg, resample=resample, fillcolor=fill)
  width, height = image.size
  # Pillow's AFFINE maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
  coefficients = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
                  "TranslateXRel": (1, 0, arg * width, 0, 1, 0),
                  "TranslateYRel": (1, 0, 0, 0, 1, arg * height)}[name]
  return image.transform(image.size, Image.Transform.AFFINE, coefficients, resample=resample,
                         fillcolor=fill)


def _to_pil(array: np.ndarray, what: str) -> Image.Image:
  array = np.asarray(array)
  if array.ndim != 2 or array.dtype != np.uint8:
    raise ValueError(f"{what} must be a 2-D uint8 array (grayscale H x W); got shape "
                     f"{array.shape} dtype {array.dtype}")
  return Image.fromarray(array, mode="L")


def _check_mask(image: np.ndarray, mask: np.ndarray | None) -> Image.Image | None:
  if mask is None:
    return None
  if np.shape(mask) != np.shape(image):
    raise ValueError(f"mask shape {np.shape(mask)} differs from image shape {np.shape(image)}")
  return _to_pil(mask, "mask")


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width), sampled as timm's RandomResizedCrop does."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = rng.uniform(*scale) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  # Ten misses (only for extreme aspect ratios): the largest centred crop within `ratio`.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    crop_w, crop_h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    crop_h, crop_w = height, int(round(height * ratio[1]))
  else:
    crop_w, crop_h = width, height
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class TrainAugment:
  """uint8 (H, W) [+ mask] -> uint8 (S, S) [+ mask]: random resized crop, flip, RandAugment.

  `randaugment_magnitude=None` turns RandAugment off; `ops` picks another op list (names from
  RAND_INCREASING_OPS). Plain attributes only: pickles into grain worker processes.
  """

  def __init__(self, image_size: int, scale: tuple[float, float] = (0.08, 1.0),
               hflip: bool = True, randaugment_magnitude: float | None = 6,
               magnitude_std: float = 0.5, *, num_ops: int = 2, op_probability: float = 0.5,
               ops: Sequence[str] = RAND_INCREASING_OPS, fill: int = MEDICAL_MAE_FILL):
    if image_size < 1:
      raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0 < scale[0] <= scale[1] <= 1:
      raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if randaugment_magnitude is not None and not 0 <= randaugment_magnitude <= MAX_MAGNITUDE:
      raise ValueError(f"randaugment_magnitude must be in [0, 10], got {randaugment_magnitude}")
    unknown = [op for op in ops if op not in _ARGUMENTS]
    if unknown:
      raise ValueError(f"unknown RandAugment op(s) {unknown}; known: {', '.join(_ARGUMENTS)}")
    self.image_size = int(image_size)
    self.scale = (float(scale[0]), float(scale[1]))
    self.hflip = hflip
    self.randaugment_magnitude = randaugment_magnitude
    self.magnitude_std = float(magnitude_std)
    self.num_ops, self.op_probability = int(num_ops), float(op_probability)
    self.ops = tuple(ops)
    self.fill = int(fill)

  def _magnitude(self, rng: np.random.Generator) -> float:
    magnitude = float(self.randaugment_magnitude)
    if self.magnitude_std > 0:  # timm's mstd: Gaussian noise on the magnitude, then clipped.
      magnitude = rng.normal(magnitude, self.magnitude_std)
    return min(max(magnitude, 0.0), MAX_MAGNITUDE)

  def _randaugment(self, image: Image.Image, mask: Image.Image | None, rng: np.random.Generator):
    for op_index in rng.choice(len(self.ops), self.num_ops, replace=True):
      name = self.ops[op_index]
      if rng.random() > self.op_probability:
        continue
      arg = _ARGUMENTS[name](self._magnitude(rng) / MAX_MAGNITUDE, rng)
      if name in GEOMETRIC_OPS:
        image = _geometric(name, image, arg, _BICUBIC, self.fill)
        if mask is not None:
          mask = _geometric(name, mask, arg, _NEAREST, 0)
      else:
        image = _photometric(name, image, arg)
    return image, mask

  def __call__(self, image_u8: np.ndarray, rng: np.random.Generator,
               mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    image = _to_pil(image_u8, "image")
    mask_image = _check_mask(image_u8, mask)
    top, left, crop_h, crop_w = random_resized_crop_box(image.height, image.width, rng,
                                                        self.scale)
    box = (left, top, left + crop_w, top + crop_h)
    size = (self.image_size, self.image_size)
    image = image.crop(box).resize(size, _BICUBIC)
    if mask_image is not None:
      mask_image = mask_image.crop(box).resize(size, _NEAREST)
    if self.hflip and rng.random() < 0.5:
      image = ImageOps.mirror(image)
      if mask_image is not None:
        mask_image = ImageOps.mirror(mask_image)
    if self.randaugment_magnitude is not None:
      image, mask_image = self._randaugment(image, mask_image, rng)
    return np.array(image), (None if mask_image is None else np.array(mask_image))

  def __repr__(self) -> str:
    policy = ("off" if self.randaugment_magnitude is None else
              f"n{self.num_ops} m{self.randaugment_magnitude} mstd{self.magnitude_std}")
    return (f"TrainAugment(size={self.image_size}, scale={self.scale}, hflip={self.hflip}, "
            f"randaugment={policy})")


class EvalTransform:
  """uint8 (H, W) [+ mask] -> uint8 (S, S) [+ mask]: short side to S / crop_fraction, centre crop.

  Sizes follow torchvision's Resize(int) and CenterCrop, as Medical MAE's evaluation does.
  """

  def __init__(self, image_size: int, crop_fraction: float = 224 / 256):
    if image_size < 1:
      raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0 < crop_fraction <= 1:
      raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    self.image_size = int(image_size)
    self.crop_fraction = float(crop_fraction)
    # The small margin keeps 224 / (224 / 256) at 256 whatever the float rounding.
    self.resize_to = int(math.floor(image_size / crop_fraction + 1e-6))

  def output_geometry(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized height, resized width), (crop top, crop left)) for an H x W input."""
    short, long = sorted((height, width))
    new_long = int(self.resize_to * long / short)
    new_h, new_w = (self.resize_to, new_long) if height <= width else (new_long, self.resize_to)
    top = int(round((new_h - self.image_size) / 2.0))
    left = int(round((new_w - self.image_size) / 2.0))
    return (new_h, new_w), (top, left)

  def __call__(self, image_u8: np.ndarray, mask: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    image = _to_pil(image_u8, "image")
    mask_image = _check_mask(image_u8, mask)
    (new_h, new_w), (top, left) = self.output_geometry(image.height, image.width)
    box = (left, top, left + self.image_size, top + self.image_size)
    image = image.resize((new_w, new_h), _BICUBIC).crop(box)
    if mask_image is not None:
      mask_image = mask_image.resize((new_w, new_h), _NEAREST).crop(box)
    return np.array(image), (None if mask_image is None else np.array(mask_image))

  def __repr__(self) -> str:
    return (f"EvalTransform(size={self.image_size}, resize_short_side_to={self.resize_to}, "
            "centre crop)")
