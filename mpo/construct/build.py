"""Sampled answers -> MPO preference pairs, written as MMPR data, with a report of what was dropped.

Correctness pairs (Wang et al. 2024, arXiv:2411.10442, §3.1, for prompts with a clear answer):
each sampled answer is judged against the prompt's ``answer_gt`` (``mpo.construct.judge``); a pair
is a correct answer (chosen) and a wrong one (rejected). Identical answers count once; empty
answers are left out (training refuses them) and counted. A prompt
gives at most ``max_pairs_per_prompt`` pairs, chosen and rejected answers used as evenly as possible
(pair ``k`` is the ``k``-th correct with the ``k``-th wrong, both cycling, in sampling order; then
the remaining combinations), so no answer dominates. A prompt whose answers all agree (all right,
all wrong) gives none, and the report says so.

Answers from which no final answer could be read are counted as extraction failures and, by
default, used as rejected answers (an answer that never states a result is a worse answer);
``unanswered="drop"`` leaves them out.

The output folder holds ``meta.json`` (one MMPR entry per dataset that gave pairs, rooted at the
prompts' own root, so images are not copied), ``<dataset>.jsonl`` (the prompt's fields plus
``chosen``, ``rejected`` and ``prompt_key``) and ``report.json``; ``mpo data check`` reads it as is.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpo.construct.judge import JudgeFn, Verdict, as_verdict
from mpo.data.mmpr import DataError
from mpo.files import write_atomic

EXAMPLES = 5  # extraction failures quoted in the report, per dataset


@dataclass
class DatasetReport:
    """What happened to one dataset's prompts."""

    prompts: int = 0
    samples: int = 0
    duplicate_samples: int = 0
    empty_samples: int = 0
    correct: int = 0
    wrong: int = 0
    extraction_failures: int = 0
    pairs: int = 0
    prompts_with_pairs: int = 0
    no_pair: Counter = field(default_factory=Counter)  # reason -> prompts
    failure_examples: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("no_pair", "failure_examples")}
        return out | {
            "no_pair": dict(sorted(self.no_pair.items())),
            "failure_examples": self.failure_examples,
        }


def unique_texts(samples: Iterable[dict[str, Any]], report: DatasetReport) -> list[str]:
    """Distinct non-empty answer texts in sampling order (compared after stripping); repeats and
    empty answers (training refuses an empty answer) are counted in ``report``."""
    seen: dict[str, None] = {}
    for s in samples:
        text = s["text"].strip()
        if not text:
            report.empty_samples += 1
        elif text in seen:
            report.duplicate_samples += 1
        else:
            seen[text] = None
    return list(seen)


def pick_pairs(chosen: list[str], rejected: list[str], cap: int) -> list[tuple[str, str]]:
    """Up to ``cap`` distinct (chosen, rejected) pairs, each answer used as evenly as possible."""
    nc, nw = len(chosen), len(rejected)
    order = [(k % nc, k % nw) for k in range(max(nc, nw))]  # distinct: k < lcm(nc, nw)
    used = set(order)
    order += [(i, j) for i in range(nc) for j in range(nw) if (i, j) not in used]
    return [(chosen[i], rejected[j]) for i, j in order[:cap]]


def pair_record(row: dict[str, Any], chosen: str, rejected: str) -> dict[str, Any]:
    """The prompt's own fields with the pair's answers (what a training line holds)."""
    record = {k: v for k, v in row["record"].items() if k not in ("chosen", "rejected")}
    return record | {"chosen": chosen, "rejected": rejected, "prompt_key": row["key"]}


@dataclass(frozen=True)
class CorrectnessSettings:
    """``mpo pairs build --correctness`` settings (see the module docstring)."""

    max_pairs_per_prompt: int = 3
    unanswered: str = "rejected"  # or "drop"


def correctness_pairs(
    row: dict[str, Any], judge: JudgeFn, settings: CorrectnessSettings, report: DatasetReport
) -> list[dict[str, Any]]:
    """One sampled prompt's pairs by correctness; counts go into ``report``."""
    report.prompts += 1
    if "samples" not in row:
        report.no_pair[f"not_sampled:{row.get('reason', 'error')}"] += 1
        return []
    samples = row["samples"]
    report.samples += len(samples)
    if row["record"].get("answer_gt") is None:
        report.no_pair["no_answer_gt"] += 1
        return []
    texts = unique_texts(samples, report)
    if not texts:
        report.no_pair["no_samples"] += 1
        return []
    right, wrong = [], []
    for text in texts:
        verdict: Verdict = as_verdict(judge(row["record"], text), row["key"])
        if verdict.extracted is None:
            report.extraction_failures += 1
            if len(report.failure_examples) < EXAMPLES:
                report.failure_examples.append({"prompt": row["key"], "answer": text[:300]})
            if settings.unanswered == "drop":
                continue
        if verdict.correct:
            right.append(text)
        else:
            wrong.append(text)
    report.correct += len(right)
    report.wrong += len(wrong)
    if not right or not wrong:
        report.no_pair["all_wrong" if not right else "all_correct"] += 1
        return []
    pairs = [pair_record(row, c, r) for c, r in pick_pairs(right, wrong, settings.max_pairs_per_prompt)]
    report.pairs += len(pairs)
    report.prompts_with_pairs += 1
    return pairs


