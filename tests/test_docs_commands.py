"""Every `python -m spcl_jax...` command in README.md and docs/*.md names a real module, flags
that module defines and config fields its config file has, so a command copied from the
documentation fails only on the user's own paths.

Flags are read from the command's source (argparse `add_argument("--x")`, absl `DEFINE_*("x")`),
not by running it: importing every command would start jax many times over.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"```(?:bash|sh)?\n(.*?)```", re.S)
_INLINE = re.compile(r"`((?:\.venv/bin/)?python -m spcl_jax(?:\.\w+)*(?=[ `])[^`]*)`")
_ARGPARSE = re.compile(r"add_argument\(\s*\"(--[\w-]+)\"")
_ABSL = re.compile(r"DEFINE_(\w+)\(\s*\"(\w+)\"")
_HELPER_CALL = re.compile(r"\.((?:define|add)_\w+_(?:flags|arguments))\(")
_ABSL_BUILT_IN = {"--help", "--helpfull", "--helpshort", "--flagfile"}


def commands_in(text: str) -> list[str]:
  """The spcl_jax commands of a page: fenced shell blocks (continuations joined) and inline code."""
  found = []
  for block in _FENCE.findall(text):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()
      if re.match(r"(\.venv/bin/)?python -m spcl_jax", line):
        found.append(line)
  found += _INLINE.findall(text)
  return found


def documented_commands() -> list[tuple[str, str]]:
  return [(page.relative_to(ROOT).as_posix(), command)
          for page in PAGES for command in commands_in(page.read_text())]


def _source_files(module: str, args: list[str]) -> list[pathlib.Path]:
  """The files whose flags the command accepts: its entry module (and a bench subcommand's)."""
  try:
    spec = importlib.util.find_spec(module)
  except ModuleNotFoundError:
    spec = None
  assert spec is not None and spec.origin, f"no module {module}"
  path = pathlib.Path(spec.origin)
  if path.name == "__init__.py":
    path = path.with_name("__main__.py")
    assert path.exists(), f"{module} is a package without __main__.py"
  files = [path, *_flag_helpers(path)]
  if module == "spcl_jax.bench":
    benchmarks = importlib.import_module("spcl_jax.bench.__main__").BENCHMARKS
    assert args and args[0] in benchmarks, f"bench has no benchmark {args[:1]}"
    files.append(pathlib.Path(importlib.util.find_spec(benchmarks[args[0]]).origin))
  return files


def _flag_helpers(entry: pathlib.Path) -> list[pathlib.Path]:
  """The files defining the shared flag helpers an entry module calls
  (`command_line.define_training_run_flags`, `inference.add_source_arguments`)."""
  called = set(_HELPER_CALL.findall(entry.read_text()))
  return [path for path in sorted((ROOT / "spcl_jax").rglob("*.py"))
          if any(f"def {name}(" in path.read_text() for name in called)]


def defined_flags(files: list[pathlib.Path]) -> tuple[set[str], bool]:
  """(flag names, whether it takes --config.FIELD overrides)."""
  names, has_config = set(), False
  for path in files:
    source = path.read_text()
    names.update(_ARGPARSE.findall(source))
    for kind, name in _ABSL.findall(source):
      names.add(f"--{name}")
      names.update(_ABSL_BUILT_IN)
      if kind == "bool":
        names.add(f"--no{name}")
      has_config |= kind == "config_file" and name == "config"
  return names, has_config


def _config(spec: str):
  """The ConfigDict `--config=FILE[:ARG]` loads (the repository's configs/ files)."""
  file, _, argument = spec.partition(":")
  module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
  return module.get_config(argument) if argument else module.get_config()


def _has_field(config, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def check_command(command: str) -> None:
  words = [w.strip("[]|") for w in shlex.split(command)]
  words = [w for w in words if w and w != "..."]
  module = words[words.index("-m") + 1]
  args = words[words.index("-m") + 2:]
  names, has_config = defined_flags(_source_files(module, args))
  flags = {a.split("=")[0]: a.partition("=")[2] for a in args if a.startswith("--")}
  config_file = flags.get("--config", "")
  config = _config(config_file) if config_file and "$" not in config_file else None
  for flag in flags:
    if flag.startswith("--config."):
      field = flag[len("--config."):]
      if module == "spcl_jax.evaluate":  # evaluate takes --config.evals.NAME.FIELD (a new NAME adds one)
        assert field.startswith("evals."), f"{command}: evaluate changes only config.evals"
      else:
        assert has_config, f"{command}: {module} takes no --config"
        if config is not None:
          assert _has_field(config, field), f"{command}: {config_file} has no field {field}"
    else:
      assert flag in names, f"{command}: {module} has no flag {flag}"


def test_every_documented_command_names_real_modules_flags_and_fields():
  commands = documented_commands()
  pages = {page for page, _ in commands}
  assert {"README.md", "docs/datasets.md", "docs/finetuning.md", "docs/export.md"} <= pages
  failures = []
  for page, command in commands:
    try:
      check_command(command)
    except AssertionError as e:
      failures.append(f"{page}: {e}")
  assert not failures, "\n".join(failures)


@pytest.mark.parametrize("command, wrong", [
    ("python -m spcl_jax.nosuch --x 1", "no module"),
    ("python -m spcl_jax.export --workdir W --format timm --out a --nosuch", "no flag --nosuch"),
    ("python -m spcl_jax.main --config=configs/vitb512.py --workdir=W --config.spcl.nosuch=1",
     "no field spcl.nosuch"),
    ("python -m spcl_jax.bench nosuch", "no benchmark"),
])
def test_a_wrong_command_is_caught(command, wrong):
  with pytest.raises(AssertionError, match=wrong):
    check_command(command)


def test_commands_are_found_in_fences_with_continuations_and_inline():
  text = ("```bash\npython -m spcl_jax.main --config=c.py \\\n    --workdir=w  # note\n```\n"
          "and `python -m spcl_jax.export --out x`.")
  assert commands_in(text) == ["python -m spcl_jax.main --config=c.py      --workdir=w",
                               "python -m spcl_jax.export --out x"]


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
  """GitHub's id of a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def broken_links(page: pathlib.Path) -> list[str]:
  """Relative links of `page` whose file, or whose #anchor in that file, does not exist."""
  broken = []
  for target in _LINK.findall(page.read_text()):
    if re.match(r"[a-z]+://|mailto:", target):
      continue
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    if not linked.exists():
      broken.append(target)
    elif anchor and linked.suffix == ".md":
      headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
      if anchor not in {github_anchor(h) for h in headings}:
        broken.append(target)
  return broken


def test_every_relative_link_and_anchor_in_the_documentation_resolves():
  pages = [*PAGES, ROOT / "tests" / "README.md"]
  broken = {page.relative_to(ROOT).as_posix(): links for page in pages
            if (links := broken_links(page))}
  assert not broken, broken


def test_the_anchor_rule_is_github_s():
  assert github_anchor("Workdirs on Cloud Storage (`--workdir=gs://bucket/runs/x`)") == (
      "workdirs-on-cloud-storage---workdirgsbucketrunsx")
  assert github_anchor("Figure 3: t-SNE (`spcl_jax.tsne`)") == "figure-3-t-sne-spcl_jaxtsne"
