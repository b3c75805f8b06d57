"""The fast tier (`pytest -m "not slow"`, tests/README.md) keeps every test file: each has at
least one test that is not marked slow, so the inner loop touches every module's tests."""

import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent


def _is_slow_mark(node: ast.expr) -> bool:
  """pytest.mark.slow, or a list/tuple holding it (pytestmark = [pytest.mark.slow, ...])."""
  if isinstance(node, (ast.List, ast.Tuple)):
    return any(_is_slow_mark(e) for e in node.elts)
  return isinstance(node, ast.Attribute) and node.attr == "slow"


def fast_tests(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text(), str(path))
  for statement in tree.body:
    if (isinstance(statement, ast.Assign) and _is_slow_mark(statement.value)
        and any(getattr(t, "id", "") == "pytestmark" for t in statement.targets)):
      return []
  return [f.name for f in tree.body
          if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")
          and not any(_is_slow_mark(d) for d in f.decorator_list)]


def test_every_test_file_has_a_fast_test():
  files = sorted(TESTS.glob("test_*.py"))
  assert len(files) > 50
  assert [p.name for p in files if not fast_tests(p)] == []


def test_the_check_sees_module_and_function_marks(tmp_path):
  module = tmp_path / "test_m.py"
  module.write_text("import pytest\npytestmark = [pytest.mark.slow]\ndef test_a(): pass\n")
  assert fast_tests(module) == []
  module.write_text("import pytest\n@pytest.mark.slow\ndef test_a(): pass\ndef test_b(): pass\n")
  assert fast_tests(module) == ["test_b"]
