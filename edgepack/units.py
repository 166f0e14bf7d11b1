"""Sizes as people write them: the one parser for file sizes and memory budgets.

SI units count in powers of 1000 (``kB``, ``MB``, ``GB``, ``TB``), IEC units in powers of 1024
(``KiB``, ``MiB``, ``GiB``, ``TiB``). A bare letter (``512M``, ``4G``) is the IEC unit, as in
Docker, ``free`` and llama.cpp's memory flags; a bare number is bytes. Case does not matter.
"""

from __future__ import annotations

import re

from .errors import UsageError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?)(b?))?\s*(?:b(?:ytes?)?)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, *, option: str | None = None) -> int:
    """Bytes in ``"105.5MB"``, ``"98MiB"``, ``"4G"`` or ``"1048576"``; raises UsageError (naming ``option``)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise UsageError(f"{_name(option)}size {text!r} not understood: write e.g. 105MB, 98.5MiB, 4G or a number of bytes", option=option)
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(text)
        if not m:
            raise UsageError(f"{_name(option)}size {text!r} not understood: write e.g. 105MB, 98.5MiB, 4G or a number of bytes", option=option)
        number, letter, iec, byte = m.groups()
        power = " kmgt".index(letter.lower()) if letter else 0
        base = 1024 if iec or (letter and not byte) else 1000
        value = int(float(number) * base**power)
    if value <= 0:
        raise UsageError(f"{_name(option)}size {text!r}: give a size above zero, e.g. 100MB", option=option)
    return value


def _name(option: str | None) -> str:
    return f"`{option}`: " if option else ""
