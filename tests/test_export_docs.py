"""The export page's promise (docs/export.md): one command, then its two lines of Python give the JAX features."""

import pathlib
import re

import torch

from export_fixtures import (TOLERANCE, jax_cls_features, make_config, make_workdir,
                             max_abs_diff, sample_images, torch_input)
from spcl_jax.export.__main__ import main

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "export.md"


def test_documented_snippet_rebuilds_the_model(tmp_path, monkeypatch):
  workdir, params = make_workdir(tmp_path / "workdir", "pico/16", 64)
  text = DOC.read_text()
  command = re.search(r"```bash\n(python -m spcl_jax\.export [^\n]*--format timm[^\n]*)\n",
                      text).group(1)
  args = command.replace("WORKDIR", str(workdir)).split()[3:]  # after 'python -m spcl_jax.export'
  monkeypatch.chdir(tmp_path)
  assert main(args) == 0
  snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  namespace = {}
  exec(snippet, namespace)  # pylint: disable=exec-used
  model = namespace["model"].eval()
  config = make_config("pico/16", 64)
  _, images = sample_images(64, 2)
  with torch.no_grad():
    features = model(torch_input(images, 1, config.data.mean, config.data.std)).numpy()
  reference = jax_cls_features("pico/16", 64, params, images)
  assert max_abs_diff(features, reference) <= TOLERANCE
