"""Fine-tuning on RSNA Pneumonia, binary (Target), paper split only.

Defined in spcl_jax/configs/finetune/rsna.py (importable from the installed package); this file
lets --config=configs/finetune/rsna.py[:512] work.
"""

from spcl_jax.configs.finetune.rsna import get_config  # noqa: F401
