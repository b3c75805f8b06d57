"""Defaults for every S-PCL run; the variant files override what differs (Flax-examples style).

Defined in spcl_jax/configs/default.py (importable from the installed package, so a config of
your own in any folder can build on it); this file lets --config=configs/default.py work.
"""

from spcl_jax.configs.default import get_config  # noqa: F401
