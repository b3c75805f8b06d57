"""SIIM-ACR pneumothorax segmentation, Dice at 1/10/100% labels; a preset picks the protocol.

  python -m spcl_jax.finetune --config=configs/finetune/siim.py:mgca --workdir=F \\
      --config.data.prepared=/data/siim_acr --config.init=/runs/spcl --config.label_fraction=10
  ... --config=configs/finetune/siim.py:upernet512 ...

mgca (the default; the setting of Table 4's neighbours GLoRIA, MGCA, MedKLIP): the encoder is
  frozen, a SETR-style progressive upsampling decoder (four conv-norm-ReLU + 2x upsampling
  stages) is trained on it at 224, on a training set balanced between positive and negative
  images. The optimiser numbers (AdamW, lr 5e-4, batch 16, 50 epochs, no warmup) are ours,
  set for a decoder trained from scratch on a frozen encoder; MGCA's repository is the
  reference for the protocol, not for these numbers.
upernet512 (MRM, EVA-X): the encoder is fine-tuned under an UperNet decoder reading blocks
  4/6/8/12 at 512 px, with layer-wise lr decay; BEiT/MAE's ADE20K recipe: AdamW lr 1e-4,
  layer decay 0.65, weight decay 0.05, drop path 0.1, batch 16; 50 epochs, 2 of warmup.
Both: Dice + BCE, weights 1 and 1 (spcl_jax/finetune/workloads.py says why); random resized crop
(area 0.5-1) and horizontal flip on image and mask together, no RandAugment (its photometric
ops would act on the image only, harmlessly, but its strong geometric ones move lesions off
the image); evaluation on the whole image resized to the input (no centre crop: every pixel of
the mask is scored); threshold 0.5; the checkpoint with the best val dice_positive is tested.
SIIM has no patient ids: its 7:2:1 split and 1%/10% fractions (prepare) are by image.
"""

import ml_collections

from spcl_jax.configs.finetune import common
from spcl_jax.downstream import SEGMENTATION_PROTOCOLS


def get_config(preset=None):
  preset = preset or "mgca"
  if preset not in SEGMENTATION_PROTOCOLS:
    raise ValueError(f"config preset {preset!r}: siim's presets are {SEGMENTATION_PROTOCOLS} (e.g. "
                     "--config=configs/finetune/siim.py:upernet512)")
  config = common.get_config("siim", "/data/siim_acr")
  config.protocol = preset
  config.loss = ml_collections.ConfigDict({"bce_weight": 1.0, "dice_weight": 1.0})
  config.batch_size = 16
  config.epochs = 50
  config.model.pool = "avg"  # unused by the segmenter; kept so the shared checks hold
  config.model.decoder_channels = 256 if preset == "mgca" else 512
  # Quarter-depth blocks of ViT-B (1-based 4/6/8/12), the UperNet pyramid's inputs.
  config.model.pyramid_blocks = (3, 5, 7, 11)
  config.data.crop_scale = (0.5, 1.0)
  config.data.randaugment = False
  config.data.eval_crop_fraction = 1.0
  if preset == "mgca":
    config.model.image_size = 224
    config.model.drop_path_rate = 0.0  # frozen: stochastic depth would only add noise
    config.optim.freeze_encoder = True
    config.optim.learning_rate = 5e-4
    config.optim.layer_decay = 1.0
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 0
    config.data.balance_train = True
  else:
    config.model.image_size = 512
    config.model.drop_path_rate = 0.1
    config.optim.freeze_encoder = False
    config.optim.learning_rate = 1e-4
    config.optim.layer_decay = 0.65
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 2
    config.data.balance_train = False
  return config
