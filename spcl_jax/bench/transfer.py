"""Does S-PCL pre-training transfer, and which pooling keeps it? Minutes on 2 CPU cores:

  python -m spcl_jax.bench transfer [--workdir DIR] [--seeds 3] [--patients 1200]

  1. a labelled synthetic chest-X-ray-like set (`synthetic_cxr`: patients, the 14 ChestX-ray14
     findings, each a texture in its own place), written as ChestX-ray14's raw download and prepared
     by `spcl_jax.data.prepare` (64 x 64)
  2. S-PCL pre-training of a ViT-pico/8 on the train split fine-tuning uses (`spcl_jax.train`,
     labels unused; no val or test image)
  3. fine-tuning (`spcl_jax.finetune.trainer.train_seeds`, configs/finetune/nih14.py shrunk to
     the model, the low-label rule resolving each fraction) at 1/10/100% labels: random vs
     S-PCL init x pool cls / avg x full fine-tuning / linear evaluation, `--seeds` seeds each
  4. the Table-1-shaped grid (test macro AUC, mean ± std over seeds) from `spcl_jax.report`,
     then two verdicts: does S-PCL beat random init by more than 2 std anywhere (the grid
     counts only then), and does cls beat avg for S-PCL full fine-tuning at 1% and 10%?
Runs of one shape compile once (XLA's persistent cache in DIR/xla_cache); --jobs runs go at
once, each in its own process. A finished step is
not redone: rerunning with the same DIR reprints the grid. --quick: one seed, 10% only, full
fine-tuning with pool cls, a few steps (the code path, as CI runs it; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np

INITS = ("random", "spcl")
VARIANTS = (("classification", "cls"), ("classification", "avg"), ("linear", "cls"),
            ("linear", "avg"))
FRACTIONS = (1, 10, 100)
LABELS = {"random": "random init", "spcl": "S-PCL"}
LINES = {("spcl", "cls"): ("C0", "-"), ("spcl", "avg"): ("C1", "-"),  # the grid's figure
         ("random", "cls"): ("C0", "--"), ("random", "avg"): ("C1", "--")}


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m spcl_jax.bench transfer",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="", help="folder for data, runs and the XLA cache "
                      "(default: a new temporary folder)")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--patients", type=int, default=1200, help="~2.5 images each")
  parser.add_argument("--pretrain_steps", type=int, default=800)
  parser.add_argument("--finetune_steps", type=int, default=128,
                      help="optimiser steps per fine-tuning run at least (the rule's minimum)")
  parser.add_argument("--finetune_epochs", type=int, default=4,
                      help="epochs per run at least (the rule raises them at low fractions)")
  parser.add_argument("--fractions", default="1,10,100")
  parser.add_argument("--jobs", type=int, default=2,
                      help="fine-tuning runs at a time, each in its own process (default 2: "
                      "one per core of a 2-core machine)")
  parser.add_argument("--quick", action="store_true", help="the code path only (tests, CI)")
  return parser.parse_args(argv)


def prepare_data(root: pathlib.Path, patients: int) -> pathlib.Path:
  from spcl_jax.bench import synthetic_cxr  # pylint: disable=g-import-not-at-top
  from spcl_jax.data import prepare  # pylint: disable=g-import-not-at-top
  out = root / "prepared"
  if not (out / "report.json").is_file():
    counts = synthetic_cxr.write_download(root / "raw", num_patients=patients)
    print(f"synthetic set: {counts['images']} images of {counts['patients']} patients",
          flush=True)
    code = prepare.main(["nih_chestxray14", "--src", str(root / "raw"), "--out", str(out),
                         "--image-size", str(synthetic_cxr.SIZE), "--workers", "2"])
    if code != 0:
      raise RuntimeError(f"prepare failed on {root / 'raw'}")
  return out


def pretrain_config(prepared: pathlib.Path, steps: int, batch_size: int = 64,
                    retrieval: bool = True):
  from spcl_jax.configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.variant = "pico/8"
  config.model.image_size = 64
  config.model.dtype = "float32"  # XLA:CPU runs bfloat16 matmuls slower than float32
  # The split fine-tuning trains on (scheme 'official'): pre-training never sees a val or test
  # image, not even unlabelled.
  config.data.source = f"prepared:{prepared},split=official_train"
  config.batch_size = batch_size
  config.total_steps = steps
  config.optim.learning_rate = 1e-3
  config.optim.warmup_fraction = 0.1
  config.log_every_steps = max(1, steps // 10)
  config.evals.retrieval.every_steps = steps
  config.evals.retrieval.batches = 1
  if not retrieval:
    del config.evals["retrieval"]
  config.checkpoint_every_steps = steps
  return config


def finetune_config(prepared: pathlib.Path, init: str, protocol: str, pool: str,
                    fraction: int, min_steps: int, epochs: int = 4):
  """configs/finetune/nih14.py with the model shrunk to the pre-trained one and the schedule to
  minutes; the recipe (LLRD AdamW, augmentation, drop path, low-label rule) as shipped."""
  from spcl_jax.configs.finetune import nih14  # pylint: disable=g-import-not-at-top
  config = nih14.get_config()
  config.data.prepared = str(prepared)
  config.split_scheme = "official"  # val 294 images (scored often), test 609 (scored once)
  config.init = init
  config.protocol = protocol
  config.label_fraction = fraction
  config.model.variant = "pico/8"
  config.model.image_size = 64
  config.model.dtype = "float32"
  config.model.pool = pool
  config.batch_size = 64
  config.epochs = epochs
  config.optim.warmup_epochs = 1
  config.optim.learning_rate = 1e-3  # a short schedule: Medical MAE's blr x 64 / 256 crawls
  config.low_label.min_total_steps = min_steps
  config.low_label.min_batch_size = 16
  config.low_label.val_images_per_train_image = 1
  config.data.num_workers = 0
  config.bootstrap_samples = 200  # the interval is in results.json; the grid shows seed std
  config.log_every_steps = 10_000
  config.checkpoint_every_steps = 100_000
  return config


def use_compilation_cache(folder: pathlib.Path) -> None:
  """XLA's persistent cache: a run of a shape already compiled (another seed, init or cell of
  the same batch) loads the program instead of compiling it."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_cell(root: pathlib.Path, workdir: pathlib.Path, config, seeds: int
             ) -> tuple[dict, float]:
  """One grid cell, all its seeds (`train_seeds`), its log in DIR/logs; (test entry, seconds)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from spcl_jax.finetune import trainer  # pylint: disable=g-import-not-at-top
  use_compilation_cache(root / "xla_cache")
  start = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()) as log:
    summary = trainer.train_seeds(config, str(workdir), seeds)
  (root / "logs").mkdir(exist_ok=True)
  (root / "logs" / f"{workdir.name}.txt").write_text(log.getvalue())
  return summary["test_at_best_val"], time.perf_counter() - start


def run_grid(root: pathlib.Path, prepared: pathlib.Path, pretrained: pathlib.Path,
             args: argparse.Namespace) -> pathlib.Path:
  """Every cell not finished yet, `--jobs` at a time (a small ViT's step keeps one core busy)."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import multiprocessing  # pylint: disable=g-import-not-at-top
  runs = root / "finetune"
  fractions = [int(f) for f in args.fractions.split(",")]
  variants = VARIANTS[:1] if args.quick else VARIANTS
  todo = [(i, v, f) for i in INITS for v in variants for f in fractions]
  cells = {}
  for init, (protocol, pool, fraction) in [(i, (*v, f)) for i, v, f in todo]:
    workdir = runs / f"{init}_{protocol}_{pool}_{fraction}"
    if not (workdir / "results.json").is_file():
      cells[workdir] = finetune_config(
          prepared, "random" if init == "random" else str(pretrained), protocol, pool, fraction,
          args.finetune_steps, args.finetune_epochs)
  done = len(todo) - len(cells)

  def report(name: str, test: dict, seconds: float) -> None:
    nonlocal done
    done += 1
    print(f"[{done}/{len(todo)}] {name}: test macro AUC {test['macro_auc']:.3f} ± "
          f"{test.get('macro_auc_std', 0.0):.3f} ({seconds:.0f} s)", flush=True)
  if args.jobs == 1:  # in this process: no second interpreter to start
    for workdir, config in cells.items():
      report(workdir.name, *run_cell(root, workdir, config, args.seeds))
    return runs
  with concurrent.futures.ProcessPoolExecutor(
      args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
    futures = {pool.submit(run_cell, root, workdir, config, args.seeds): workdir.name
               for workdir, config in cells.items()}
    for future in concurrent.futures.as_completed(futures):
      report(futures[future], *future.result())
  return runs


def grid_table(runs: pathlib.Path, pretrained: pathlib.Path):
  from spcl_jax.report import __main__ as report  # pylint: disable=g-import-not-at-top
  built, _ = report.build([str(runs)], names=[f"{pretrained}={LABELS['spcl']}"])
  return built[0].with_columns(lambda name: name == "Method" or name.startswith("ChestX-ray14"))


def read_scores(runs: pathlib.Path) -> dict[tuple[str, str, str, int], tuple[float, float]]:
  """(init, protocol, pool, fraction) -> (test macro AUC mean, std over seeds) of each run."""
  scores = {}
  for path in sorted(runs.glob("*/results.json")):
    init, protocol, pool, fraction = path.parent.name.split("_")
    t = json.loads(path.read_text())["test_at_best_val"]
    scores[(init, protocol, pool, int(fraction))] = (t["macro_auc"], t.get("macro_auc_std", 0.0))
  return scores


def verdicts(scores: dict[tuple[str, str, str, int], tuple[float, float]]) -> list[str]:
  """S-PCL vs random per cell (> 2 std: the larger of the two seed stds); cls vs avg for S-PCL
  full fine-tuning at 1% and 10% (cls wins if its mean is higher at both)."""
  beats = []
  for (init, protocol, pool, fraction), (s, s_std) in sorted(scores.items()):
    random = scores.get(("random", protocol, pool, fraction))
    if init == "spcl" and random is not None and s - random[0] > 2 * max(s_std, random[1]):
      beats.append(f"{protocol}/{pool} {fraction}% ({100 * s:.1f} vs {100 * random[0]:.1f})")
  lines = ["S-PCL beats random init by > 2 std in: " + (", ".join(beats) if beats else
           "no cell: the grid does not count; look at pre-training first")]
  full = {(pool, f): v[0] for (i, protocol, pool, f), v in scores.items()
          if i == "spcl" and protocol == "classification"}
  low = [f for f in (1, 10) if ("cls", f) in full and ("avg", f) in full]
  if not low:
    return lines + ["pooling: needs S-PCL full fine-tuning with both pools at 1% or 10%"]
  wins = [f for f in low if full[("cls", f)] > full[("avg", f)]]
  compared = "; ".join(f"{f}%: cls {100 * full[('cls', f)]:.1f} vs avg "
                       f"{100 * full[('avg', f)]:.1f}" for f in low)
  winner = "cls" if wins == low == [1, 10] else "avg" if not wins else "undecided"
  return lines + [f"pooling, S-PCL full fine-tuning: {compared} -> {winner}"]


def plot_grid(scores: dict[tuple[str, str, str, int], tuple[float, float]],
              out: pathlib.Path) -> pathlib.Path:
  """Test macro AUC against the label fraction, mean ± std over seeds: full fine-tuning left,
  linear evaluation right; S-PCL solid, random init dashed; one colour per pooling."""
  from spcl_jax.report import figures  # pylint: disable=g-import-not-at-top
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), sharey=True)
  for ax, (protocol, title) in zip(axes, (("classification", "full fine-tuning"),
                                          ("linear", "linear evaluation"))):
    for (init, pool), (colour, style) in LINES.items():
      cells = sorted((f, v) for (i, p, q, f), v in scores.items()
                     if (i, p, q) == (init, protocol, pool))
      if cells:
        x = [f for f, _ in cells]
        mean, std = (np.asarray([v[k] for _, v in cells]) * 100 for k in (0, 1))
        ax.errorbar(x, mean, yerr=std, color=colour, ls=style, marker="o", capsize=3,
                    label=f"{LABELS[init]}, pool {pool}")
    ax.set(xscale="log", xticks=list(FRACTIONS), xticklabels=[f"{f}%" for f in FRACTIONS],
           xlabel="labelled training images", title=title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test macro AUC (%), mean ± std over seeds")
  axes[1].legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=figures.DPI)
  plt.close(fig)
  return out


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  if args.quick:
    args.seeds, args.patients, args.pretrain_steps, args.finetune_steps = 1, 500, 4, 4
    args.finetune_epochs, args.fractions, args.jobs = 3, "10", 1
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="spcl_transfer_")).resolve()
  root.mkdir(parents=True, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  use_compilation_cache(root / "xla_cache")
  from spcl_jax import train  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  print(f"transfer benchmark in {root} on {jax.device_count()} x {jax.devices()[0].device_kind}",
        flush=True)
  prepared = prepare_data(root, args.patients)
  pretrained = root / "pretrain"
  t0 = time.perf_counter()  # a finished pre-training run is found and left as it is
  train.train_and_evaluate(pretrain_config(prepared, args.pretrain_steps,
                                           32 if args.quick else 64, retrieval=not args.quick),
                           str(pretrained))
  print(f"pre-training: {args.pretrain_steps} steps, {time.perf_counter() - t0:.0f} s",
        flush=True)
  runs = run_grid(root, prepared, pretrained, args)
  print()
  print(grid_table(runs, pretrained).markdown())
  scores = read_scores(runs)
  for line in verdicts(scores):
    print(line)
  print(f"figure: {plot_grid(scores, root / 'transfer.png')}")
  cpu = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))
  # CPU seconds do not depend on what else the machine runs (the runs' worker processes
  # included): with --jobs 2 on 2 free cores the wall time is about half of them.
  print(f"wall time {time.perf_counter() - start:.0f} s; CPU time {cpu:.0f} s (user + system, "
        "with the worker processes)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
