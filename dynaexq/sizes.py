"""Byte sizes as users write them: `20GiB`, `512MB`, `1.5G`, `123456` (plain bytes)."""
from __future__ import annotations

import re

from dynaexq.errors import UserError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text) -> int:
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = m[2].lower() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"cannot parse size {text!r}; write a number of bytes with an optional unit, e.g. "
                        "20GiB, 512MB, 1.5G or 123456 (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m[1]) * _UNITS[unit])


def format_size(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"
