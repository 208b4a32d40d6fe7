"""The package's import structure: layers, no cycles, no private names across modules.

Every module of ``jasp`` is parsed with ``ast`` (function-level imports
included) and the graph of imports between jasp's own modules is checked:

* it has no cycle;
* each module imports only from its own layer or the layers below it
  (:data:`LAYERS`, lowest first);
* jasp-internal imports sit at module top level, except the few listed in
  :data:`DEFERRED_IMPORTS` with the reason;
* no module imports a ``_private`` name of another jasp module (private
  *modules* such as ``jasp.export._onnx`` are fine; their public names are
  what their package re-exports);
* ``from jasp.X import *`` works for every package and every name in every
  ``__all__`` exists.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jasp"

#: Foundation modules: they import no other jasp module (besides ``jasp.typing``).
FOUNDATIONS = (
  "jasp.typing",
  "jasp._deprecation",
  "jasp._version",
  "jasp._tree",
  "jasp._shapes",
  "jasp._jaxpr",
  "jasp._nm_core",
)

#: The intended layering, lowest first. A module may import modules of its own
#: layer or of a lower one. Patterns are ``fnmatch`` globs on dotted names.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
  (
    "foundations: types, deprecations, pytree paths, shapes, jaxpr walking, N:M group math",
    FOUNDATIONS,
  ),
  ("kernels: the Pallas mask kernels", ("jasp.kernels", "jasp.kernels.*")),
  ("dispatch: Pallas or XLA for one array", ("jasp._dispatch",)),
  ("masks: one array (pure math) and packed masks", ("jasp.masks", "jasp.packing")),
  ("models and layouts: which axis of which leaf", ("jasp._model", "jasp.weights", "jasp.layouts")),
  ("policy: which leaves to prune", ("jasp.policy",)),
  ("pruning: whole trees", ("jasp.sharding", "jasp.pruning")),
  ("training and reports", ("jasp.enforcement", "jasp.report")),
  ("permutation", ("jasp.permutation", "jasp.permutation.*")),
  ("calibration", ("jasp.calibration", "jasp.calibration.*")),
  ("sparse matmul", ("jasp.sparse", "jasp.sparse.*")),
  ("export and the CLI", ("jasp.export", "jasp.export.*")),
  ("the package root and its entry point", ("jasp", "jasp.__main__")),
]


#: jasp-internal imports allowed inside functions: ``(importer, imported): reason``.
DEFERRED_IMPORTS: dict[tuple[str, str], str] = {
  # `jasp check --help` must start without jax: the CLI imports the checker
  # (which pulls in numpy/jax through jasp.export) only when a subcommand runs.
  ("jasp.export.cli", "jasp.export._check"): "the CLI starts without jax",
  ("jasp.export.cli", "jasp.export._deps"): "the CLI starts without jax",
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(ROOT.rglob("*.py")):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path):
  """Yields ``(imported module, imported name or None, top level?, line)``."""
  tree = ast.parse(path.read_text(), str(path))
  top = {id(node) for node in tree.body}
  typing_only = set()
  for node in tree.body:
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      typing_only.update(id(n) for n in ast.walk(node))  # never runs: no edge
    elif isinstance(node, ast.Try):  # a top-level `try: import` counts as top level
      top.update(id(n) for n in ast.walk(node))
  is_pkg = path.name == "__init__.py"
  for node in ast.walk(tree):
    if id(node) in typing_only:
      continue
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, None, id(node) in top, node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
      for alias in node.names:
        if f"{base}.{alias.name}" in MODULES:
          yield f"{base}.{alias.name}", None, id(node) in top, node.lineno
        else:
          yield base, alias.name, id(node) in top, node.lineno


def _edges():
  """``[(importer, imported module, imported name, top level?, line)]`` within jasp."""
  out = []
  for name, path in MODULES.items():
    for mod, attr, top, line in _imports(name, path):
      if mod == "jasp" or mod.startswith("jasp."):
        if mod not in MODULES:
          raise AssertionError(f"{name}:{line} imports {mod}, which is not a jasp module")
        out.append((name, mod, attr, top, line))
  return out


EDGES = _edges()


def _layer(name: str) -> int:
  for i, (_, patterns) in enumerate(LAYERS):
    if any(fnmatch.fnmatchcase(name, p) for p in patterns):
      return i
  raise AssertionError(f"{name} is in no layer of LAYERS; add it where it belongs")


def test_every_module_has_a_layer():
  for name in MODULES:
    _layer(name)


def test_no_import_cycles():
  graph: dict[str, set[str]] = {name: set() for name in MODULES}
  for src, dst, _, _, _ in EDGES:
    if dst != src and not src.startswith(dst + "."):  # a submodule reading its package is
      graph[src].add(dst)  # covered by the layer test
  # Tarjan's strongly connected components.
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  cycles = []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert not cycles, f"import cycles: {cycles}"


def test_layers_import_downward_only():
  bad = []
  for src, dst, _, _, line in EDGES:
    if dst == "jasp" and src != "jasp":
      bad.append(f"{src}:{line} imports the package root")
    elif _layer(dst) > _layer(src):
      bad.append(
        f"{src}:{line} ({LAYERS[_layer(src)][0]}) imports {dst} ({LAYERS[_layer(dst)][0]})"
      )
  assert not bad, "upward imports:\n" + "\n".join(bad)


def test_foundations_import_no_feature_module():
  bad = [
    f"{src}:{line} imports {dst}"
    for src, dst, _, _, line in EDGES
    if src in FOUNDATIONS and dst != "jasp.typing"
  ]
  assert not bad, "\n".join(bad)


def test_internal_imports_are_at_top_level():
  bad = [
    f"{src}:{line} imports {dst} inside a function"
    for src, dst, _, top, line in EDGES
    if not top and (src, dst) not in DEFERRED_IMPORTS
  ]
  assert not bad, "\n".join(bad)
  used = {(src, dst) for src, dst, _, top, _ in EDGES if not top}
  assert set(DEFERRED_IMPORTS) <= used, f"stale entries: {set(DEFERRED_IMPORTS) - used}"


def _same_package(src: str, dst: str, src_is_pkg: bool) -> bool:
  """Whether ``src`` is the package ``__init__`` whose submodule is ``dst``."""
  return src_is_pkg and dst.startswith(src + ".")


def _module_aliases(tree: ast.Module, name: str, is_pkg: bool) -> dict[str, str]:
  """``{local name: jasp module}`` for modules bound by imports in ``tree``."""
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("jasp") and alias.asname:
          out[alias.asname] = alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in MODULES:
          out[alias.asname or alias.name] = full
  return out


def test_no_private_names_across_modules():
  bad = []
  for src, dst, attr, _, line in EDGES:
    if attr and attr.startswith("_") and not attr.startswith("__") and dst != src:
      if not _same_package(src, dst, MODULES[src].name == "__init__.py"):
        bad.append(f"{src}:{line} imports {dst}.{attr}")
  # Attribute access on an imported module: `masks_lib._check_nm(...)`.
  for name, path in MODULES.items():
    tree = ast.parse(path.read_text(), str(path))
    aliases = _module_aliases(tree, name, path.name == "__init__.py")
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
      ):
        bad.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
  assert not bad, "private names used across modules:\n" + "\n".join(bad)


PACKAGES = sorted(n for n, p in MODULES.items() if p.name == "__init__.py")


@pytest.mark.parametrize("package", PACKAGES)
def test_star_import_and_all(package):
  mod = importlib.import_module(package)
  names = list(getattr(mod, "__all__", ()))
  assert names, f"{package} has no __all__"
  assert len(set(names)) == len(names), f"{package}.__all__ repeats a name"
  missing = [n for n in names if not hasattr(mod, n)]
  assert not missing, f"{package}.__all__ names missing attributes: {missing}"
  namespace: dict = {}
  exec(f"from {package} import *", namespace)  # noqa: S102
  assert set(names) <= set(namespace)


@pytest.mark.parametrize("package", PACKAGES)
def test_dir_lists_all(package):
  mod = importlib.import_module(package)
  assert set(mod.__all__) <= set(dir(mod))


def _run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT.parent,
  )


def test_cli_help_does_not_import_jax():
  code = (
    "import sys, contextlib, io\n"
    "import jasp.export.cli as cli\n"
    "buf = io.StringIO()\n"
    "with contextlib.redirect_stdout(buf):\n"
    "  try:\n"
    "    cli.main(['check', '--help'])\n"
    "  except SystemExit as e:\n"
    "    assert e.code == 0, e.code\n"
    "assert 'usage' in buf.getvalue(), buf.getvalue()\n"
    "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'numpy') if m in sys.modules)\n"
    "assert not heavy, heavy\n"
  )
  proc = _run(code)
  assert proc.returncode == 0, proc.stderr


def test_import_jasp_is_lazy():
  proc = _run("import sys, jasp; assert 'jax' not in sys.modules; print(jasp.__version__)")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip()


def test_cli_version():
  proc = subprocess.run(
    [sys.executable, "-m", "jasp.export.cli", "--version"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT.parent,
  )
  assert proc.returncode == 0, proc.stderr
  from jasp.export import cli

  assert proc.stdout.strip() == f"jasp {cli.version()}"
  assert cli.version().split(".")[0].isdigit()
