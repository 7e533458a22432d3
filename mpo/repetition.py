"""Repetition metrics for generated answers: the alarm for the degenerate loops users report after MPO.

Three numbers per set of generations (InternVL issues #1241 and #1217 describe answers that repeat
one phrase until the token limit after preference training):

* ``limit_share``: the share of outputs that stopped at the token limit without an end-of-turn
  token. A healthy short-answer model almost never runs out of tokens; a looping one always does.
* ``longest_run``: the most consecutive copies of one n-gram (n ≤ ``MAX_NGRAM`` words) in any
  output ("red red red" = 3, "the cat sat. the cat sat." = 2, an answer without repetition = 1).
  ``longest_run_mean`` averages the per-output values.
* ``distinct2``: distinct bigrams / bigrams, per output, averaged over the outputs with at least
  two words (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models", §4.3, computes it over a whole corpus; per output it measures looping, not blandness).

Words are what the metrics count, not tokenizer tokens, so the numbers compare across models and
can be recomputed from logged text: runs of letters/digits, each punctuation mark, and each CJK
character (CJK text has no spaces to split on). Pure Python; no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_NGRAM = 32  # longest repeated unit looked for, in words (a looping sentence is rarely longer)
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+|[^\w\s]|_")


def words(text: str) -> list[str]:
    """``text`` as the words the metrics count (lower-cased; punctuation and CJK characters separate)."""
    return _WORD.findall(text.lower())


def longest_run(tokens: list[str], max_n: int = MAX_NGRAM) -> int:
    """The most consecutive copies of one n-gram (1 ≤ n ≤ ``max_n``) in ``tokens``; 0 when empty.

    For a period ``n``, ``tokens[i] == tokens[i + n]`` holding for ``m`` consecutive ``i`` means a
    stretch of ``m + n`` tokens that repeats with period ``n``: ``m // n + 1`` whole copies.
    O(len(tokens) · max_n).
    """
    if not tokens:
        return 0
    best = 1
    for n in range(1, min(max_n, len(tokens) // 2) + 1):
        run = 0
        for i in range(len(tokens) - n):
            run = run + 1 if tokens[i] == tokens[i + n] else 0
            if run:
                best = max(best, run // n + 1)
    return best


def distinct_n(tokens: list[str], n: int = 2) -> float | None:
    """Distinct n-grams / n-grams of ``tokens``; None when there is no n-gram."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


@dataclass(frozen=True)
class Generation:
    """One generated answer: its text, and whether it ran out of tokens.

    Attributes:
        text: the decoded answer (special tokens stripped).
        hit_limit: it reached ``max_new_tokens`` without producing the end-of-turn token.
    """

    text: str
    hit_limit: bool


@dataclass(frozen=True)
class Repetition:
    """The repetition numbers of one answer."""

    longest_run: int
    distinct2: float | None
    hit_limit: bool

    @property
    def severity(self) -> tuple[float, ...]:
        """Sort key, worst last: longest run, then running out of tokens, then low distinct-2."""
        d2 = 1.0 if self.distinct2 is None else self.distinct2
        return (self.longest_run, float(self.hit_limit), -d2)


def measure(gen: Generation) -> Repetition:
    """The repetition numbers of one answer."""
    toks = words(gen.text)
    return Repetition(longest_run(toks), distinct_n(toks, 2), gen.hit_limit)


def summarize(gens: Iterable[Generation]) -> dict[str, float]:
    """``limit_share``, ``longest_run``, ``longest_run_mean`` and ``distinct2`` over ``gens``.

    ``distinct2`` is left out when no output has two words (e.g. every answer empty). Empty input
    gives an empty dict.
    """
    reps = [measure(g) for g in gens]
    if not reps:
        return {}
    out = {
        "limit_share": sum(r.hit_limit for r in reps) / len(reps),
        "longest_run": float(max(r.longest_run for r in reps)),
        "longest_run_mean": sum(r.longest_run for r in reps) / len(reps),
    }
    d2 = [r.distinct2 for r in reps if r.distinct2 is not None]
    if d2:
        out["distinct2"] = sum(d2) / len(d2)
    return out


def hit_limit(new_token_ids: list[int], max_new_tokens: int, end_of_turn: int) -> bool:
    """Whether a generation used every allowed token without producing ``end_of_turn``."""
    return len(new_token_ids) >= max_new_tokens and end_of_turn not in new_token_ids


METRICS = ("limit_share", "longest_run", "distinct2")


@dataclass
class Rise:
    """A repetition metric that got worse between the first and the last logged value."""

    key: str
    first_step: int
    first: float
    last_step: int
    last: float


def rises(series: dict[str, list[tuple[int, float]]]) -> list[Rise]:
    """Repetition metrics that rose against their first logged value (step 0 in a fresh run).

    Args:
        series: metric key (ending in ``/limit_share``, ``/longest_run`` or ``/distinct2``) ->
            ``[(step, value), ...]`` in step order.

    Thresholds (absolute, so that one noisy answer among a handful does not trip them):
    ``limit_share`` up by at least 0.25 to at least 0.25; ``longest_run`` at least 4 copies and at
    least double its first value; ``distinct2`` down by at least 0.2.
    """
    out = []
    for key, points in series.items():
        pts = [(s, v) for s, v in points if math.isfinite(v)]
        if len(pts) < 2:
            continue
        (s0, v0), (s1, v1) = pts[0], pts[-1]
        metric = key.rsplit("/", 1)[-1]
        tol = 1e-9  # thresholds are inclusive: 1.0 - 0.8 is 0.19999999999999996 in floats
        if metric == "limit_share":
            bad = v1 - v0 >= 0.25 - tol and v1 >= 0.25 - tol
        elif metric == "longest_run":
            bad = v1 >= 4 and v1 >= 2 * max(v0, 1.0)
        elif metric == "distinct2":
            bad = v0 - v1 >= 0.2 - tol
        else:
            continue
        if bad:
            out.append(Rise(key, int(s0), v0, int(s1), v1))
    return out


def worst(rows: list[dict[str, Any]], text_key: str) -> tuple[dict[str, Any], Repetition] | None:
    """The row whose ``text_key`` answer repeats most (``hit_limit`` read from the row when logged)."""
    scored = [
        (measure(Generation(str(r.get(text_key, "")), bool(r.get("hit_limit", False)))), r) for r in rows
    ]
    if not scored:
        return None
    rep, row = max(scored, key=lambda x: x[0].severity)
    return row, rep
