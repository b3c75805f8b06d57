"""Fine-tuning on ChestX-ray14, 14 findings (Medical MAE's class order).

  python -m spcl_jax.finetune --config=configs/finetune/nih14.py --workdir=F \
      --config.data.prepared=/data/nih_chestxray14 --config.init=/runs/spcl --config.label_fraction=10
Append :512 to the config path for 512 x 512 inputs.
"""

from spcl_jax.configs.finetune import common


def get_config(preset=None):
  return common.get_config("nih14", "/data/nih_chestxray14", preset)
