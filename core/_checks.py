"""Argument checks shared by the library's modules (each names the argument and what is valid)."""

from __future__ import annotations

import numpy as np


def check_count(value, name: str, low: int) -> int:
    """An integer option >= ``low``, or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}; got {value!r}")
    return int(value)
