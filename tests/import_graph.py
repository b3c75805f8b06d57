"""The import graph of spcl_jax: which module imports which, its circles and its layers.

  python tests/import_graph.py          # prints layers, circles and the longest chain

Every `import` counts, also those inside functions (a lazy import still ties the two modules
together). A module's layer is the length of the longest chain of imports below it (a module
that imports nothing of spcl_jax is layer 0); the graph's layer count is the top layer + 1.
Modules on a circle share one layer (their strongly connected component).
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = "spcl_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def module_names(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file of the package."""
  names = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    names[".".join(parts)] = path
  return names


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
  """The dotted names one import statement names (not yet resolved to modules)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if not isinstance(node, ast.ImportFrom):
    return []
  if node.level:
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    stem = ".".join(base + ([node.module] if node.module else []))
  else:
    stem = node.module or ""
  return [stem] + [f"{stem}.{alias.name}" for alias in node.names]


def edges(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
  """Module -> the package's modules it imports (the deepest existing name of each import)."""
  names = module_names(root)
  graph = {name: set() for name in names}
  for name, path in names.items():
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
      for target in _imported(node, name, path.name == "__init__.py"):
        while target and target not in names:
          target = target.rpartition(".")[0]
        if target.startswith(PACKAGE + ".") and target != name:
          graph[name].add(target)
  return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for child in sorted(graph[node]):
      if child not in index:
        visit(child)
        low[node] = min(low[node], low[child])
      elif child in on_stack:
        low[node] = min(low[node], index[child])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
  for node in sorted(graph):
    if node not in index:
      visit(node)
  return sorted(found)


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
  """Module -> the length of the longest import chain below it (circles collapsed to one node)."""
  component = {node: node for node in graph}
  for members in circles(graph):
    for member in members:
      component[member] = members[0]
  below: dict[str, set[str]] = {}
  for node, children in graph.items():
    below.setdefault(component[node], set()).update(
        component[c] for c in children if component[c] != component[node])
  depth: dict[str, int] = {}

  def layer(node: str) -> int:
    if node not in depth:
      depth[node] = 1 + max((layer(c) for c in below[node]), default=-1)
    return depth[node]

  return {node: layer(component[node]) for node in graph}


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
  """One import chain from a top-layer module down to layer 0."""
  depth = layers(graph)
  node = max(sorted(depth), key=depth.get)
  chain = [node]
  while depth[node] > 0:
    peers = [m for m in sorted(graph) if depth[m] == depth[node] and
             (m == node or any(node in members and m in members for members in circles(graph)))]
    node = next(c for m in peers for c in sorted(graph[m]) if depth[c] == depth[node] - 1)
    chain.append(node)
  return chain


def main() -> None:
  graph = edges()
  depth = layers(graph)
  found = circles(graph)
  print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, "
        f"{max(depth.values()) + 1} layers, {len(found)} circles")
  for members in found:
    print("circle: " + " <-> ".join(members))
  print("longest chain: " + " -> ".join(longest_chain(graph)))


if __name__ == "__main__":
  main()
