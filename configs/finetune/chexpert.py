"""Fine-tuning on CheXpert, the 5 competition observations in the paper's order, policy medical_mae.

Defined in spcl_jax/configs/finetune/chexpert.py (importable from the installed package); this file
lets --config=configs/finetune/chexpert.py[:512] work.
"""

from spcl_jax.configs.finetune.chexpert import get_config  # noqa: F401
