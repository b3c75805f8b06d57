"""The downstream vocabulary, in one place: the benchmarks a fine-tuning run can be, and the
words its config, its prepared data, its results.json and the report share.

A *task* is a benchmark (`config.task`, a column group of the paper's tables); each reads one
prepared dataset and is scored under a *protocol*. Label fractions, split schemes and CheXpert's
uncertainty policies are the remaining choices of a run; `results.json` records all of them in
RESULTS_FORMAT. The fine-tuning configs and checks, the prepared-folder readers and the report
import these names from here. Nothing here imports the rest of spcl_jax.
"""

# config.task -> the prepared dataset it reads (`python -m spcl_jax.data.prepare DATASET`).
# 'custom' is a user's own labelled CSV (`prepare csv`), classes from its prepared folder.
TASK_DATASETS = {"nih14": "nih_chestxray14", "chexpert": "chexpert", "rsna": "rsna_pneumonia",
                 "siim": "siim_acr", "custom": "csv"}
TASKS = tuple(TASK_DATASETS)
CLASSIFICATION_TASKS = ("nih14", "chexpert", "rsna", "custom")
SEGMENTATION_TASKS = ("siim",)
TASK_TITLES = {"nih14": "ChestX-ray14", "chexpert": "CheXpert", "rsna": "RSNA Pneu.",
               "siim": "SIIM-ACR", "custom": "Own data"}

# config.protocol: how a task is trained and scored (recorded in results.json as `protocol`).
# classification: full fine-tuning; linear: linear evaluation (the encoder frozen)
CLASSIFICATION_PROTOCOLS = ("classification", "linear")
SEGMENTATION_PROTOCOLS = ("mgca", "upernet512")
PROTOCOLS = CLASSIFICATION_PROTOCOLS + SEGMENTATION_PROTOCOLS

# config.label_fraction: percent of the train split; the prepared split file of each (nested).
LABEL_FRACTIONS = (1, 10, 100)
FRACTION_SPLIT_FILES = {100: "train", 10: "train_10pct", 1: "train_1pct"}

# config.split_scheme: paper (prepare's 7:2:1 by patient), official (the download's own test
# list), files (the user's own lists in config.split_files). A prepared folder holds the first two.
SPLIT_SCHEMES = ("paper", "official", "files")
PREPARED_SPLIT_SCHEMES = ("paper", "official")

# config.chexpert_policy: CheXpert's uncertain (-1) labels as 1, as 0, or Medical MAE's mix.
CHEXPERT_POLICIES = ("medical_mae", "ones", "zeros")

# WORKDIR/results.json of a fine-tuning run, and the test numbers the report can show.
RESULTS_FILE = "results.json"
RESULTS_FORMAT = "spcl_jax.finetune.results/1"
SELECTIONS = {"best_val": "test_at_best_val", "last_epoch": "test_at_last_epoch"}


def protocols_of(task: str) -> tuple[str, ...]:
  """The protocols `task` can be run under."""
  return SEGMENTATION_PROTOCOLS if task in SEGMENTATION_TASKS else CLASSIFICATION_PROTOCOLS
