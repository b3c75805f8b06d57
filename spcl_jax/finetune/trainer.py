"""Fine-tuning: `train_and_evaluate(config, workdir)`, readable top to bottom.

  validate everything a start reads (config, encoder init, labelled splits, classes with both
  label values on val and test, the init's shapes) before anything is written -> the engine
  (`spcl_jax.engine`: lock, resume config check, restore, loop, checkpoints, SIGTERM) runs
  `FineTuningRun`: per step a global batch, step key = fold_in(train key, step), the jitted
  step; every config.val_every_epochs epochs (the low-label rule's, `recipe`) and after the
  last, the workload's selection metric on `val` (macro AUC; Dice over the images with a
  pneumothorax), the best-on-val parameters kept in WORKDIR/best, then the checkpoint -> at
  the end: `test` scored once with the best-on-val parameters (and
  once with the last ones) -> WORKDIR/results.json.

The test split is read only after training: nothing during training depends on it. The
selection history (val scores per epoch) is WORKDIR/selection.json, written before the epoch's
checkpoint; on resume, epochs after the checkpoint are dropped and recomputed (identically).
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from spcl_jax import auc, checkpoint, engine, metrics, run_info, sharding, steps
from spcl_jax.downstream import RESULTS_FILE, RESULTS_FORMAT, TASK_DATASETS
from spcl_jax.errors import ConfigError
from spcl_jax.finetune import data, predictions, recipe, results
from spcl_jax.finetune.configuration import validate_finetune_config
from spcl_jax.finetune.initialization import encoder_for_classifier, load_init
from spcl_jax.finetune.steps import FineTuning, build_finetuning
from spcl_jax.models.vit import variant_dims
from spcl_jax.workdir_path import as_path

SELECTION_FILE = "selection.json"
CLASS_ADVICE = ("use a larger split, or keep the other classes only with config.classes (e.g. "
                "--config.classes=Cardiomegaly,Edema)")


def _keys(seed: int) -> dict[str, jax.Array]:
  root = jax.random.key(seed)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "train"))}


def finetune_flops_per_image(config: ml_collections.ConfigDict) -> float:
  """Forward + backward (3x forward) of one whole image: patch embedding and blocks."""
  return 3.0 * metrics.image_forward_flops(config)


def predict(ft: FineTuning, params: Any, dataset: Any, num_images: int) -> np.ndarray:
  """The workload's per-image outputs of an eval dataset, in split order, the padding dropped.

  Classification: logits (num_images, K); the labels are the source's own targets (same
  order). Segmentation: |T&P|, |T|, |P| per image (num_images, 3), against the batch's masks.
  The step returns its outputs replicated, so every process holds all of them.
  """
  kept = []
  for i in range(len(dataset)):
    batch = data.as_batch(dataset[i])
    images = steps.global_batch(batch["image"], ft.mesh, ft.config)
    outputs = np.asarray(jax.device_get(ft.eval_step(params, images)), np.float32)
    kept.append(ft.workload.host_outputs(batch, outputs))
  return np.concatenate(kept)[:num_images]


def run_info_extra(config: ml_collections.ConfigDict, classes: Sequence[str],
                   init: dict[str, Any], stored: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
  """What config.json records beyond the config: what export needs for the head, and how the
  prepared folder stored its images (`stored`: what `spcl_jax.predict` replays on new files)."""
  kept = {} if stored is None else {"stored_images": stored}
  if recipe.is_classification(config.protocol):
    return {"classifier": {"task": config.task, "protocol": config.protocol,
                           "pool": config.model.pool,
                           "num_classes": len(classes), "classes": list(classes), "init": init,
                           **kept}}
  return {"segmenter": {"task": config.task, "protocol": config.protocol,
                        "classes": list(classes), "init": init, **kept}}


class Selection:
  """Val scores per finished epoch, and which epoch is best on `metric` (first of equal ones)."""

  def __init__(self, path: pathlib.Path, metric: str = "macro_auc"):
    self.path, self.metric = path, metric
    self.history: dict[int, dict[str, Any]] = {}
    if path.is_file():
      saved = json.loads(path.read_text())
      self.history = {int(k): v for k, v in saved["history"].items()}

  def keep_until(self, epoch: int) -> None:
    self.history = {e: v for e, v in self.history.items() if e <= epoch}

  @property
  def best_epoch(self) -> int | None:
    if not self.history:
      return None
    return max(sorted(self.history), key=lambda e: self.history[e][self.metric])

  def save(self) -> None:
    results.write_json(self.path, {"history": {str(k): v for k, v in self.history.items()}})


class Start:
  """Everything a start reads, validated before the workdir is touched."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.mesh = sharding.make_mesh(config)
    validate_finetune_config(config, num_batch_shards=sharding.num_batch_shards(config, self.mesh),
                             process_count=jax.process_count())
    self.init = load_init(config.init, config.init_step, config.model.image_size)
    if self.init.normalization is not None and self.init.normalization != (config.data.mean,
                                                                           config.data.std):
      config.data.mean, config.data.std = self.init.normalization
      if jax.process_index() == 0:
        print(f"normalisation mean {config.data.mean:.4g}, std {config.data.std:.4g}: the "
              "pre-training run's (WORKDIR/config.json)", flush=True)
    self.sources = _checked_sources(config)
    self.classes = list(self.sources["train"].label_names)
    # pool 'auto', protocol 'linear' and the low-label rule, written into the config (and so
    # into config.json) before anything else reads it
    try:
      schedule, changes = recipe.resolve(
          config, init_kind=self.init.kind, num_train=len(self.sources["train"]),
          num_val=len(self.sources["val"]),
          batch_multiple=math.lcm(sharding.num_batch_shards(config, self.mesh),
                                  jax.process_count()))
    except ValueError as e:
      raise ConfigError(f"{e} (label_fraction={config.label_fraction})") from None
    self.steps_per_epoch = schedule.steps_per_epoch
    self.train_positives = results.positives_per_class(self.sources["train"].targets,
                                                       self.classes)
    if jax.process_index() == 0:
      warning = results.missing_positives_warning(self.train_positives, config.label_fraction)
      for line in [*changes, *([warning] if warning else [])]:
        print(line, flush=True)
    self.ft = build_finetuning(config, self.mesh, len(self.classes), self.steps_per_epoch)
    self.encoder = None  # the init's encoder, checked against the model's shapes now
    if self.init.encoder_params is not None:
      self.encoder = encoder_for_classifier(self.init.encoder_params,
                                            self.ft.abstract_state.params["encoder"],
                                            f"config.init={config.init!r}")


