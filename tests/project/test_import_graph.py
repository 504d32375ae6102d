"""The package's import graph, read from the source: who may import the loop, and no cycle
anywhere (the run-folder, set-up and loop modules checked by name too)."""

import ast
import os

from support.paths import ROOT

PACKAGE = os.path.join(ROOT, "jaxsam")


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[name.removesuffix(".__init__")] = path
  return found


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """The package's modules that `name` imports anywhere in its file (lazy imports included)."""
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  out = set()
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for a in node.names:
        full = f"{base}.{a.name}"
        out.add(full if full in modules else base)
  return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
  seen, todo = set(), list(graph[start])
  while todo:
    m = todo.pop()
    if m == goal:
      return True
    if m not in seen:
      seen.add(m)
      todo.extend(graph[m])
  return False


def test_the_graph_reader_sees_real_edges():
  graph = _graph()
  assert {"jaxsam.run_setup", "jaxsam.evaluate", "jaxsam.checkpoint"} <= graph["jaxsam.train"]
  assert "jaxsam.writers" in graph["jaxsam.workdir"]
  assert _reaches(graph, "jaxsam.analyze", "jaxsam.workdir")


def test_no_module_of_the_package_imports_the_training_loop():
  """Eval, analysis, benches and reports take what they share with training from run_setup,
  evaluate and workdir; only launch.py (and tests) import jaxsam.train."""
  graph = _graph()
  assert sorted(m for m, deps in graph.items() if "jaxsam.train" in deps) == []


def test_no_cycle_through_the_run_folder_setup_and_loop_modules():
  graph = _graph()
  owned = ("workdir", "writers", "checkpoint", "run_setup", "train", "evaluate", "profiling")
  for name in (f"jaxsam.{m}" for m in owned):
    assert not _reaches(graph, name, name), f"{name} imports itself through a cycle"


def _cycles(graph: dict[str, set[str]]) -> list[str]:
  """Every module that reaches itself, with one path back to it ('a -> b -> a')."""
  found = []
  for start in sorted(graph):
    paths, todo = {start: [start]}, [start]
    while todo:
      m = todo.pop()
      for dep in sorted(graph[m]):
        if dep == start:
          found.append(" -> ".join(paths[m] + [start]))
          todo = []
          break
        if dep not in paths:
          paths[dep] = paths[m] + [dep]
          todo.append(dep)
  return found


def test_the_cycle_finder_finds_a_cycle_and_its_path():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == ["a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"]


def test_no_module_of_the_package_reaches_itself():
  """The whole import graph, lazy imports included, is acyclic: each module can be read, tested
  and imported below the ones that use it."""
  assert _cycles(_graph()) == []


def test_weight_files_sit_below_both_importers_and_the_registry_imports_neither():
  graph = _graph()
  assert "jaxsam.models.weight_files" in graph["jaxsam.models.pretrained"]
  assert "jaxsam.models.weight_files" in graph["jaxsam.models.vit_import"]
  assert not {"jaxsam.models.pretrained", "jaxsam.models.vit_import"} & graph["jaxsam.models"]
