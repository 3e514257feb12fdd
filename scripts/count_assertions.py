"""Count the assertions in the test suite, so that a reorganisation can show it dropped none.

An *assertion* is, in every ``.py`` file under the given paths (default: ``tests``), read with ``ast``
(nothing is imported or run):

1. an ``assert`` statement (one per statement, however many ``and`` terms it has);
2. a call to ``pytest.raises``, ``pytest.warns`` or ``pytest.deprecated_call`` (written with the ``pytest.``
   prefix or as a bare name imported from pytest), whether used as a context manager or called directly;
3. a call to any function or method whose name starts with ``assert_`` (``torch.testing.assert_close``,
   ``np.testing.assert_allclose``, ``np.testing.assert_array_equal``, a project helper such as
   ``assert_same_logits``, ``mock.assert_called_once``) or is unittest's camel-case ``assertX``
   (``self.assertEqual``).

A statement inside a helper counts once where it is written, not once per caller; a call to an
``assert_*`` helper counts once per call site. Strings and comments never count.

Usage: ``python scripts/count_assertions.py [PATH ...] [--by-file]``. It prints the total (and, with
``--by-file``, one line per file with a non-zero count).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PYTEST_CHECKS = {"raises", "warns", "deprecated_call"}


def _call_name(func: ast.expr) -> tuple[str | None, str | None]:
    """``(prefix, name)`` of a called expression: ``pytest.raises`` -> ("pytest", "raises"), ``f`` -> (None, "f")."""
    if isinstance(func, ast.Name):
        return None, func.id
    if isinstance(func, ast.Attribute):
        prefix = func.value.id if isinstance(func.value, ast.Name) else None
        return prefix, func.attr
    return None, None


def is_assertion_call(node: ast.Call) -> bool:
    """True when ``node`` is one of the assertion calls of rules 2 and 3 in the module docstring."""
    prefix, name = _call_name(node.func)
    if name is None:
        return False
    if name in PYTEST_CHECKS and prefix in (None, "pytest"):
        return True
    if name.startswith("assert_"):
        return True
    return name.startswith("assert") and len(name) > len("assert") and name[len("assert")].isupper()


def count_file(path: Path) -> int:
    """The number of assertions in one Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert) or (isinstance(node, ast.Call) and is_assertion_call(node)):
            n += 1
    return n


def python_files(paths: list[Path]) -> list[Path]:
    """Every ``.py`` file named or below a named directory, sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(p.rglob("*.py")))
        elif p.suffix == ".py":
            out.append(p)
        else:
            raise SystemExit(f"count_assertions: {p} is neither a directory nor a .py file")
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the total assertion count (and per-file counts with ``--by-file``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("tests")])
    parser.add_argument("--by-file", action="store_true", help="one line per file with its count")
    args = parser.parse_args(argv)
    total = 0
    for f in python_files(args.paths):
        n = count_file(f)
        total += n
        if args.by_file and n:
            print(f"{n:6d}  {f}")
    print(f"{total} assertions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