def _checked_sources(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The splits; a classification class with one label value on val or test is an error now,
  not after an epoch (its AUC would be undefined)."""
  sources = data.split_sources(config)
  dataset = sources["train"].folder.dataset
  if dataset != TASK_DATASETS[config.task]:
    raise ConfigError(f"config.data.prepared={config.data.prepared!r} holds {dataset}, but "
                      f"config.task={config.task!r} reads {TASK_DATASETS[config.task]}")
  if recipe.is_classification(config.protocol):
    for split in ("val", "test"):
      auc.require_both_values(sources[split].targets, sources[split].label_names,
                              split=f"the {split} split", advice=CLASS_ADVICE)
  return sources


class FineTuningRun:
  """Fine-tuning as an `engine` workload: the classifier's or segmenter's state and step, val
  selection with best/ at each epoch end, the test split and results.json at the end."""

  resume_rules = run_info.FINETUNING
  non_finite_advice = ("Lower config.optim.base_learning_rate (or config.optim.learning_rate), "
                       "or use config.model.dtype=float32 to find the cause.")

  def __init__(self, config: ml_collections.ConfigDict, start: Start):
    self.config, self.start, self.ft = config, start, start.ft
    self.workload, self.sources, self.classes = start.ft.workload, start.sources, start.classes
    self.steps_per_epoch = start.steps_per_epoch
    self.total_steps = config.epochs * start.steps_per_epoch
    self.abstract_state, self.shardings = start.ft.abstract_state, start.ft.shardings
    self.keys = _keys(config.seed)
    self.flops_per_image = finetune_flops_per_image(config)
    self.peak = metrics.peak_flops_per_device(config, jax.devices()[0])
    self.last_log: tuple[int, float] | None = None
    self.data_iterator: Any = None
    self.val_ds: Any = None
    self.best_manager: Any = None
    self.selection: Selection | None = None

  def open(self, workdir: pathlib.Path) -> None:
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    self.data_iterator = iter(data.train_dataset(self.config, self.sources["train"], **process))
    self.val_ds = data.eval_dataset(self.config, self.sources["val"], **process)
    if jax.process_index() == 0:
      checkpoint.remove_stale_tmp(workdir / checkpoint.BEST_DIR)  # a save_best cut short
    self.best_manager = checkpoint.make_best_manager(workdir)
    self.selection = Selection(workdir / SELECTION_FILE, self.workload.metric)
    if jax.process_index() == 0:
      self._describe(workdir)

  def _describe(self, workdir: pathlib.Path) -> None:
    config, sources, init = self.config, self.sources, self.start.init
    print(f"{config.task}: {len(self.classes)} classes; train {len(sources['train'])} images "
          f"({config.label_fraction}%), val {len(sources['val'])}, test "
          f"{len(sources['test'])}; {self.steps_per_epoch} steps/epoch x {config.epochs} "
          f"epochs; init {init.kind} {init.path or ''}; {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, mesh {dict(self.ft.mesh.shape)}; workdir "
          f"{workdir}", flush=True)

  def run_info_extra(self) -> dict[str, Any]:
    return run_info_extra(self.config, self.classes, self.start.init.describe(),
                          data.stored_image_settings(self.sources["train"]))

  def init_state(self) -> steps.TrainState:
    return self.ft.init_state(self.keys["init"], self.start.encoder)

  def resumed(self, state: steps.TrainState, session: engine.Session) -> None:
    del state
    self.selection.keep_until(session.start_step // self.steps_per_epoch)
    checkpoint.drop_best_after(self.best_manager, session.start_step)

  def train_step(self, state: steps.TrainState, step: int) -> tuple[steps.TrainState, Any]:
    batch = data.as_batch(next(self.data_iterator))
    mesh, config = self.ft.mesh, self.config
    images = steps.global_batch(batch["image"], mesh, config)
    labels = steps.global_batch(batch[self.workload.target], mesh, config)
    return self.ft.train_step(state, images, labels,
                              jax.random.fold_in(self.keys["train"], step - 1))

  def log_row(self, step: int, values: dict[str, float]) -> dict[str, Any]:
    now = time.perf_counter()
    if self.last_log is not None and step > self.last_log[0]:
      rate = (step - self.last_log[0]) * self.config.batch_size / (now - self.last_log[1])
      values["images_per_sec"] = rate
      values["tflops_per_sec"] = rate * self.flops_per_image / 1e12
      values["mfu"] = (rate * self.flops_per_image / (self.peak * jax.device_count())
                       if self.peak else None)
    self.last_log = (step, now)
    return {**values, "epoch": step / self.steps_per_epoch}

  def is_save_point(self, step: int) -> bool:
    """Val (and a checkpoint) every val_every_epochs epochs and after the last (recipe.py)."""
    epoch, rest = divmod(step, self.steps_per_epoch)
    return rest == 0 and (epoch % self.config.val_every_epochs == 0 or step == self.total_steps)

  def before_save(self, step: int, state: steps.TrainState, session: engine.Session) -> None:
    if self.is_save_point(step):
      self._select_on_val(step, state, session)

  def _select_on_val(self, step: int, state: steps.TrainState, session: engine.Session) -> None:
    """Scores val; a new best epoch's parameters go to best/; selection.json, then a row."""
    epoch, workload, selection = step // self.steps_per_epoch, self.workload, self.selection
    outputs = predict(self.ft, state.params, self.val_ds, len(self.sources["val"]))
    engine.at_moment("val", step)
    scored = workload.score(self.sources["val"], outputs, self.classes,
                            f"the val split (epoch {epoch})")
    selection.history[epoch] = {"epoch": epoch, "step": step, **scored}
    if selection.best_epoch == epoch:
      engine.at_moment("best_save", step)
      checkpoint.save_best(self.best_manager, step, state.params, epoch)
    if session.is_main:
      selection.save()
    best = selection.history[selection.best_epoch]
    session.writer.write(step, {**workload.scalars(scored), "epoch": epoch})
    if session.is_main:
      print(f"epoch {epoch}/{self.config.epochs} | val {workload.summary(scored)} | best "
            f"{workload.metric} {best[workload.metric]:.4f} (epoch {best['epoch']})", flush=True)

  def after_step(self, step: int, state: steps.TrainState, session: engine.Session,
                 last: bool) -> None:
    del step, state, session, last

  def already_done(self, state: steps.TrainState, session: engine.Session) -> dict[str, Any]:
    """At the last step: the results if written (the config check passed), else the test."""
    path = session.workdir / RESULTS_FILE
    if not path.is_file():
      return self.finish(state, session)
    if session.is_main:
      print(f"nothing to do: {session.workdir} finished all {self.config.epochs} epochs; its "
            f"results are in {path}", flush=True)
    return json.loads(path.read_text())

  def stopped(self, state: steps.TrainState, session: engine.Session) -> dict[str, Any]:
    del session
    return {"stopped_at_step": int(jax.device_get(state.step))}

  def finish(self, state: steps.TrainState, session: engine.Session) -> dict[str, Any]:
    writer = predictions.PredictionWriter(session.workdir, self.workload.protocol, self.classes,
                                          self.config.model.image_size, enabled=session.is_main)
    summary = _test_and_report(self, state, writer)
    summary["train_positives"] = self.start.train_positives
    summary.update({k: session.clock.update()[k] for k in ("accelerator_seconds", "device_kind",
                                                            "num_devices")})
    if session.is_main:
      results.write_json(session.workdir / RESULTS_FILE, summary)
      print(f"test {_headline(self.workload, summary['test_at_best_val'])} at the best val "
            f"epoch {summary['test_at_best_val']['epoch']}; wrote "
            f"{session.workdir / RESULTS_FILE}", flush=True)
    return summary

  def close(self) -> None:
    if hasattr(self.data_iterator, "close"):
      self.data_iterator.close()  # stops grain's workers
    if self.best_manager is not None:
      self.best_manager.close()


def _headline(workload: Any, entry: dict[str, Any]) -> str:
  if "ci95" in entry:
    return (f"macro AUC {entry['macro_auc']:.4f} (95% CI {entry['ci95'][0]:.4f}-"
            f"{entry['ci95'][1]:.4f})")
  return workload.summary(entry)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restore_step: int | None = None,
                       allow_config_changes: Sequence[str] = ()) -> dict[str, Any]:
  """Fine-tunes (or resumes) in `workdir`; returns the results.json content.

  `restore_step` resumes from that checkpoint instead of the newest intact one;
  `allow_config_changes` names locked config fields this resume may change
  (run_info.FINETUNE_FREE lists the free ones).
  """
  workdir = as_path(workdir)  # a gs:// URL stays a URL (never a local folder 'gs:')
  # Start first: it resolves the config (recipe: pool, low-label rule) as config.json has it.
  start = Start(config)
  if jax.process_index() == 0:  # read-only: refuse a bad resume before anything is written
    run_info.check_resume(workdir, config, allow_config_changes, run_info.FINETUNING)
  return engine.run(FineTuningRun(config, start), workdir, restore_step=restore_step,
                    allow_config_changes=allow_config_changes)