def sorted_rows(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Sampled prompts in prompts-file order, whatever the shard they were written to."""
    return sorted(rows.values(), key=lambda r: r["index"])


def write_pairs(
    out_dir: Path,
    rows: list[dict[str, Any]],
    make_pairs: Callable[[dict[str, Any], DatasetReport], list[dict]],
    reports: dict[str, DatasetReport] | None = None,
) -> dict[str, Any]:
    """Build every prompt's pairs, write ``meta.json``, ``<dataset>.jsonl`` and ``report.json``.

    ``make_pairs(row, report)`` gives one prompt's pairs and counts into its dataset's report;
    ``reports``: per-dataset counts made before (they are added to).

    Returns:
        The report: ``datasets`` (per dataset, :class:`DatasetReport` as a dict) and ``total``.

    Raises:
        DataError: when no prompt gave a pair (the report is written first).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {} if reports is None else reports
    lines: dict[str, list[str]] = {}
    sources: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = row["dataset"]
        report = reports.setdefault(name, DatasetReport())
        sources.setdefault(name, {"root": row["root"], "max_dynamic_patch": row.get("max_dynamic_patch")})
        if sources[name]["root"] != row["root"]:
            raise DataError(
                f"dataset {name!r}: prompts from two roots ({sources[name]['root']}, {row['root']})"
            )
        for pair in make_pairs(row, report):
            lines.setdefault(name, []).append(json.dumps(pair, ensure_ascii=False))
    meta = {}
    for name, pair_lines in lines.items():
        write_atomic(out_dir / f"{name}.jsonl", "\n".join(pair_lines) + "\n")
        entry: dict[str, Any] = {"root": sources[name]["root"], "annotation": f"{name}.jsonl"}
        if sources[name]["max_dynamic_patch"]:
            entry["max_dynamic_patch"] = sources[name]["max_dynamic_patch"]
        meta[name] = entry | {"repeat_time": 1, "length": len(pair_lines)}
    total = DatasetReport()
    for r in reports.values():
        for k in ("prompts", "samples", "duplicate_samples", "empty_samples", "correct", "wrong"):
            setattr(total, k, getattr(total, k) + getattr(r, k))
        total.extraction_failures += r.extraction_failures
        total.pairs += r.pairs
        total.prompts_with_pairs += r.prompts_with_pairs
        total.no_pair.update(r.no_pair)
    result = {
        "datasets": {name: r.as_dict() for name, r in reports.items()},
        "total": total.as_dict() | {"failure_examples": []},
        "meta": str(out_dir / "meta.json") if meta else None,
    }
    write_atomic(out_dir / "report.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    if not meta:
        raise DataError(f"no prompt gave a pair (see {out_dir / 'report.json'}): {dict(total.no_pair)}")
    write_atomic(out_dir / "meta.json", json.dumps(meta, indent=1) + "\n")
    return result


def format_report(report: dict[str, Any]) -> str:
    """The report as lines for a terminal: one per dataset, then the reasons prompts gave no pair."""
    out = []
    for name, r in [*report["datasets"].items(), ("total", report["total"])]:
        out.append(
            f"{name}: {r['prompts']} prompts, {r['samples']} samples ({r['duplicate_samples']} repeated, "
            f"{r['empty_samples']} empty), "
            f"distinct answers {r['correct']} right / {r['wrong']} wrong, {r['extraction_failures']} without "
            f"a readable answer -> {r['pairs']} pairs from {r['prompts_with_pairs']} prompts"
        )
        if r["no_pair"]:
            out.append("  no pair: " + ", ".join(f"{k} {v}" for k, v in r["no_pair"].items()))
        for ex in r["failure_examples"][:2]:
            out.append(f"  no answer read from {ex['prompt']}: {ex['answer'][:80]!r}")
    if report["meta"]:
        out.append(f"pairs: {report['meta']}")
    return "\n".join(out)
