"""The package's import graph: no cycle anywhere in s4eca_jax or tfds_builders, and
imports between the two go one way only (s4eca_jax -> tfds_builders). Read from the
source with ast, nothing imported; function-level imports count too (none may hide a
cycle)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("s4eca_jax", "tfds_builders")


def _module_name(path: Path, root: Path) -> str:
  parts = path.relative_to(root).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
  """{module: modules of PACKAGES it imports}, from every import statement in it."""
  modules = {_module_name(p, root): p for package in PACKAGES for p in (root / package).rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        # `from pkg import mod` imports pkg.mod when that is a module, else pkg.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names]
      else:
        continue
      edges.update(t for t in targets if t in modules and t != name)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for child in sorted(graph.get(node, ())):
      if state.get(child) == "open":
        return stack[stack.index(child):] + [child]
      if child not in state:
        found = visit(child)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, " -> ".join(cycle)


def test_tfds_builders_never_import_s4eca_jax():
  wrong = {module: sorted(t for t in targets if t.startswith("s4eca_jax"))
           for module, targets in import_graph().items()
           if module.startswith("tfds_builders")}
  assert not any(wrong.values()), wrong


@pytest.mark.parametrize("files, cycle", [
    ({"a.py": "from s4eca_jax import b\n", "b.py": "def f():\n  from s4eca_jax import c\n",
      "c.py": "import s4eca_jax.a\n"}, True),
    ({"a.py": "from s4eca_jax import b\n", "b.py": "import numpy\n", "c.py": ""}, False),
])
def test_the_check_finds_a_cycle_through_a_chain(tmp_path, files, cycle):
  for package in PACKAGES:
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
  for name, text in files.items():
    (tmp_path / "s4eca_jax" / name).write_text(text)
  assert (find_cycle(import_graph(tmp_path)) is not None) == cycle
