"""Prepared folders of ChestX-ray14, CheXpert, RSNA and SIIM for the fine-tuning tests.

Raw downloads are written with `data_fixtures` in each dataset's official format and prepared
with the real `prepare` CLI (32 x 32). Labels are chosen per split, knowing which split each
patient lands in (`splits.assign_patients`, what prepare uses), so that every class has both
label values on val and test: the AUC of each class is defined there, as a real run needs.
Images carry their first label as a brightness offset, so there is something to learn.
SIIM (64 x 64, segmentation): a positive image has a bright rectangle exactly where its mask is.
"""

from __future__ import annotations

import pathlib

import numpy as np

import data_fixtures as fx
from spcl_jax.data import prepare, splits

SIZE = 32
NUM_PATIENTS = 50  # 35 / 10 / 5 images in train / val / test


def _labels_by_patient(patients: list[str], num_classes: int) -> dict[str, list[int]]:
  """Within each split, patient j has class k positive iff (j + k) is even."""
  assignment = splits.assign_patients(patients)
  position = {name: 0 for name in splits.SPLIT_NAMES}
  labels = {}
  for patient in sorted(patients):
    j = position[assignment[patient]]
    position[assignment[patient]] += 1
    labels[patient] = [int((j + k) % 2 == 0) for k in range(num_classes)]
  return labels


def _image(seed: int, first_label: int) -> np.ndarray:
  image = fx.gradient(64, 64, seed).astype(np.float64)  # prepare refuses sides < 64
  image = 0.5 * image + (6.0 if first_label else 0.0)  # weaker than the images' own spread
  return np.clip(image, 0, 255).astype(np.uint8)


def _run_prepare(dataset: str, raw: pathlib.Path, out: pathlib.Path, size: int = SIZE
                 ) -> pathlib.Path:
  code = prepare.main([dataset, "--src", str(raw), "--out", str(out), "--image-size", str(size),
                       "--workers", "1"])
  assert code == 0, f"prepare {dataset} failed"
  return out


def prepared_nih(root: pathlib.Path) -> pathlib.Path:
  from spcl_jax.data.datasets import nih_chestxray14 as nih
  patients = [str(p) for p in range(1, NUM_PATIENTS + 1)]
  labels = _labels_by_patient(patients, len(nih.LABELS))
  rows = []
  for patient in patients:
    name = f"{int(patient):08d}_000.png"
    findings = "|".join(c for c, y in zip(nih.LABELS, labels[patient]) if y) or "No Finding"
    rows.append(fx.nih_row(name, findings, int(patient)))
    fx.write_png(root / "raw/images" / name, _image(int(patient), labels[patient][0]))
  fx.write_csv(root / "raw/Data_Entry_2017_v2020.csv", fx.NIH_HEADER, rows)
  # The download's own lists (official scheme): patients 1-10 are the official test set.
  names = [f"{int(p):08d}_000.png" for p in patients]
  (root / "raw/test_list.txt").write_text("\n".join(names[:10]) + "\n")
  (root / "raw/train_val_list.txt").write_text("\n".join(names[10:]) + "\n")
  return _run_prepare("nih_chestxray14", root / "raw", root / "prepared")


def prepared_chexpert(root: pathlib.Path) -> pathlib.Path:
  from spcl_jax.data.datasets import chexpert
  prefix = "CheXpert-v1.0-small"
  patients = [f"patient{p:05d}" for p in range(1, NUM_PATIENTS + 1)]
  labels = _labels_by_patient(patients, len(chexpert.TASK_LABELS))
  rows = {"train": [], "valid": []}
  for number, patient in enumerate(patients, start=1):
    split = "valid" if number > NUM_PATIENTS - 3 else "train"
    cells = [""] * len(chexpert.LABELS)
    for label, y in zip(chexpert.TASK_LABELS, labels[patient]):
      cells[chexpert.LABELS.index(label)] = "1.0" if y else "0.0"
    rows[split].append(fx.chexpert_row(prefix, split, number, 1, 1, True, cells))
    fx.write_jpeg(root / "raw" / prefix / split / f"{patient}/study1/view1_frontal.jpg",
                  _image(number, labels[patient][0]))
  for split, csv_name in (("train", "train.csv"), ("valid", "valid.csv")):
    fx.write_csv(root / "raw" / prefix / csv_name, fx.CHEXPERT_HEADER, rows[split])
  return _run_prepare("chexpert", root / "raw", root / "prepared")


def prepared_rsna(root: pathlib.Path) -> pathlib.Path:
  patients = [f"{i:08d}-0000-4000-8000-000000000000" for i in range(NUM_PATIENTS)]
  labels = _labels_by_patient(patients, 1)
  rows = []
  for i, patient in enumerate(patients):
    target = labels[patient][0]
    rows.append(f"{patient},10.0,20.0,30.0,40.0,1" if target else f"{patient},,,,,0")
    pixels = _image(i, target).astype(np.uint16) << 4  # 12-bit stored values
    path = root / "raw/stage_2_train_images" / f"{patient}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fx.dicom_bytes(pixels))
  fx.write_csv(root / "raw/stage_2_train_labels.csv", "patientId,x,y,width,height,Target", rows)
  return _run_prepare("rsna_pneumonia", root / "raw", root / "prepared")


