"""Every library the package imports is one it declares: in the base dependencies, or in the extra its import guard names.

The README's first command installs ``.[all]`` without the test extra, so an import that only a test
dependency satisfies (``httpx`` once was) breaks the main job on a fresh machine while the suite passes.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
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


OPTIONAL = "*"  # a handler that lives without the library (doctor's probes): any library may be tried there


def _guard_extra(handler: ast.ExceptHandler) -> str | None:
    """The extra a handler names, when it turns an ImportError into MissingDependencyError(..., extra=...)."""
    if not any(isinstance(n, ast.Raise) for n in ast.walk(handler)):
        return OPTIONAL
    for node in ast.walk(handler):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "MissingDependencyError":
            for kw in node.keywords:
                if kw.arg == "extra" and isinstance(kw.value, ast.Constant):
                    return kw.value.value
            return ""  # a guard that names no extra: the module must be a base dependency
    return None


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = [handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts
    return any(getattr(n, "id", None) in ("ImportError", "ModuleNotFoundError", "Exception") for n in names)


class _Imports(ast.NodeVisitor):
    """What one file imports, each with the extra its innermost import guard names (None: no guard; "": a guard naming none).

    ``libraries``: third-party top-level modules as (module, line, guard). ``modules``: edgepack modules as
    (dotted name, line, guard), relative imports resolved, plus every string constant that names one (the
    registries' tuples, imported by ``importlib``).
    """

    def __init__(self, name: str, is_package: bool, known: set[str]) -> None:
        self.name, self.known = name, known
        self.package = name if is_package else name.rpartition(".")[0]
        self.libraries: list[tuple[str, int, str | None]] = []
        self.modules: list[tuple[str, int, str | None]] = []
        self._guards: list[str | None] = []

    def _guard(self) -> str | None:
        return next((g for g in reversed(self._guards) if g is not None), None)

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

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value in self.known:
            self.modules.append((node.value, node.lineno, self._guard()))

    def _add(self, module: str, line: int, names: tuple[str, ...] = ()) -> None:
        top = module.split(".")[0]
        if top == "edgepack":
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in self.known] or [module]
            self.modules += [(t, line, self._guard()) for t in targets if t in self.known]
        elif top not in sys.stdlib_module_names and top != "__future__":
            self.libraries.append((top, line, self._guard()))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        self._add(module, node.lineno, tuple(a.name for a in node.names))


def _files() -> dict[str, tuple[Path, bool]]:
    """Each module of the package by dotted name -> (file, whether it is a package's __init__)."""
    out = {}
    for folder in PACKAGE_DIRS:
        prefix = "edgepack" if folder == "edgepack" else f"edgepack.{folder}"
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if not all(p.isidentifier() for p in parts):
                continue  # edgepack/__pyinstaller/hook-*.py: PyInstaller runs them (it is their library); nothing imports them
            is_package = parts[-1] == "__init__"
            out[".".join((prefix, *(parts[:-1] if is_package else parts)))] = (path, is_package)
    return out


def _package_imports() -> dict[str, _Imports]:
    files = _files()
    out = {}
    for name, (path, is_package) in files.items():
        visitor = _Imports(name, is_package, set(files))
        visitor.visit(ast.parse(path.read_text(), str(path)))
        out[name] = visitor
    return out


# What a user reaches without having been told to install an extra: the package, the command line (its command
# modules are imported by name) and the runtime. Anything else is reached from these, or checked as if it were one.
ENTRY_POINTS = ("edgepack", "edgepack.__main__", "edgepack.cli", "edgepack.runtime")


def _reached(imports: dict[str, _Imports]) -> dict[str, set[str | None]]:
    """Each module -> the extras under which it can be imported (None: with the base install only).

    An import inside a guard naming an extra passes that extra on to everything it imports in turn.
    """
    roots = [m for m in imports if m in ENTRY_POINTS or m.startswith("edgepack.cli.")]
    seen: dict[str, set[str | None]] = {}
    todo = [(m, None) for m in roots]
    while todo or len(seen) < len(imports):
        if not todo:  # a module nothing imports: checked as an entry point
            todo = [(next(m for m in imports if m not in seen), None)]
        module, extra = todo.pop()
        if extra in seen.setdefault(module, set()):
            continue
        seen[module].add(extra)
        for target, _, guard in imports[module].modules:
            todo.append((target, extra if guard is None else (guard or None)))
    return seen


def test_every_imported_library_is_declared_where_its_import_says():
    """Each library import, in every way its module can be reached, is a base dependency or in the extra a guard on the way names."""
    provided = md.packages_distributions()
    imports = _package_imports()
    files = _files()
    problems = set()
    for module, extras in _reached(imports).items():
        found = imports[module]
        # A library a guard in the same file names an extra for is imported by its later uses only after that guard.
        guarded = {lib: g for lib, _, g in found.libraries if g}
        for lib, line, guard in found.libraries:
            dists = {_norm(d) for d in provided.get(lib, [])}
            where = f"{files[module][0].relative_to(ROOT)}:{line}"
            if not dists:
                problems.add(f"{where}: imports {lib}, which no installed distribution provides")
                continue
            if dists & BASE or guard == OPTIONAL:
                continue
            for extra in extras:
                need = guard or (guarded.get(lib) if guard is None else None) or extra
                if need and need in EXTRAS and dists & EXTRAS[need]:
                    continue
                declared = [e for e, names in EXTRAS.items() if dists & names]
                via = f" (reached with the {extra} extra)" if extra else ""
                problems.add(
                    f"{where}: imports {lib} ({', '.join(sorted(dists))}){via}, which is not a base dependency"
                    + (f"; only the extras {', '.join(declared)} have it, and no import guard names them" if declared else " nor in any extra")
                )
    assert not problems, "\n".join(sorted(problems))


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


def test_a_module_reached_without_a_guard_may_need_no_extra(tmp_path, monkeypatch):
    """The split is checked by reachability: the runtime importing a torch module unguarded is reported; a guard naming convert fixes it."""
    if not md.packages_distributions().get("torch"):
        pytest.skip("needs torch installed (the convert extra)")
    pkg = tmp_path / "edgepack"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "heavy.py").write_text("import torch\n")
    (pkg / "runtime" / "__init__.py").write_text("def load():\n    from .. import heavy\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIRS", ("edgepack",))
    with pytest.raises(AssertionError, match=r"edgepack/heavy.py:1: imports torch .*only the extras .*convert"):
        test_every_imported_library_is_declared_where_its_import_says()
    (pkg / "runtime" / "__init__.py").write_text(
        "from ..errors import MissingDependencyError\n"
        "def load():\n"
        "    try:\n"
        "        from .. import heavy\n"
        "    except ImportError as e:\n"
        "        raise MissingDependencyError('torch', extra='convert') from e\n"
    )
    test_every_imported_library_is_declared_where_its_import_says()


def test_convert_without_the_convert_extra_says_which_to_install():
    """The runtime-only install, simulated: convert's libraries do not import; the command fails in one line naming the extra."""
    blocked = ("torch", "transformers", "safetensors", "ml_dtypes", "sentencepiece", "accelerate")
    code = f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\nfrom edgepack.cli import main\nmain(['convert', 'smollm2-135m'])\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("pip install 'edgepack[convert]'"), proc.stderr
