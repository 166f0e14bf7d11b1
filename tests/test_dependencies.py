"""Every library the package imports is one it declares: in the base dependencies, or in the extra its import guard names.

The README's first command installs ``.[all]`` without the test extra, so an import that only a test
dependency satisfies (``httpx`` once was) breaks the main job on a fresh machine while the suite passes.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = ("edgepack", "converters", "runtime", "tui", "models")  # what pyproject maps into the edgepack package


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(requirements: list[str]) -> set[str]:
    return {_norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def _extras() -> dict[str, set[str]]:
    """Each extra's distributions, with ``edgepack[other]`` references expanded."""
    raw = PYPROJECT["project"]["optional-dependencies"]

    def expand(extra: str) -> set[str]:
        out = set()
        for req in raw[extra]:
            if m := re.fullmatch(r"edgepack\[([a-z0-9,_-]+)\]", req.replace(" ", "")):
                for other in m.group(1).split(","):
                    out |= expand(other)
            else:
                out |= _names([req])
        return out

    return {extra: expand(extra) for extra in raw}


BASE = _names(PYPROJECT["project"]["dependencies"])
EXTRAS = _extras()


def _guard_extra(handler: ast.ExceptHandler) -> str | None:
    """The extra a handler names, when it turns an ImportError into MissingDependencyError(..., extra=...)."""
    for node in ast.walk(handler):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "MissingDependencyError":
            for kw in node.keywords:
                if kw.arg == "extra" and isinstance(kw.value, ast.Constant):
                    return kw.value.value
            return ""  # a guard that names no extra: the module must be a base dependency
    return None


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = [handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts
    return any(getattr(n, "id", None) in ("ImportError", "ModuleNotFoundError") for n in names)


class _Imports(ast.NodeVisitor):
    """Third-party top-level modules imported in one file: (module, line, extra named by the enclosing guard or None)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, int, str | None]] = []
        self._guards: list[str | None] = []

    def visit_If(self, node: ast.If) -> None:
        if getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            return  # never executed
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        extra = next((e for h in node.handlers if _catches_import_error(h) and (e := _guard_extra(h)) is not None), None)
        self._guards.append(extra)
        for stmt in node.body:
            self.visit(stmt)
        self._guards.pop()
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(part)

    def _add(self, module: str, line: int) -> None:
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top == "edgepack" or top == "__future__":
            return
        extra = next((g for g in reversed(self._guards) if g is not None), None)
        self.found.append((top, line, extra))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module, node.lineno)


def _package_imports() -> list[tuple[str, str, int, str | None]]:
    out = []
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            visitor = _Imports()
            visitor.visit(ast.parse(path.read_text(), str(path)))
            out += [(m, f"{path.relative_to(ROOT)}:{line}", line, extra) for m, line, extra in visitor.found]
    return out


def test_every_imported_library_is_declared_where_its_import_says():
    provided = md.packages_distributions()
    guarded: dict[str, set[str]] = {}  # module -> extras that some guard names for it
    for module, _, _, extra in _package_imports():
        if extra:
            guarded.setdefault(module, set()).add(extra)
    problems = []
    for module, where, _, extra in _package_imports():
        dists = {_norm(d) for d in provided.get(module, [])}
        if not dists:
            problems.append(f"{where}: imports {module}, which no installed distribution provides")
        elif dists & BASE:
            continue
        elif extra is not None and extra and extra in EXTRAS and dists & EXTRAS[extra]:
            continue
        elif extra is None and any(dists & EXTRAS.get(e, set()) for e in guarded.get(module, ())):
            continue  # used after a guard elsewhere has imported it (or said which extra to install)
        else:
            declared = [e for e, names in EXTRAS.items() if dists & names]
            problems.append(
                f"{where}: imports {module} ({', '.join(sorted(dists))}), which is not a base dependency"
                + (f"; only the extras {', '.join(declared)} have it, and no import guard names them" if declared else " nor in any extra")
            )
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_undeclared_import(tmp_path, monkeypatch):
    """The check itself can fail: a module importing a test-only library (httpx) is reported."""
    fake = tmp_path / "edgepack"
    fake.mkdir()
    (fake / "net.py").write_text("def reachable():\n    import httpx\n    return httpx\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIRS", ("edgepack",))
    with pytest.raises(AssertionError, match=r"edgepack/net.py:2: imports httpx .*only the extras test have it"):
        test_every_imported_library_is_declared_where_its_import_says()


def test_a_guard_names_an_extra_that_holds_the_library(tmp_path, monkeypatch):
    fake = tmp_path / "edgepack"
    fake.mkdir()
    guarded = (
        "from .errors import MissingDependencyError\n"
        "def load():\n"
        "    try:\n"
        "        import gptqmodel\n"
        "    except ImportError as e:\n"
        "        raise MissingDependencyError('gptqmodel', extra='{extra}') from e\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIRS", ("edgepack",))
    if not md.packages_distributions().get("gptqmodel"):
        pytest.skip("needs gptqmodel installed (the gptq extra)")
    (fake / "q.py").write_text(guarded.format(extra="gptq"))
    test_every_imported_library_is_declared_where_its_import_says()
    (fake / "q.py").write_text(guarded.format(extra="cuda"))
    with pytest.raises(AssertionError, match="imports gptqmodel"):
        test_every_imported_library_is_declared_where_its_import_says()


def test_a_missing_optional_library_names_its_extra(monkeypatch):
    """What the guards promise: a blocked import becomes one line with the pip command."""
    from edgepack.converters import calibration
    from edgepack.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MissingDependencyError, match=r"datasets is needed .*pip install 'edgepack\[datasets\]'"):
        calibration.load("hf:wikitext:wikitext-2-raw-v1:test:text")
