"""The shipped configs, importable from the installed package (as big_vision's are).

`default.get_config()` holds every field with its default; `demo`, `vits512`, `vitb512` and
`vitl512` override what differs. A config of your own, in any folder, builds on them:

    from spcl_jax.configs import vitb512

    def get_config():
      config = vitb512.get_config()
      config.data.source = "prepared:/data/prepared/mimic"
      return config

and runs with `python -m spcl_jax.main --config=/path/to/my_config.py --workdir=...` from any
directory. The files in the repository's top-level `configs/` point here, so the commands in the
README and docs/ (`--config=configs/vitb512.py`) keep working.
"""
