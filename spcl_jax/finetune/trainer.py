"""Fine-tuning: `train_and_evaluate(config, workdir)`, readable top to bottom.

  validate config -> encoder init (config.init) -> labelled splits -> mesh, the task's model
  (classifier, or segmenter: `tasks`), LLRD AdamW, sharded state -> resume from WORKDIR's latest
  checkpoint if any -> loop over steps: global batch, step key = fold_in(train key, step), jitted
  step, metrics; every config.val_every_epochs epochs (the low-label rule's, `recipe`) and
  after the last, the task's selection metric on `val` (macro AUC; Dice over the images with a
  pneumothorax), the best-on-val parameters kept in WORKDIR/best, a checkpoint -> at the end: `test` scored once with the best-on-val parameters (and
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
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from spcl_jax import accelerator_time, checkpoint, metrics, run_info, sharding, steps
from spcl_jax.downstream import RESULTS_FILE, RESULTS_FORMAT, TASK_DATASETS
from spcl_jax.finetune import data, recipe, results
from spcl_jax.finetune.configuration import validate_finetune_config
from spcl_jax.finetune.initialization import encoder_for_classifier, load_init
from spcl_jax.finetune.steps import FineTuning, build_finetuning
from spcl_jax.models.vit import variant_dims
from spcl_jax.preemption import StopRequest
from spcl_jax.train import NonFiniteLossError
from spcl_jax.workdir_path import as_path, check_store_client

SELECTION_FILE = "selection.json"


def _keys(seed: int) -> dict[str, jax.Array]:
  root = jax.random.key(seed)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "train"))}


def finetune_flops_per_image(config: ml_collections.ConfigDict) -> float:
  """Forward + backward (3x forward) of one whole image: patch embedding and blocks."""
  dims = variant_dims(config.model.variant)
  p, width = dims["patch_size"], dims["width"]
  n = (config.model.image_size // p) ** 2
  embed = 2 * n * p * p * config.model.channels * width
  return 3.0 * (embed + metrics.encoder_forward_flops(n + 1, width, dims["depth"],
                                                      dims["mlp_dim"]))


def predict(ft: FineTuning, params: Any, dataset: Any, num_images: int) -> np.ndarray:
  """The task's per-image outputs of an eval dataset, in split order, the padding dropped.

  Classification: logits (num_images, K); the labels are the source's own targets (same
  order). Segmentation: |T&P|, |T|, |P| per image (num_images, 3), against the batch's masks.
  The step returns its outputs replicated, so every process holds all of them.
  """
  kept = []
  for i in range(len(dataset)):
    batch = data.as_batch(dataset[i])
    images = steps.global_batch(batch["image"], ft.mesh, ft.config)
    outputs = np.asarray(jax.device_get(ft.eval_step(params, images)), np.float32)
    kept.append(ft.task.host_outputs(batch, outputs))
  return np.concatenate(kept)[:num_images]


def write_classifier_info(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                          classes: list[str], init: dict[str, Any]) -> None:
  """config.json as pre-training writes it, plus what export needs for the head."""
  run_info.write_run_info(workdir, config)
  path = workdir / run_info.FILENAME
  info = json.loads(path.read_text())
  if recipe.is_classification(config.protocol):
    info["classifier"] = {"task": config.task, "protocol": config.protocol,
                          "pool": config.model.pool,
                          "num_classes": len(classes), "classes": list(classes),
                          "init": init}
  else:
    info["segmenter"] = {"task": config.task, "protocol": config.protocol,
                         "classes": list(classes), "init": init}
  results.write_json(path, info)


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes (or resumes) in `workdir`; returns the results.json content."""
  workdir = as_path(workdir)  # a gs:// URL stays a URL (never a local folder 'gs:')
  check_store_client(workdir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config)
  validate_finetune_config(config, num_batch_shards=sharding.num_batch_shards(config, mesh),
                           process_count=jax.process_count())
  init = load_init(config.init, config.init_step, config.model.image_size)
  if init.normalization is not None and init.normalization != (config.data.mean,
                                                               config.data.std):
    config.data.mean, config.data.std = init.normalization
    if is_main:
      print(f"normalisation mean {config.data.mean:.4g}, std {config.data.std:.4g}: the "
            "pre-training run's (WORKDIR/config.json)", flush=True)
  sources = data.split_sources(config)
  dataset = sources["train"].folder.dataset
  if dataset != TASK_DATASETS[config.task]:
    raise ValueError(f"config.data.prepared={config.data.prepared!r} holds {dataset}, but "
                     f"config.task={config.task!r} reads {TASK_DATASETS[config.task]}")
  classes = list(sources["train"].label_names)
  # pool 'auto', protocol 'linear' and the low-label rule: the resolved values go to config.json
  schedule, changes = recipe.resolve(
      config, init_kind=init.kind, num_train=len(sources["train"]),
      num_val=len(sources["val"]),
      batch_multiple=math.lcm(sharding.num_batch_shards(config, mesh), jax.process_count()))
  steps_per_epoch, total_steps = schedule.steps_per_epoch, schedule.total_steps
  train_positives = results.positives_per_class(sources["train"].targets, classes)
  if is_main:
    for line in changes:
      print(line, flush=True)
    warning = results.missing_positives_warning(train_positives, config.label_fraction)
    if warning:
      print(warning, flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    write_classifier_info(workdir, config, classes, init.describe())
    print(f"{config.task}: {len(classes)} classes; train {len(sources['train'])} images "
          f"({config.label_fraction}%), val {len(sources['val'])}, test "
          f"{len(sources['test'])}; {steps_per_epoch} steps/epoch x {config.epochs} epochs; "
          f"init {init.kind} {init.path or ''}; {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}; workdir {workdir}",
          flush=True)
  # devices x wall time over every session of this workdir (WORKDIR/accelerator_time.json)
  clock = accelerator_time.AcceleratorClock.for_this_job(workdir)

  ft = build_finetuning(config, mesh, len(classes), steps_per_epoch)
  keys = _keys(config.seed)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = iter(data.train_dataset(config, sources["train"], **process))
  val_ds = data.eval_dataset(config, sources["val"], **process)

  manager = checkpoint.make_manager(workdir, max_to_keep=config.max_checkpoints_to_keep)
  best_manager = checkpoint.make_manager(workdir / "best", max_to_keep=1)
  task = ft.task
  selection = Selection(workdir / SELECTION_FILE, task.metric)
  last_checkpoint = manager.latest_step()
  if last_checkpoint is not None:
    params, opt_state, step = checkpoint.restore(
        manager, last_checkpoint, ft.abstract_state.params, ft.abstract_state.opt_state,
        train_iter)
    state = steps.TrainState(step=jax.device_put(np.int32(step), ft.shardings.step),
                             params=params, opt_state=opt_state)
    if is_main:
      print(f"resumed from {checkpoint.checkpoint_dir(workdir)} at step {step}", flush=True)
  else:
    encoder = None
    if init.encoder_params is not None:
      encoder = encoder_for_classifier(init.encoder_params, ft.abstract_state.params["encoder"],
                                       f"config.init={config.init!r}")
    state = ft.init_state(keys["init"], encoder)
  start_step = int(jax.device_get(state.step))
  if start_step >= total_steps and (workdir / RESULTS_FILE).is_file():
    manager.close()
    best_manager.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
    if is_main:
      print(f"nothing to do: {workdir} finished all {config.epochs} epochs; its results are "
            f"in {workdir / RESULTS_FILE}", flush=True)
    return json.loads((workdir / RESULTS_FILE).read_text())
  selection.keep_until(start_step // steps_per_epoch)
  for stale in [s for s in best_manager.all_steps() if s > start_step]:
    best_manager.delete(stale)  # saved after the checkpoint we resumed from: redone below

  writer = metrics.MetricsWriter(workdir, total_steps=total_steps, enabled=is_main)
  peak = metrics.peak_flops_per_device(config, jax.devices()[0])
  flops_per_image = finetune_flops_per_image(config)
  last_log: list[tuple[int, float]] = []

  def record_train(step: int, device_metrics: dict[str, jax.Array]) -> None:
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    for key in ("loss", "grad_norm"):
      if not np.isfinite(values[key]):
        raise NonFiniteLossError(f"{key} is {values[key]} at step {step}: stopping (last "
                                 f"checkpoint: step {manager.latest_step()}); lower "
                                 "config.optim.base_learning_rate")
    if step % config.log_every_steps == 0 or step == 1 or step == total_steps:
      now = time.perf_counter()
      if last_log and step > last_log[0][0]:
        rate = (step - last_log[0][0]) * config.batch_size / (now - last_log[0][1])
        values["images_per_sec"] = rate
        values["tflops_per_sec"] = rate * flops_per_image / 1e12
        values["mfu"] = (rate * flops_per_image / (peak * jax.device_count()) if peak
                         else None)
      last_log[:] = [(step, now)]
      values["epoch"] = step / steps_per_epoch
      clock.update()
      writer.write(step, values)
      writer.progress(step, values)

  def evaluate_val(step: int) -> None:
    epoch = step // steps_per_epoch
    outputs = predict(ft, state.params, val_ds, len(sources["val"]))
    scored = task.score(sources["val"], outputs, classes, f"the val split (epoch {epoch})")
    selection.history[epoch] = {"epoch": epoch, "step": step, **scored}
    if selection.best_epoch == epoch:
      for old in best_manager.all_steps():
        best_manager.delete(old)
      best_manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params),
          meta=ocp.args.JsonSave({"step": step, "epoch": epoch,
                                  "layout_version": checkpoint.LAYOUT_VERSION})), force=True)
      best_manager.wait_until_finished()
    if is_main:
      selection.save()
    best = selection.history[selection.best_epoch]
    writer.write(step, {**task.scalars(scored), "epoch": epoch})
    if is_main:
      print(f"epoch {epoch}/{config.epochs} | val {task.summary(scored)} | best {task.metric} "
            f"{best[task.metric]:.4f} (epoch {best['epoch']})", flush=True)

  stopped = False
  try:
    pending = None
    with StopRequest(agree_every=config.log_every_steps) as stop:
      for step in range(start_step + 1, total_steps + 1):
        batch = data.as_batch(next(train_iter))
        images = steps.global_batch(batch["image"], mesh, config)
        labels = steps.global_batch(batch[task.target], mesh, config)
        state, step_metrics = ft.train_step(state, images, labels,
                                            jax.random.fold_in(keys["train"], step - 1))
        if pending is not None:
          record_train(*pending)
        pending = (step, step_metrics)
        # val (and a checkpoint) every val_every_epochs epochs and after the last (recipe.py)
        val_due = step % steps_per_epoch == 0 and (
            step // steps_per_epoch % config.val_every_epochs == 0 or step == total_steps)
        stopping = stop.should_stop(step)
        if val_due or stopping or step % config.checkpoint_every_steps == 0:
          record_train(*pending)  # never checkpoint a state whose loss was not checked
          pending = None
          if val_due:
            evaluate_val(step)
          checkpoint.save(manager, step, state.params, state.opt_state, train_iter)
        if stopping:
          stopped = True
          if is_main:
            print(f"stopped at step {step}; checkpoint saved, rerun the same command to "
                  "resume", flush=True)
          break
      if pending is not None:
        record_train(*pending)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  clock.update()
  if stopped:
    best_manager.close()
    return {"stopped_at_step": int(jax.device_get(state.step))}

  try:
    summary = _test_and_report(ft, config, state, sources, classes, selection, best_manager,
                               init, total_steps, steps_per_epoch)
  finally:
    best_manager.close()
  summary["train_positives"] = train_positives
  summary.update({k: clock.update()[k] for k in ("accelerator_seconds", "device_kind",
                                                  "num_devices")})
  if is_main:
    results.write_json(workdir / RESULTS_FILE, summary)
    t = summary["test_at_best_val"]
    if "ci95" in t:
      line = (f"macro AUC {t['macro_auc']:.4f} (95% CI {t['ci95'][0]:.4f}-{t['ci95'][1]:.4f})")
    else:
      line = task.summary(t)
    print(f"test {line} at the best val epoch {t['epoch']}; wrote {workdir / RESULTS_FILE}",
          flush=True)
  return summary


def train_seeds(config: ml_collections.ConfigDict, workdir: str,
                num_seeds: int) -> dict[str, Any]:
  """`--seeds N`: one run per seed in WORKDIR/seed_<s>/ and the aggregate WORKDIR/results.json
  (one seed: the run itself in WORKDIR)."""
  if num_seeds == 1:
    return train_and_evaluate(config, workdir)
  root = as_path(workdir)  # a gs:// URL stays a URL
  first = int(config.seed)
  per_seed, paths = [], []
  for seed in range(first, first + num_seeds):
    config.seed = seed
    if jax.process_index() == 0:
      print(f"--- seed {seed} ({seed - first + 1}/{num_seeds}) ---", flush=True)
    outcome = train_and_evaluate(config, str(root / f"seed_{seed}"))
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


def _restore_best(best_manager, abstract_params) -> tuple[Any, int]:
  step = best_manager.latest_step()
  restored = best_manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params)))
  return restored["params"], step


