"""The paper's run: ViT-B/16 at 512x512, mask ratio 0.6, MIMIC-CXR-JPG (docs/method.md §6).

Defined in spcl_jax/configs/vitb512.py (importable from the installed package, so a config of
your own in any folder can build on it); this file lets --config=configs/vitb512.py work.
"""

from spcl_jax.configs.vitb512 import get_config  # noqa: F401
