"""Options: the typed settings of a format or a transform, and the flag the command line gives each.

A format's (or transform's) options are one frozen dataclass. Each field that a user sets is declared
with ``option(...)``: its help text and, where the flag is not simply ``--field-name``, the flag. The
``convert`` command builds its flags from these fields, so a format adds its own flags by declaring them,
and the library's error messages name options by their Python names, which the CLI shows as flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class Flag:
    """How the command line sets one option."""

    help: str
    flag: str = ""  # default: --field-name
    metavar: str = ""
    panel: str = ""  # the --help section it is listed under
    negative: str = ""  # a switch's off flag ("--asym" for --sym); a switch without one is on/off by its presence

    def name_for(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str = "", metavar: str = "", panel: str = "",
           negative: str = "", default_factory: Any = dataclasses.MISSING) -> Any:  # fmt: skip
    """A dataclass field a user sets, with the flag that sets it on the command line."""
    meta = {"flag": Flag(help, flag, metavar, panel, negative)}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flags(cls: type) -> dict[str, Flag]:
    """The user-settable fields of an options dataclass, by name."""
    return {f.name: f.metadata["flag"] for f in dataclasses.fields(cls) if "flag" in f.metadata}


def switch(options: dict[str, Any], name: str, default: bool) -> bool:
    """A yes/no option; text (from a command line or a config file) must say which. Raises UsageError."""
    value = options.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"`{name}` {value!r}: give true or false", option=name)


def number(options: dict[str, Any], name: str, default: Any, kind: type = int) -> Any:
    """A whole (``kind=int``) or real number option, from a number or text; raises UsageError."""
    value = options.get(name, default)
    if value is None or isinstance(value, kind) and not isinstance(value, bool):
        return value
    try:
        return kind(str(value).strip())
    except ValueError as e:
        what = "a whole number" if kind is int else "a number"
        raise UsageError(f"`{name}` {value!r}: give {what}", option=name) from e


def listed(value: Any) -> tuple[str, ...]:
    """A list option from comma-separated text, or a list of such texts (a repeated flag)."""
    if not value:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(part.strip() for item in items for part in str(item).split(",") if part.strip())


def given(value: Any) -> bool:
    """Whether an option value was set (False is a setting; None and empty are not)."""
    return value is not None and value != "" and value != () and value != []
