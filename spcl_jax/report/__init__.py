"""The paper's tables from fine-tuning results: `python -m spcl_jax.report RUN_DIRS... --out DIR`.

Reads results.json files (spcl_jax.report.runs), builds Tables 1-4 (spcl_jax.report.tables) and
writes each as Markdown and CSV. It trains nothing and makes up nothing: a missing run is an
empty cell.
"""
