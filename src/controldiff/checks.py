"""Argument checks shared by the pipeline and the controls, one message form:
``name: expected X, got Y``. Booleans are not numbers here (``True`` as a scale is a slip)."""
from __future__ import annotations

import math
from numbers import Real
from typing import Any


def is_number(value: Any) -> bool:
    """A finite real number (int, float, numpy scalar), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def finite_number(value: Any, name: str, minimum: float | None = None, note: str = "") -> float:
    """``value`` as a float, or a ValueError naming ``name``; ``minimum`` is inclusive."""
    if not is_number(value) or (minimum is not None and value < minimum):
        expected = "a finite number" + (f" >= {minimum:g}" if minimum is not None else "") + note
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value
