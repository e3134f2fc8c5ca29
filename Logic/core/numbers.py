"""NaN-aware figures: a mean that skips undefined values, and JSON without NaN.

A Dice is undefined (NaN) for a label absent from both masks; such values are left out of means
and written as JSON ``null`` (strict JSON readers, browsers and PostgreSQL's JSON refuse ``NaN``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def nanmean(values: Iterable[float]) -> float:
    """Mean of the values that are not NaN; NaN when none is."""
    defined = [float(v) for v in values if not math.isnan(v)]
    return math.fsum(defined) / len(defined) if defined else math.nan


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON ``null``), in nested
    dicts, lists and tuples too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
