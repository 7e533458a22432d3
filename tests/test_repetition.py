"""The repetition alarm's numbers on hand-worked outputs, against a brute force, and its rise rule."""

from __future__ import annotations

import random

import pytest

from mpo.repetition import (
    Generation,
    distinct_n,
    hit_limit,
    longest_run,
    measure,
    rises,
    summarize,
    words,
    worst,
)


def test_words_split_punctuation_and_cjk():
    assert words("The shape is RED.") == ["the", "shape", "is", "red", "."]
    assert words("图片里有猫。ok") == ["图", "片", "里", "有", "猫", "。", "ok"]
    assert words(" \n\n ") == []


@pytest.mark.parametrize(
    "text,run",
    [
        ("", 0),
        ("red", 1),
        ("The shape is red.", 1),
        ("red red red", 3),
        ("a b a b a b", 3),
        ("x y x y x", 2),  # whole copies only: "x y" twice, then a partial one
        ("the cat sat. the cat sat.", 2),  # period 4 words ("the cat sat .")
        ("a a b a a b a a b", 3),  # "a a b" three times beats "a a" twice
    ],
)
def test_longest_run_hand_worked(text, run):
    assert longest_run(words(text)) == run


def _brute_longest_run(tokens: list[str], max_n: int) -> int:
    """Every start, every period: count whole copies by slicing (independent of the diff trick)."""
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        for i in range(len(tokens)):
            copies = 1
            while (
                tokens[i + copies * n : i + (copies + 1) * n] == tokens[i : i + n]
                and len(tokens[i + copies * n : i + (copies + 1) * n]) == n
            ):
                copies += 1
            if len(tokens[i : i + n]) == n:
                best = max(best, copies)
    return best


def test_longest_run_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.choice("abc") for _ in range(rng.randint(0, 24))]
        if rng.random() < 0.5:  # splice in a loop
            unit = [rng.choice("abcd") for _ in range(rng.randint(1, 4))]
            at = rng.randint(0, len(tokens))
            tokens[at:at] = unit * rng.randint(2, 5)
        assert longest_run(tokens, 8) == _brute_longest_run(tokens, 8), tokens


def test_distinct2_hand_worked():
    assert distinct_n(words("a b a b a b")) == pytest.approx(2 / 5)  # ab ba ab ba ab
    assert distinct_n(words("The shape is red.")) == 1.0
    assert distinct_n(words("red")) is None


def test_hit_limit():
    assert hit_limit([5, 6, 7], 3, end_of_turn=9)
    assert not hit_limit([5, 9], 3, end_of_turn=9)
    assert not hit_limit([5, 6, 9], 3, end_of_turn=9)  # the end-of-turn token came as the last one
    assert not hit_limit([5, 6], 3, end_of_turn=9)


def test_summary_hand_worked():
    gens = [
        Generation("red red red red", hit_limit=True),
        Generation("The shape is red.", hit_limit=False),
        Generation("", hit_limit=True),
    ]
    got = summarize(gens)
    assert got["limit_share"] == pytest.approx(2 / 3)
    assert got["longest_run"] == 4.0
    assert got["longest_run_mean"] == pytest.approx((4 + 1 + 0) / 3)
    # distinct-2: "red red red red" has 3 bigrams, 1 distinct; the sentence 4 of 4; "" has none.
    assert got["distinct2"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert summarize([]) == {}
    assert "distinct2" not in summarize([Generation("\n\n", True)])


def test_repetitive_outputs_trip_the_alarm_healthy_ones_do_not():
    healthy = [
        Generation("The shape is green.", False),
        Generation("The background is black.", False),
        Generation("A small red circle on a white background.", False),
    ]
    looping = [
        Generation("The shape is green. The shape is green. The shape is green. The shape is", True),
        Generation("black black black black black black black black", True),
        Generation("The background is black.", False),
    ]
    h, r = summarize(healthy), summarize(looping)
    assert h["limit_share"] == 0 and h["longest_run"] == 1 and h["distinct2"] == 1.0
    assert r["limit_share"] == pytest.approx(2 / 3) and r["longest_run"] == 8  # "black" x 8
    series = {f"samples/{k}": [(0, h[k]), (200, r[k])] for k in ("limit_share", "longest_run", "distinct2")}
    flagged = {x.key for x in rises(series)}
    # distinct-2: 5 of 17 bigrams, 1 of 7, 4 of 4: (5/17 + 1/7 + 1) / 3 = 0.479, down 0.52 from 1.0
    assert r["distinct2"] == pytest.approx((5 / 17 + 1 / 7 + 1) / 3)
    assert flagged == {"samples/limit_share", "samples/longest_run", "samples/distinct2"}
    # ... and nothing when the run stays healthy, nor on the first value alone.
    assert rises({f"samples/{k}": [(0, h[k]), (200, h[k])] for k in h}) == []
    assert rises({"samples/limit_share": [(0, 1.0)]}) == []
    row, rep = worst([{"generated": g.text, "hit_limit": g.hit_limit} for g in looping], "generated")
    assert row["generated"].startswith("black") and rep.longest_run == 8


@pytest.mark.parametrize(
    "key,first,last,flag",
    [
        ("limit_share", 0.0, 0.25, True),
        ("limit_share", 0.1, 0.3, False),  # up only 0.2
        ("limit_share", 1.0, 1.0, False),  # an untrained model already runs out: no rise
        ("longest_run", 1.0, 4.0, True),
        ("longest_run", 3.0, 5.0, False),  # not double
        ("longest_run", 1.0, 3.0, False),  # under 4 copies
        ("distinct2", 1.0, 0.8, True),
        ("distinct2", 0.9, 0.8, False),
        ("longest_run_mean", 1.0, 9.0, False),  # not an alarm metric
    ],
)
def test_rise_thresholds(key, first, last, flag):
    assert bool(rises({f"bench/x/{key}": [(0, first), (10, float("nan")), (20, last)]})) is flag


def test_measure_orders_by_severity():
    a, b = measure(Generation("a b a b", False)), measure(Generation("a b a b", True))
    assert b.severity > a.severity and a.longest_run == 2 and a.distinct2 == pytest.approx(2 / 3)
