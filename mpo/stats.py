"""Small statistics shared by the reports (``mpo data check``, the start-up summary)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable


def percentiles(
    values: Counter | Iterable[float], qs: tuple[int, ...] = (50, 90, 99, 100)
) -> dict[str, float]:
    """Exact nearest-rank percentiles (the q-th smallest value at rank ceil(q/100·n)), keyed
    ``p50``... and ``max`` for q = 100. ``values`` may be a histogram (value -> count), so a
    million lengths cost one entry per distinct length."""
    hist = values if isinstance(values, Counter) else Counter(values)
    total = sum(hist.values())
    if not total:
        return {}
    keys = sorted(hist)
    out: dict[str, float] = {}
    for q in qs:
        rank, seen = max(1, math.ceil(q / 100 * total)), 0
        for k in keys:
            seen += hist[k]
            if seen >= rank:
                out["max" if q == 100 else f"p{q}"] = k
                break
    return out
