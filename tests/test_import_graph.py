"""The import graph of spcl_jax has no circle and no import back up a layer (docs/architecture.md).

`tests/import_graph.py` computes the graph from the source; these tests also check that tool on
small graphs with a known answer.
"""

import pytest

import import_graph

GRAPH = import_graph.edges()

# (importer prefix, prefixes it must not import). Prefixes match a module and its submodules.
UPWARD = [
    ("spcl_jax.errors", ("spcl_jax.",)),
    ("spcl_jax.workdir_path", ("spcl_jax.",)),
    ("spcl_jax.cli_errors", ("spcl_jax.configuration", "spcl_jax.models", "spcl_jax.data")),
    ("spcl_jax.atomic_file", ("spcl_jax.cli_errors", "spcl_jax.configuration")),
    ("spcl_jax.data", ("spcl_jax.models", "spcl_jax.steps", "spcl_jax.train", "spcl_jax.finetune",
                       "spcl_jax.evaluators", "spcl_jax.export", "spcl_jax.report",
                       "spcl_jax.configuration", "spcl_jax.metrics", "spcl_jax.run_info")),
    ("spcl_jax.models", ("spcl_jax.data", "spcl_jax.steps", "spcl_jax.train", "spcl_jax.finetune",
                         "spcl_jax.evaluators", "spcl_jax.export", "spcl_jax.report")),
    ("spcl_jax.masking", ("spcl_jax.",)),
    ("spcl_jax.losses", ("spcl_jax.",)),
    ("spcl_jax.evaluators", ("spcl_jax.train", "spcl_jax.finetune", "spcl_jax.report")),
    ("spcl_jax.export", ("spcl_jax.train", "spcl_jax.finetune", "spcl_jax.steps")),
    ("spcl_jax.report", ("spcl_jax.train", "spcl_jax.finetune.trainer", "spcl_jax.steps")),
]


def _matches(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix if prefix.endswith(".") else prefix + ".")


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for child in graph[todo.pop()] - seen:
      seen.add(child)
      todo.append(child)
  return seen


def test_no_import_circle():
  assert import_graph.circles(GRAPH) == []


@pytest.mark.parametrize("importer, forbidden", UPWARD)
def test_no_import_back_up(importer, forbidden):
  wrong = sorted(f"{module} -> {target}" for module, targets in GRAPH.items()
                 if _matches(module, importer) for target in targets
                 if any(_matches(target, prefix) for prefix in forbidden))
  assert not wrong, wrong


def test_the_report_reads_numbers_and_never_imports_the_model():
  report = [m for m in GRAPH if _matches(m, "spcl_jax.report")]
  below = set().union(*(_reachable(GRAPH, m) for m in report))
  assert not {m for m in below if _matches(m, "spcl_jax.models") or m == "spcl_jax.metrics"}


def test_the_tool_finds_circles_and_layers():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"b", "d"}, "d": set(), "e": {"a"}}
  assert import_graph.circles(graph) == [["b", "c"]]
  assert import_graph.layers(graph) == {"d": 0, "b": 1, "c": 1, "a": 2, "e": 3}
  assert import_graph.longest_chain(graph) == ["e", "a", "b", "d"]


def test_the_tool_reads_relative_lazy_and_from_imports(tmp_path):
  package = tmp_path / "spcl_jax"
  (package / "sub").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "base.py").write_text("")
  (package / "sub" / "__init__.py").write_text("from . import leaf\n")
  (package / "sub" / "leaf.py").write_text("def f():\n  from spcl_jax import base\n")
  (package / "top.py").write_text("from spcl_jax.sub import leaf\nimport spcl_jax.base\n")
  graph = import_graph.edges(tmp_path)
  assert graph["spcl_jax.sub"] == {"spcl_jax.sub.leaf"}
  assert graph["spcl_jax.sub.leaf"] == {"spcl_jax.base"}
  assert graph["spcl_jax.top"] == {"spcl_jax.sub", "spcl_jax.sub.leaf", "spcl_jax.base"}
