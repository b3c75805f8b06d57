"""Fine-tuning on your own labelled images, prepared with `spcl_jax.data.prepare csv`.

  python -m spcl_jax.data.prepare csv --src labels.csv --image-root /data/images \
      --label-columns Effusion,Pneumothorax --uncertain zeros --patient-column patient \
      --out /data/my_cxr
  python -m spcl_jax.finetune --config=configs/finetune/custom.py --workdir=F \
      --config.data.prepared=/data/my_cxr --config.init=/runs/spcl --config.label_fraction=100
The classes are the prepared folder's --label-columns (its report.json), in that order; the
split is prepare's 7:2:1 by patient (config.split_scheme='files' takes your own lists instead).
Results land in the report's 'Own data' column. Append :512 for 512 x 512 inputs.
"""

from spcl_jax.configs.finetune import common


def get_config(preset=None):
  return common.get_config("custom", "/data/my_cxr", preset)
