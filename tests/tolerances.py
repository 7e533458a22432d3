"""Tolerances derived from the magnitudes compared, for runs that differ only in float32 rounding.

Two runs that do the same arithmetic in another order (one process with batch 2 against two ranks
with batch 1: other padding, other reduction order) differ by float32 rounding only. A summed
response log-prob L (≤ 0) then carries an error |ΔL| ≤ c·ε·|L| with ε = 2⁻²³ and |L| = Σ|token
log-probs|; against float64 runs c ≤ 1 was measured on the tiny model (2-rank ZeRO-3 vs one
process, the runs of tests/test_distributed.py), and C = 4 leaves headroom.

- δ is the mean of the rewards β·(L_π − L_ref) seen so far, so with M_s = |logps/chosen| +
  |logps/rejected| + |logps/ref_chosen| + |logps/ref_rejected| (per-pair means logged at step s):
  |Δδ_n| ≤ β·C·ε·max_{s≤n} M_s. δ is a mean of small differences and may nearly cancel, so a
  *relative* tolerance on δ means nothing (rel 3.5e-4 was seen from rounding alone).
- The loss: dL_p/dΔ and dL_q/dΔ are at most β, L_g is linear in the log-probs, and the logged loss
  is rounded twice: |Δloss| ≤ 2Cε·(w_g·L_g + (w_p + w_q)·β·M_s) + 2·w_q·bound(δ) + 2ε·|loss|.

A counting bug (a placeholder pair's rewards counted, a pair counted twice) moves δ by 2× to
several hundred × this bound on the runs of the suite; the count of rewards behind δ is compared
exactly besides.
"""

from __future__ import annotations

EPS32 = 2.0**-23
C = 4.0
LOGP_KEYS = ("logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")


def logp_magnitude(row: dict) -> float:
    """M_s of one logged training row."""
    return sum(abs(row[k]) for k in LOGP_KEYS)


def delta_bound(rows: list[dict], beta: float) -> float:
    """Bound on |Δδ| after the last of ``rows`` (logged rows of steps 1..n, in order)."""
    return beta * C * EPS32 * max(logp_magnitude(r) for r in rows)


def loss_bound(row: dict, rows_so_far: list[dict], beta: float, weights=(0.8, 0.2, 1.0)) -> float:
    """Bound on |Δloss| of one logged training row."""
    w_p, w_q, w_g = weights
    terms = w_g * abs(row["loss/sft"]) + (w_p + w_q) * beta * logp_magnitude(row)
    return 2 * C * EPS32 * terms + 2 * w_q * delta_bound(rows_so_far, beta) + 2 * EPS32 * abs(row["loss"])


def assert_same_training(got: dict[int, dict], want: dict[int, dict], beta: float = 0.1) -> None:
    """Per step: loss and δ within the rounding bounds, the reward count behind δ exact."""
    assert sorted(got) == sorted(want)
    rows = []
    for step in sorted(want):
        w, g = want[step], got[step]
        rows.append(w)
        assert g["bco/num_rewards"] == w["bco/num_rewards"], step
        assert abs(g["bco/delta"] - w["bco/delta"]) <= delta_bound(rows, beta), (
            step,
            g["bco/delta"],
            w["bco/delta"],
        )
        assert abs(g["loss"] - w["loss"]) <= loss_bound(w, rows, beta), (step, g["loss"], w["loss"])


def logp_close(a: float, b: float) -> bool:
    """Two float32 computations of one summed log-prob (e.g. with other padding) agree within
    C·ε·|L| (|L| = Σ|token log-probs|, log-probs being ≤ 0)."""
    return abs(a - b) <= C * EPS32 * max(abs(a), abs(b))
