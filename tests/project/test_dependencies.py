"""Every third-party import of jaxsam (and launch.py) is declared in pyproject.toml.

A static check, no environment built: each `import X` / `from X import ...` in jaxsam/**/*.py and
launch.py, at module level or inside a function, is mapped to the distribution that provides it
(`IMPORT_TO_DIST`, checked against the installed packages' own metadata), and that distribution
must be in `[project].dependencies`. An import inside a function (loaded only when used) may come
from an optional extra other than `test` instead. A new import that is in neither fails here.
"""

import ast
import functools
import importlib.metadata
import os
import re
import sys
import tomllib

import pytest

from support.paths import ROOT

FIRST_PARTY = {"jaxsam", "configs"}

# Import name -> the distribution (pip name) that provides it, where the two differ or a project
# ships several distributions. Every third-party import of jaxsam must be here.
IMPORT_TO_DIST = {
  "absl": "absl-py",
  "etils": "etils",  # epath, in checkpoint.py (orbax brings it, but jaxsam imports it itself)
  "filelock": "filelock",  # one process per host fetches into the shared weight cache
  "flax": "flax",
  "h5py": "h5py",  # Keras .h5 weights
  "huggingface_hub": "huggingface_hub",  # hf:OWNER/REPO weights
  "jax": "jax",
  "matplotlib": "matplotlib",
  "ml_collections": "ml-collections",
  "numpy": "numpy",
  "optax": "optax",
  "orbax": "orbax-checkpoint",
  "pooch": "pooch",  # weights by name: download, verify, cache
  "PIL": "pillow",  # the image-folder source decodes with PIL
  "requests": "requests",  # pooch's HTTP client, whose errors weights.py tells apart
  "safetensors": "safetensors",
  "sklearn": "scikit-learn",  # the digits dataset of the quickstart
  "tensorflow": "tensorflow-cpu",  # or the `tensorflow` distribution: the same import name
  "tensorflow_datasets": "tensorflow-datasets",
  "torch": "torch",  # the `torch` extra: jaxsam.convert reading .pth files
  "tqdm": "tqdm",
  "wandb": "wandb",
}
# Distributions that provide the same import as the one named above.
ALTERNATIVES = {"tensorflow-cpu": {"tensorflow"}}


def normalize(name: str) -> str:
  """A distribution name as PEP 503 compares them."""
  return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
  """`jax[cuda12]>=0.6; python_version...` -> `jax`."""
  return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)[1])


def third_party_imports(source: str) -> dict[str, bool]:
  """Top-level names of the third-party modules `source` imports -> True if any import of it
  runs at module level (not only inside a function)."""
  out: dict[str, bool] = {}

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      names = []
      if isinstance(child, ast.Import):
        names = [alias.name for alias in child.names]
      elif isinstance(child, ast.ImportFrom) and child.level == 0:
        names = [child.module]
      for name in names:
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
          out[top] = out.get(top, False) or not in_function
      visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

  visit(ast.parse(source), False)
  return out


def project_sources() -> list[str]:
  files = [os.path.join(ROOT, "launch.py")]
  for folder, _, names in os.walk(os.path.join(ROOT, "jaxsam")):
    files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
  return files


def declared() -> tuple[set[str], set[str]]:
  """(the runtime dependencies, the distributions of the optional extras but `test`)."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  runtime = {requirement_name(r) for r in project["dependencies"]}
  extras = {
    requirement_name(r)
    for extra, requirements in project.get("optional-dependencies", {}).items()
    if extra != "test"
    for r in requirements
  }
  return runtime, extras


def test_third_party_imports_finds_module_level_and_lazy_imports():
  source = (
    "import os\nimport numpy as np\nfrom jaxsam import sam\nif True:\n  import yaml\n"
    "def f():\n  from PIL import Image\n  import numpy\nclass C:\n  def g(self):\n"
    "    import torch.nn\n"
  )
  assert third_party_imports(source) == {"numpy": True, "yaml": True, "PIL": False, "torch": False}


def test_every_import_of_jaxsam_is_a_declared_dependency():
  runtime, extras = declared()
  problems = []
  for path in project_sources():
    with open(path) as f:
      imports = third_party_imports(f.read())
    rel = os.path.relpath(path, ROOT)
    for name, module_level in sorted(imports.items()):
      if name not in IMPORT_TO_DIST:
        problems.append(f"{rel}: `{name}` is not in IMPORT_TO_DIST (and pyproject.toml?)")
        continue
      dist = normalize(IMPORT_TO_DIST[name])
      if dist in runtime or (not module_level and dist in extras):
        continue
      where = "at module level" if module_level else "in a function"
      problems.append(f"{rel}: imports `{name}` {where}; {dist} is not in [project].dependencies")
  assert not problems, "\n".join(problems)


@functools.cache
def installed_providers() -> dict[str, list[str]]:
  return importlib.metadata.packages_distributions()  # scans every installed package: once


@pytest.mark.parametrize("name", sorted(IMPORT_TO_DIST))
def test_import_map_agrees_with_installed_metadata(name):
  """The map names the distribution that really provides each import (where it is installed)."""
  providers = installed_providers().get(name)
  if not providers:
    pytest.skip(f"{name} is not installed here")
  dist = normalize(IMPORT_TO_DIST[name])
  assert {normalize(p) for p in providers} & {dist, *ALTERNATIVES.get(dist, ())}, providers
