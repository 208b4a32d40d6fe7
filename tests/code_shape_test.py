"""The shape of the code: no function in ``jasp/`` runs over MAX_LINES lines of code.

Lines of code are the lines of a function's source that are neither blank, nor
comments only, nor its docstring. A long function that cannot be split
sensibly is listed in ``ALLOWED`` with the reason.
"""

from __future__ import annotations

import ast
import pathlib

MAX_LINES = 80
ROOT = pathlib.Path(__file__).resolve().parent.parent / "jasp"

# {"path/under/jasp.py:qualified.name": why it may be longer}.
ALLOWED: dict[str, str] = {}


def _docstring_lines(fn: ast.AST) -> set[int]:
  body = getattr(fn, "body", [])
  if (
    body
    and isinstance(body[0], ast.Expr)
    and isinstance(body[0].value, ast.Constant)
    and isinstance(body[0].value.value, str)
  ):
    return set(range(body[0].lineno, body[0].end_lineno + 1))
  return set()


def code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
  """The lines of code of ``fn`` (its signature included; see the module doc)."""
  skip = _docstring_lines(fn)
  count = 0
  for no in range(fn.lineno, fn.end_lineno + 1):
    text = lines[no - 1].strip()
    if no not in skip and text and not text.startswith("#"):
      count += 1
  return count


def functions(tree: ast.AST):
  """``(qualified name, node)`` of every function and method, nested ones included."""
  stack = [("", tree)]
  while stack:
    prefix, node = stack.pop()
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        name = prefix + child.name
        if not isinstance(child, ast.ClassDef):
          yield name, child
        stack.append((name + ".", child))
      else:
        stack.append((prefix, child))


def measure() -> dict[str, int]:
  """``{"path:function": lines of code}`` of every function under ``jasp/``."""
  out = {}
  for path in sorted(ROOT.rglob("*.py")):
    source = path.read_text()
    lines = source.splitlines()
    rel = path.relative_to(ROOT).as_posix()
    for name, fn in functions(ast.parse(source, str(path))):
      out[f"{rel}:{name}"] = code_lines(fn, lines)
  return out


def test_no_function_is_too_long():
  sizes = measure()
  long = {k: v for k, v in sizes.items() if v > MAX_LINES and k not in ALLOWED}
  assert not long, (
    f"functions over {MAX_LINES} lines of code (split them, or list them in ALLOWED "
    f"with the reason): {long}"
  )


def test_allowed_entries_exist():
  sizes = measure()
  stale = [k for k, why in ALLOWED.items() if k not in sizes]
  assert not stale, f"ALLOWED names functions that no longer exist: {stale}"


def test_code_lines_skip_docstrings_and_comments():
  source = 'def f(x):\n  """Doc.\n\n  More.\n  """\n  # a comment\n\n  return x\n'
  ((name, fn),) = functions(ast.parse(source))
  assert name == "f"
  assert code_lines(fn, source.splitlines()) == 2
