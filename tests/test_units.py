"""Sizes: one parser for file sizes and memory budgets, SI and IEC units both."""

from __future__ import annotations

import pytest

from edgepack.errors import UsageError
from edgepack.units import parse_size


@pytest.mark.parametrize(
    "text, size",
    [
        ("105.5MB", 105_500_000), ("4GB", 4 * 10**9), ("512 MB", 512 * 10**6), ("1.5kB", 1500),  # SI: powers of 1000
        ("98MiB", 98 * 2**20), ("4GiB", 4 * 2**30), ("1.5GiB", int(1.5 * 2**30)),  # IEC: powers of 1024
        ("4G", 4 * 2**30), ("512m", 512 * 2**20), ("4Gi", 4 * 2**30),  # a bare letter is the IEC unit
        ("4096", 4096), ("4096 bytes", 4096), (1000, 1000),
    ],
)  # fmt: skip
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["big", "12XB", "1e3", "", "-5MB", "GB"])
def test_what_is_not_a_size_names_the_option(bad):
    with pytest.raises(UsageError, match="not understood") as e:
        parse_size(bad, option="ram")
    assert e.value.option == "ram" and str(e.value).startswith("`ram`: ")


def test_a_size_must_be_above_zero():
    with pytest.raises(UsageError, match="above zero"):
        parse_size("0MB")
