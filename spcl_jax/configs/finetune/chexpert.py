"""Fine-tuning on CheXpert, the 5 competition observations in the paper's order, policy medical_mae.

Split: 'official' by default, as published CheXpert numbers: test = the 202 frontal images of
valid.csv (labelled by radiologists), val carved by patient from train.csv. The paper's 7:2:1
patient split (its test labelled by the automatic labeller): --config.split_scheme=paper.

  python -m spcl_jax.finetune --config=configs/finetune/chexpert.py --workdir=F \
      --config.data.prepared=/data/chexpert --config.init=/runs/spcl --config.label_fraction=10
Append :512 to the config path for 512 x 512 inputs.
"""

from spcl_jax.configs.finetune import common


def get_config(preset=None):
  config = common.get_config("chexpert", "/data/chexpert", preset)
  config.split_scheme = "official"
  return config
