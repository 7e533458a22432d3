"""Data events: pairs read, skipped (by reason) and truncated, travelling as return values.

Encoding a line returns ``(pair or None, DataEvents)``; the collator returns ``(batch, events)``
with its items' events summed; ``MPOTrainer`` adds up the batches it actually trains on, sums
over ranks, and keeps the total in every checkpoint. The run's skip report is then exact with
DataLoader workers (which read the data in other processes), several ranks and resumes. Counts
are per pass: a bad line met in three epochs counts three times.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXAMPLES_KEPT = 20  # skip messages kept per reason (a report, not a log)


@dataclass
class DataEvents:
    """Pairs read, bad ones, skips by reason, truncated responses, a few skip messages."""

    seen: int = 0
    bad: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def skip(cls, reason: str, message: str, bad: bool) -> DataEvents:
        """One pair read and skipped for ``reason``; ``bad`` unless it was a length-policy skip."""
        return cls(seen=1, bad=int(bad), skipped=Counter({reason: 1}), examples={reason: [message]})

    def add(self, other: DataEvents | dict[str, Any] | None) -> DataEvents:
        if other is None:
            return self
        if isinstance(other, dict):
            other = DataEvents.from_dict(other)
        self.seen += other.seen
        self.bad += other.bad
        self.skipped.update(other.skipped)
        self.truncated.update(other.truncated)
        for reason, msgs in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(msgs[: max(EXAMPLES_KEPT - len(kept), 0)])
        return self

    @classmethod
    def total(cls, parts) -> DataEvents:
        """The sum of ``parts`` (DataEvents or their dicts; None entries count as nothing)."""
        out = cls()
        for part in parts:
            out.add(part)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "bad": self.bad,
            "skipped": dict(self.skipped),
            "truncated": dict(self.truncated),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataEvents:
        return cls(
            seen=int(d.get("seen", 0)),
            bad=int(d.get("bad", 0)),
            skipped=Counter(d.get("skipped", {})),
            truncated=Counter(d.get("truncated", {})),
            examples={k: list(v) for k, v in d.get("examples", {}).items()},
        )

    def first_examples(self, n: int = 3) -> list[str]:
        return [m for msgs in self.examples.values() for m in msgs][:n]

    def bad_fraction_problem(self, limit: float, min_seen: int = 0) -> str | None:
        """Why the bad share is over ``limit`` (judged once ``min_seen`` pairs were read), or None.

        ``min_seen`` keeps one early bad line from ending a run: the share is judged after
        ``min(len(dataset), 100)`` pairs during training and after a full pass in ``mpo data check``.
        """
        if self.seen == 0 or self.seen < min_seen or self.bad <= limit * self.seen:
            return None
        return (
            f"{self.bad} of {self.seen} samples are bad ({self.bad / self.seen:.2%}), over "
            f"data.max_bad_fraction={limit}; skips by reason: {dict(self.skipped)}; first: {self.first_examples()}"
        )


def gather_events(events: DataEvents) -> DataEvents:
    """The sum over ranks (every rank must call it); ``events`` itself when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return events
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, events.to_dict())
    return DataEvents.total(parts)


def skip_report(meta_path: str | Path, num_samples: int, max_bad_fraction: float, events: DataEvents) -> dict:
    """The ``data_skips.json`` record of one pass (or a whole run) over ``meta_path``."""
    return {
        "meta_path": str(meta_path),
        "samples": num_samples,
        "seen": events.seen,
        "bad": events.bad,
        "skipped": dict(events.skipped),
        "truncated_responses": dict(events.truncated),
        "max_bad_fraction": max_bad_fraction,
        "examples": events.examples,
    }


def write_skip_report(out_dir: str | Path, name: str, report: dict) -> Path:
    """Write ``report`` (``skip_report``) as ``out_dir/name``; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return path
