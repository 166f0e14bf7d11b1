"""The standard library's long docstrings, the builtin calibration text, gathered in a clean interpreter.

Run as ``python -I -S stdlib_docs.py``: what a module's namespace holds depends on what the process
imported before (Ray replaces ``inspect.isgenerator``), and the text must hash the same in every process
that converts or evaluates, a cluster's workers included. Imports nothing outside the standard library.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import warnings

SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "pydoc_data", "ensurepip", "venv", "__")


def modules() -> list[str]:
    return sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and not n.startswith(SKIP))


def docs() -> list[tuple[str, str]]:
    """Each docstring of 200 characters or more, once, under the first name that carries it."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in modules():
            try:
                mod = importlib.import_module(modname)
            except Exception:  # noqa: BLE001 - platform-specific modules (winreg, ...) simply do not contribute
                continue
            for qual, obj in _documented(mod, modname):
                doc = inspect.getdoc(obj)
                if doc and len(doc) >= 200 and doc not in seen:
                    seen.add(doc)
                    out.append((qual, doc))
    return out


def _documented(mod, modname: str):
    yield modname, mod
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield f"{modname}.{name}", obj
            if inspect.isclass(obj):
                for mname, member in sorted(vars(obj).items()):
                    if not mname.startswith("_") and inspect.isfunction(member):
                        yield f"{modname}.{name}.{mname}", member


if __name__ == "__main__":
    json.dump(docs(), sys.stdout)
