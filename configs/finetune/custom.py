"""Fine-tuning on your own labelled images (`python -m spcl_jax.data.prepare csv`).

Defined in spcl_jax/configs/finetune/custom.py (importable from the installed package); this file
lets --config=configs/finetune/custom.py[:512] work.
"""

from spcl_jax.configs.finetune.custom import get_config  # noqa: F401