SIIM_SIZE = 64


def siim_mask(index: int) -> np.ndarray:
  """A 64 x 64 rectangle whose place and size vary with `index` (4% to 12% of the image)."""
  mask = np.zeros((SIIM_SIZE, SIIM_SIZE), np.uint8)
  top, left = 8 + (index * 7) % 32, 6 + (index * 11) % 30
  mask[top:top + 12 + index % 8, left:left + 14 + index % 6] = 1
  return mask


def prepared_siim(root: pathlib.Path) -> pathlib.Path:
  """SIIM's stage-1 layout (train-rle.csv + DICOMs), every split with positives and negatives."""
  from spcl_jax.data import rle
  ids = [f"1.2.276.0.7230010.3.1.4.8323329.{1000 + i}.1517875166.{i}"
         for i in range(NUM_PATIENTS)]
  # No patient ids in SIIM: an image is its own patient. Within each split, every third image
  # is positive (train 12 of 35, val 4 of 10, test 2 of 5): negatives outnumber positives, as
  # in SIIM (~78% empty), so balancing the training set has something to drop.
  assignment = splits.assign_patients(ids)
  position = {name: 0 for name in splits.SPLIT_NAMES}
  positive = {}
  for image_id in sorted(ids):
    positive[image_id] = position[assignment[image_id]] % 3 == 0
    position[assignment[image_id]] += 1
  rows = []
  for i, image_id in enumerate(ids):
    image = fx.gradient(SIIM_SIZE, SIIM_SIZE, i).astype(np.float64) * 0.5
    if positive[image_id]:
      mask = siim_mask(i)
      rows.append(f"{image_id}, {rle.rle_encode(mask)}")
      image = np.where(mask > 0, 230.0, image)
    else:
      rows.append(f"{image_id}, -1")
    path = root / "raw/dicom-images-train" / f"1.2.{i}" / f"1.3.{i}" / f"{image_id}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fx.dicom_bytes(image.astype(np.uint16) << 4))  # 12-bit stored values
  fx.write_csv(root / "raw/train-rle.csv", "ImageId, EncodedPixels", rows)
  return _run_prepare("siim_acr", root / "raw", root / "prepared", SIIM_SIZE)


PREPARED = {"nih14": prepared_nih, "chexpert": prepared_chexpert, "rsna": prepared_rsna}


def finetune_config(task: str, prepared: pathlib.Path, preset: str | None = None, **overrides):
  """configs/finetune/<task>.py[:preset] shrunk to a test: pico/16 at 32 px (SIIM: 64), 2 epochs
  of batch 8; SIIM's decoders at 32 channels, the pyramid on blocks 0, 0, 1, 1 of pico's two."""
  import importlib
  config = importlib.import_module(f"spcl_jax.configs.finetune.{task}").get_config(preset)
  config.data.prepared = str(prepared)
  config.split_scheme = "paper"  # CheXpert's default 'official' test is 3 images here
  config.model.variant = "pico/16"
  config.model.image_size = SIIM_SIZE if task == "siim" else SIZE
  if task == "siim":
    config.model.decoder_channels = 32
    config.model.pyramid_blocks = (0, 0, 1, 1)
  config.model.dtype = "float32"
  config.batch_size = 8
  config.epochs = 2
  config.optim.warmup_epochs = 1
  config.optim.learning_rate = 1e-3
  config.data.num_workers = 0
  config.log_every_steps = 1
  config.bootstrap_samples = 10
  config.low_label.enabled = False  # the batch and epochs above, as given
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def cli_args(task: str, prepared: pathlib.Path, **overrides) -> list[str]:
  """finetune_config(task, prepared, **overrides) as the fine-tuning CLI's flags."""
  assert task != "siim", "segmentation's decoder fields are not listed here"
  fields = {"data.prepared": str(prepared), "model.variant": "pico/16", "model.image_size": SIZE,
            "model.dtype": "float32", "batch_size": 8, "epochs": 2, "optim.warmup_epochs": 1,
            "optim.learning_rate": 1e-3, "data.num_workers": 0, "log_every_steps": 1,
            "bootstrap_samples": 10, "low_label.enabled": False,
            "split_scheme": "paper", **overrides}
  config_file = pathlib.Path(__file__).resolve().parents[1] / f"spcl_jax/configs/finetune/{task}.py"
  return [f"--config={config_file}", *(f"--config.{k}={v}" for k, v in fields.items())]


# --- a fine-tuning set with signal ----------------------------------------------------------
# The labels of `prepared_nih_with_signal` are a linear read-out of a pre-trained encoder's
# features (a teacher): fine-tuning from that encoder (the init of `teacher_workdir`) can learn
# them, from another encoder it barely can, and shuffled labels or misaligned predictions score
# chance. The images are noise, so no pixel statistic gives a label away. The pre-training run
# normalised with its own mean/std (not the defaults), and the labels are computed with them.

