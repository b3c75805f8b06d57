"""Fine-tuning on RSNA Pneumonia, binary (Target), paper split only.

  python -m spcl_jax.finetune --config=configs/finetune/rsna.py --workdir=F \
      --config.data.prepared=/data/rsna_pneumonia --config.init=/runs/spcl --config.label_fraction=10
Append :512 to the config path for 512 x 512 inputs.
"""

from spcl_jax.configs.finetune import common


def get_config(preset=None):
  return common.get_config("rsna", "/data/rsna_pneumonia", preset)
