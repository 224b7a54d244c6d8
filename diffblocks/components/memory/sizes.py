"""Byte sizes written the way people write them: ``"12GiB"``, ``"8 GB"``, ``"512MiB"``, or a plain int."""

from __future__ import annotations

import re
from typing import final

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_MSG_SIZE = (
    "memory size {text!r} is not a size: write a number and a unit, such as '12GiB', '8 GB' or '512MiB' "
    "(units: B, KB, MB, GB, TB in powers of 1000; KiB, MiB, GiB, TiB in powers of 1024), or give bytes as an int"
)


@final
class ByteSize(int):
    """A number of bytes, parsed from ``"12GiB"``-style text once and shown the same way.

    ``GB`` is 10⁹ bytes and ``GiB`` 2³⁰, as the SI and IEC prefixes say (a card sold as "24 GB"
    holds about 22.5 GiB).

    Example:
        >>> ByteSize.parse("12GiB") == 12 * 2**30
        True
        >>> str(ByteSize.parse("1.5 GB"))
        '1.4 GiB'
        >>> ByteSize.parse(4096)
        ByteSize('4.0 KiB')
    """

    @classmethod
    def parse(cls, value: str | int) -> ByteSize:
        """``value`` as bytes.

        Raises:
            ValueError: not a non-negative number with a known unit.
        """
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(_MSG_SIZE.format(text=value))
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"memory size {value} is negative: give a number of bytes >= 0")
            return cls(value)
        match = _PATTERN.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(_MSG_SIZE.format(text=value))
        return cls(int(float(match.group(1)) * _UNITS[unit]))

    def __str__(self) -> str:
        size = float(self)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if size < 1024:
                return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1024
        return f"{size:.1f} TiB"

    def __repr__(self) -> str:
        return f"ByteSize({str(self)!r})"
