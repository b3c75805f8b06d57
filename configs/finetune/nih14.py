"""Fine-tuning on ChestX-ray14, 14 findings (Medical MAE's class order).

Defined in spcl_jax/configs/finetune/nih14.py (importable from the installed package); this file
lets --config=configs/finetune/nih14.py[:512] work.
"""

from spcl_jax.configs.finetune.nih14 import get_config  # noqa: F401