def train_seeds(config: ml_collections.ConfigDict, workdir: str, num_seeds: int,
                **resume_options: Any) -> dict[str, Any]:
  """`--seeds N`: one run per seed in WORKDIR/seed_<s>/ and the aggregate WORKDIR/results.json
  (one seed: the run itself in WORKDIR). `resume_options`: train_and_evaluate's."""
  if num_seeds == 1:
    return train_and_evaluate(config, workdir, **resume_options)
  root = as_path(workdir)  # a gs:// URL stays a URL
  first = int(config.seed)
  per_seed, paths = [], []
  for seed in range(first, first + num_seeds):
    config.seed = seed
    if jax.process_index() == 0:
      print(f"--- seed {seed} ({seed - first + 1}/{num_seeds}) ---", flush=True)
    outcome = train_and_evaluate(config, str(root / f"seed_{seed}"), **resume_options)
    if "stopped_at_step" in outcome:
      return outcome
    per_seed.append(outcome)
    paths.append(f"seed_{seed}/{RESULTS_FILE}")
  config.seed = first
  summary = results.aggregate(per_seed, paths)
  if jax.process_index() == 0:
    results.write_json(root / RESULTS_FILE, summary)
    t = summary["test_at_best_val"]
    metric = summary["metric"]
    print(f"{num_seeds} seeds: test {metric} {t[metric]:.4f} +- {t[metric + '_std']:.4f}"
          f"; wrote {root / RESULTS_FILE}", flush=True)
  return summary


