"""How the reports write numbers: stored floats (JSON keeps non-finite ones as strings) as short display text."""

import math
from typing import Any, Optional


def _float(value: Any) -> Optional[float]:
    """A stored number (float, int or 'nan'/'inf' string) as float; None for None or anything unparseable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _num(value: Any, digits: int = 2) -> str:
    """A number for display; stored non-finite strings and real NaN/inf as NaN / ∞, never a bare 'nan'."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):  # "inf" / "nan" as stored in JSON, or a hand-edited value shown as is
        return {"inf": "∞", "-inf": "−∞", "nan": "NaN"}.get(value.lower(), value)
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits + 2}g}"
    return f"{value:.{digits}e}"


def _cos(value: Any) -> str:
    """Cosine near 1 as '1−3.2e-09' (the distance from 1 is what matters)."""
    if isinstance(value, float) and 0.999 < value < 1:
        return f"1−{1 - value:.1e}"
    return _num(value, 4)


def _pct(value: Any) -> str:
    """A tolerance ratio as a percentage of the tolerance: 0.0166 -> '1.66%'."""
    number = _float(value)
    if number is None:
        return _num(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "∞"
    if number == 0:
        return "0%"
    return f"{number * 100:.0f}%" if abs(number) >= 1 else f"{number * 100:.3g}%"  # 4059%, not 4.06e+03%


def _times(value: Any) -> str:
    """A floor ratio: 3.2 -> '3.2×'."""
    number = _float(value)
    return _num(value) if number is None or not math.isfinite(number) else f"{number:.3g}×"
