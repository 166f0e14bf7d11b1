"""The ``edgepack`` command: one module per command group, each registering on ``app``.

Errors become one line on stderr and a non-zero exit; ``--debug`` (or
``EDGEPACK_DEBUG=1``) shows the traceback instead. The library logs progress and
warnings to the ``edgepack`` logger; the command shows them on stderr, so stdout
holds only data (a path, JSON, a table).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys

import typer
from rich.console import Console
from rich.markup import escape

from .. import __version__, constants
from ..errors import EdgepackError

app = typer.Typer(
    name="edgepack",
    help="Convert a language model into small, fast variants and run them offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, highlight=False)

# Modules that register commands, in the order `--help` lists them.
COMMANDS = (
    "models",  # pull, inspect
    "convert",
    "doctor",
    "run",
    "serve",
    "chat",
    "reports",  # eval, bench, report, recommend
    "trust",  # keygen, sign, verify
    "publish",  # export, push
)


def info(message: str) -> None:
    """Progress and notes go to stderr, unwrapped, so stdout stays data; options are named by their flags."""
    err.print(escape(_as_flags(message)), soft_wrap=True)


class _Stderr(logging.Handler):
    """The ``edgepack`` logger's records, rendered as the command's own lines: warnings marked, nothing else added."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        info(f"warning: {text}" if record.levelno >= logging.WARNING else text)


def _log_to_stderr(debug: bool) -> None:
    logger = logging.getLogger("edgepack")
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False  # libraries that configure the root logger (GPTQModel) would print each line again
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())


def _version(value: bool) -> None:
    if value:
        print(f"edgepack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.", envvar="EDGEPACK_DEBUG"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _log_to_stderr(debug)
    if debug:
        os.environ["EDGEPACK_DEBUG"] = "1"
    else:
        # edgepack logs each stage with its time; the libraries' own progress bars and advisories
        # (one "Loading weights" bar per model load) would bury those lines. --debug brings them back.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")  # bars libraries draw with tqdm directly (transformers' GGUF loader)


for _name in COMMANDS:
    importlib.import_module(f"{__name__}.{_name}").register(app)

# Exceptions from outside edgepack's hierarchy that still deserve one line, most specific first.
_FOREIGN = (
    (MemoryError, "out of memory: try a smaller variant, a smaller n_ctx or fewer threads"),
)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except EdgepackError as e:
        _fail(e, _as_flags(str(e)), e.exit_code)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code or 0)
    except KeyboardInterrupt as e:
        _fail(e, "interrupted", 130)
    except Exception as e:
        if isinstance(e, typer.Abort):
            _fail(e, "aborted", 130)
        # Usage errors carry their own formatting. Their class is click's, from the copy of click
        # that typer >= 0.29 ships inside itself (older typer: click), hence found through typer.
        if isinstance(e, sys.modules[typer.BadParameter.__module__].ClickException):
            e.show()
            sys.exit(e.exit_code)
        for kind, message in _FOREIGN:
            if isinstance(e, kind):
                _fail(e, message, 1)
        _fail(e, f"unexpected {type(e).__name__}: {e} (set EDGEPACK_DEBUG=1 for the traceback and please report it)", 1)


def _as_flags(message: str) -> str:
    """The library names options by their Python names in backticks; the command line shows the flags instead."""
    if "`" not in message:
        return message
    names = _flags()
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: names.get(m.group(1), m.group(0)), message)


def _flags() -> dict[str, str]:
    """Every command's options by parameter name -> the flag that sets it (``window_len`` -> ``--window-len``)."""
    import typer.main

    out: dict[str, str] = {}
    for command in typer.main.get_command(app).commands.values():
        for param in command.params:
            long = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
            if long and param.name:
                out.setdefault(param.name, long[0])
    return out


def _fail(exc: BaseException, message: str, code: int) -> None:
    if constants.debug():
        raise exc
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)