def _test_and_report(ft, config, state, sources, classes, selection, best_manager, init,
                     total_steps, steps_per_epoch) -> dict[str, Any]:
  """The test split, scored once at the best-on-val parameters and once at the last ones."""
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  test_ds = data.eval_dataset(config, sources["test"], **process)
  best = selection.history[selection.best_epoch]
  best_params, best_step = _restore_best(best_manager, ft.abstract_state.params)
  if best_step != best["step"]:
    raise RuntimeError(f"{best_manager.directory} holds step {best_step}, but the best val "
                       f"epoch ended at step {best['step']}")
  task = ft.task
  n_test = len(sources["test"])
  entries = {}
  for name, params, step in (("test_at_best_val", best_params, best["step"]),
                             ("test_at_last_epoch", state.params, total_steps)):
    outputs = predict(ft, params, test_ds, n_test)
    entries[name] = task.test_entry(step // steps_per_epoch, step, sources["test"], outputs,
                                    classes, config)
  return {
      "format": RESULTS_FORMAT,
      "task": config.task,
      "protocol": task.protocol,
      "label_fraction": int(config.label_fraction),
      "split_scheme": config.split_scheme,
      "pool": config.model.pool if recipe.is_classification(task.protocol) else None,
      "init": init.describe(),
      "metric": task.metric,
      "classes": classes,
      "val_best": {k: best[k] for k in ("epoch", "step", *task.val_keys())},
      **entries,
      "seeds": [int(config.seed)],
      "config": json.loads(config.to_json_best_effort()),
      "split_hashes": data.split_hashes(sources),
      "git_commit": results.git_commit(),
      "versions": results.versions(),
      # accelerator_seconds, device_kind, num_devices: from the run's accelerator clock
  }
