"""Number helpers the evaluation reports share (torch-free): NaN means "undefined" (no ground
truth to find), printed as ``n/a`` and written to JSON as null."""
from __future__ import annotations

import math
import numbers
from typing import Any


def is_undefined(x: Any) -> bool:
    """None or a NaN real number."""
    return x is None or (isinstance(x, numbers.Real) and math.isnan(x))


def fmt(x: Any, spec: str = ".4f") -> str:
    """``format(x, spec)``, or ``n/a`` for None / NaN."""
    return "n/a" if is_undefined(x) else format(x, spec)


def nan_to_none(x: Any) -> float | None:
    """``float(x)``, or None for None / NaN (JSON has no NaN)."""
    return None if is_undefined(x) else float(x)
