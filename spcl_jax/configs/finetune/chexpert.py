"""Fine-tuning on CheXpert, the 5 competition observations in the paper's order, policy medical_mae.

  python -m spcl_jax.finetune --config=configs/finetune/chexpert.py --workdir=F \
      --config.data.prepared=/data/chexpert --config.init=/runs/spcl --config.label_fraction=10
Append :512 to the config path for 512 x 512 inputs.
"""

from spcl_jax.configs.finetune import common


def get_config(preset=None):
  return common.get_config("chexpert", "/data/chexpert", preset)