SIGNAL_PATIENTS = 120  # ~84 / 24 / 12 images in train / val / test
TEACHER_MEAN, TEACHER_STD = 0.3, 0.2


def teacher_workdir(path: pathlib.Path) -> tuple[pathlib.Path, dict]:
  """A pre-training workdir (config.json + checkpoint) of random pico/16 encoder weights.

  Pre-trained at 64 px (32 px leaves too few patches for its two masked views); the encoder's
  weights do not depend on the image size (fixed sin-cos positions), so it fine-tunes at 32.
  """
  from export_fixtures import make_workdir
  return make_workdir(path, "pico/16", 64, normalization=(TEACHER_MEAN, TEACHER_STD))


def signal_config(prepared: pathlib.Path, init: str, **overrides):
  """One epoch of linear evaluation (the head on the frozen init); augmentation and drop path off
  (the teacher labels are those of the whole image); eval views are the stored image itself."""
  # linear evaluation with the pooling the teacher's labels were read through ('avg'), named
  # explicitly: 'auto' would pick cls for a workdir init
  settings = {"init": init, "epochs": 1, "protocol": "linear", "model.pool": "avg",
              "optim.learning_rate": 1e-2, "optim.warmup_epochs": 0, "model.drop_path_rate": 0.0,
              "data.crop_scale": (1.0, 1.0), "data.hflip": False, "data.randaugment": False,
              "data.eval_crop_fraction": 1.0}
  return finetune_config("nih14", prepared, **{**settings, **overrides})


def _teacher_features(prepared: pathlib.Path, encoder: dict
                      ) -> dict[str, tuple[list[str], np.ndarray]]:
  """Per split: image names and the (M, D) features the classifier's head would read (pool
  'avg': a fresh fc_norm on the patch tokens' mean) of the init's encoder, on the eval views."""
  import jax
  import jax.numpy as jnp
  from spcl_jax.data.normalize import normalize_uint8
  from spcl_jax.data.prepared_folder import LabelledSource
  from spcl_jax.finetune import data
  from spcl_jax.finetune.model import build_classifier
  config = signal_config(prepared, "random")
  width = encoder["cls"].shape[-1]
  model = build_classifier(config, width)
  transformer = {k: v for k, v in encoder["Transformer"].items() if k != "encoder_norm"}
  params = {"encoder": {**encoder, "Transformer": transformer},
            "fc_norm": {"scale": np.ones(width, np.float32), "bias": np.zeros(width, np.float32)},
            "head": {"kernel": np.eye(width, dtype=np.float32),
                     "bias": np.zeros(width, np.float32)}}
  apply = jax.jit(model.apply)
  out = {}
  for split in splits.SPLIT_NAMES:
    source = LabelledSource(prepared, split)
    view = data.EvalTransform(config, data.stored_image_size(source))
    records = [source[i] for i in range(len(source))]
    images = np.stack([view.map({**r, "valid": True})["image"] for r in records])
    x = normalize_uint8(jnp.asarray(images), TEACHER_MEAN, TEACHER_STD)
    out[split] = ([r["name"] for r in records], np.asarray(apply({"params": params}, x)))
  return out


def _readout(features: np.ndarray, num_classes: int, components: int = 3) -> np.ndarray:
  """(D, K): random mixtures of the features' top principal directions (few examples learn
  them; another encoder's features do not contain them)."""
  _, vectors = np.linalg.eigh(np.cov(features.T))
  top = vectors[:, ::-1][:, :components]
  return top @ np.random.default_rng(1).normal(size=(components, num_classes))


def prepared_nih_with_signal(root: pathlib.Path, encoder: dict) -> pathlib.Path:
  """ChestX-ray14 of noise images whose 14 labels are the teacher's scores above their median
  within each split (every class has both values on every split)."""
  from spcl_jax.data.datasets import nih_chestxray14 as nih
  names = [f"{p:08d}_000.png" for p in range(1, SIGNAL_PATIENTS + 1)]
  rng = np.random.default_rng(0)
  for name in names:
    fx.write_png(root / "raw/images" / name, rng.integers(0, 256, (64, 64), np.uint8))

  def write_entries(findings: dict[str, str]) -> None:
    rows = [fx.nih_row(name, findings.get(name, "No Finding"), p)
            for p, name in enumerate(names, start=1)]
    fx.write_csv(root / "raw/Data_Entry_2017_v2020.csv", fx.NIH_HEADER, rows)
  write_entries({})  # first pass: the images as prepare stores them, to score them
  unlabelled = _run_prepare("nih_chestxray14", root / "raw", root / "unlabelled")
  features = _teacher_features(unlabelled, encoder)
  readout = _readout(np.concatenate([f for _, f in features.values()]), len(nih.LABELS))
  findings = {}
  for split_names, split_features in features.values():
    scores = split_features @ readout
    positive = scores > np.median(scores, axis=0)
    for name, row in zip(split_names, positive):
      findings[name] = "|".join(c for c, y in zip(nih.LABELS, row) if y) or "No Finding"
  write_entries(findings)
  return _run_prepare("nih_chestxray14", root / "raw", root / "prepared")
