"""The fine-tuning benchmark and the command line's one-line errors (in-process)."""

import pytest

from spcl_jax.bench import finetune as bench_finetune


@pytest.mark.slow
def test_bench_finetune_prints_images_per_second(capsys, monkeypatch):
  args = ["--config=configs/finetune/rsna.py", "--config.model.variant=pico/16",
          "--config.model.image_size=32", "--config.batch_size=8", "--config.model.dtype=float32",
          "--steps=2", "--warmup_steps=0", "--classes=1"]
  # ml_collections finds the --config.x overrides in sys.argv, as a real command line has them.
  monkeypatch.setattr("sys.argv", ["python -m spcl_jax.bench", "finetune", *args])
  assert bench_finetune.main(args) == 0
  out = capsys.readouterr().out
  assert "compile + first step" in out and "images/s" in out and "1 classes" in out


def test_config_errors_name_the_field(tmp_path):
  from spcl_jax.configs.finetune import chexpert
  from spcl_jax.configuration import ConfigError
  from spcl_jax.finetune.configuration import validate_finetune_config
  for field, value, message in (("label_fraction", 5, "config.label_fraction=5"),
                                ("split_scheme", "mine", "config.split_scheme='mine'"),
                                ("chexpert_policy", "u-ones", "config.chexpert_policy")):
    config = chexpert.get_config()
    config[field] = value
    with pytest.raises(ConfigError, match=message):
      validate_finetune_config(config)
  config = chexpert.get_config()
  config.model.pool = "max"
  with pytest.raises(ConfigError, match="config.model.pool='max'"):
    validate_finetune_config(config)
  from spcl_jax.finetune.initialization import load_init
  with pytest.raises(FileNotFoundError, match="config.init="):
    load_init(str(tmp_path / "missing"))


@pytest.mark.parametrize("task", ["nih14", "chexpert", "rsna", "custom"])
def test_shipped_finetune_configs_validate_with_the_recipe(task):
  import importlib
  from spcl_jax.finetune.configuration import validate_finetune_config
  module = importlib.import_module(f"spcl_jax.configs.finetune.{task}")
  config = module.get_config()
  validate_finetune_config(config, num_batch_shards=8)
  assert (config.optim.layer_decay, config.optim.base_learning_rate, config.epochs,
          config.optim.warmup_epochs, config.model.drop_path_rate, config.model.pool,
          config.model.image_size) == (0.55, 2.5e-4, 75, 5, 0.2, "auto", 224)
  assert module.get_config("512").model.image_size == 512
  with pytest.raises(ValueError, match="preset"):
    module.get_config("384")


@pytest.mark.slow
def test_command_line_errors_are_one_line_with_the_usage_exit_code(tmp_path):
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(
      [sys.executable, "-m", "spcl_jax.finetune", "--config=configs/finetune/rsna.py",
       f"--workdir={tmp_path / 'f'}", "--config.label_fraction=5"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "config.label_fraction=5" in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "f").exists()