def _test_and_report(run: FineTuningRun, state: steps.TrainState,
                     writer: predictions.PredictionWriter) -> dict[str, Any]:
  """The test split, scored once at the best-on-val parameters and once at the last ones;
  the per-image outputs of val (at best-val) and of both test scorings kept by `writer`."""
  config, ft, workload = run.config, run.ft, run.workload
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  test_ds = data.eval_dataset(config, run.sources["test"], **process)
  best = run.selection.history[run.selection.best_epoch]
  best_params, best_step = checkpoint.restore_best(run.best_manager, ft.abstract_state.params)
  if best_step != best["step"]:
    raise RuntimeError(f"{run.best_manager.directory} holds step {best_step}, but the best val "
                       f"epoch ended at step {best['step']}")
  writer.write("val", "best_val", run.sources["val"],
               predict(ft, best_params, run.val_ds, len(run.sources["val"])))
  entries = {}
  for name, params, step in (("test_at_best_val", best_params, best["step"]),
                             ("test_at_last_epoch", state.params, run.total_steps)):
    outputs = predict(ft, params, test_ds, len(run.sources["test"]))
    writer.write("test", name.removeprefix("test_at_"), run.sources["test"], outputs)
    engine.at_moment("test", step)
    entries[name] = workload.test_entry(step // run.steps_per_epoch, step, run.sources["test"],
                                        outputs, run.classes, config)
  return {
      "format": RESULTS_FORMAT,
      "task": config.task,
      "protocol": workload.protocol,
      "label_fraction": int(config.label_fraction),
      "split_scheme": config.split_scheme,
      "pool": config.model.pool if recipe.is_classification(workload.protocol) else None,
      "init": run.start.init.describe(),
      "metric": workload.metric,
      "classes": run.classes,
      "val_best": {k: best[k] for k in ("epoch", "step", *workload.val_keys())},
      **entries,
      "predictions": writer.listing(),
      "seeds": [int(config.seed)],
      "config": json.loads(config.to_json_best_effort()),
      "split_hashes": data.split_hashes(run.sources),
      "git_commit": results.git_commit(),
      "versions": results.versions(),
      # accelerator_seconds, device_kind, num_devices: from the run's accelerator clock
  }
