"""Data events (skipped and truncated pairs) that travel with the batches to the trainer.

A ``PairDataset`` counts skips and truncations in the process that reads the data. Under
``transformers.Trainer`` that is a DataLoader worker (``dataloader_num_workers > 0``) on each
rank, so the main process's own counters would miss most of them. ``RecordingDataset`` attaches
each pair's events to the item, ``PairCollator`` sums them per batch (``batch["data_events"]``),
and ``MPOTrainer`` adds up the batches it actually trains on, sums over ranks, and keeps the total
in every checkpoint: the run's skip report is then exact with workers, several ranks and resumes.
Counts are per pass: a bad line met in three epochs counts three times.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

EVENTS_KEY = "data_events"
EXAMPLES_KEPT = 20  # skip messages kept per reason (a report, not a log)


@dataclass
class DataEvents:
    """Pairs read, bad ones, skips by reason, truncated responses, a few skip messages."""

    seen: int = 0
    bad: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

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


def is_skipped(item: dict[str, Any] | None) -> bool:
    """A dataset item that holds no pair: None, or only the events of a skipped one."""
    return item is None or "chosen_input_ids" not in item


def pair_dataset_of(ds):
    """The ``PairDataset`` under any wrappers (reference cache, recording): they keep it as ``pairs``."""
    while hasattr(ds, "pairs") and not hasattr(ds, "encoder"):
        ds = ds.pairs
    return ds


class RecordingDataset(torch.utils.data.Dataset):
    """Wraps a (possibly reference-cached) PairDataset: every item carries its own ``EVENTS_KEY``.

    A skipped pair becomes ``{EVENTS_KEY: {...}}`` (no tensors; the collator drops it after
    counting), a kept one gets ``EVENTS_KEY`` added. Other attributes come from the wrapped dataset.
    """

    def __init__(self, pairs):
        self.pairs = pairs
        self._base = pair_dataset_of(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getattr__(self, name: str):
        if name in ("pairs", "_base"):
            raise AttributeError(name)
        return getattr(self.pairs, name)

    def __getitem__(self, i: int) -> dict[str, Any]:
        base = self._base
        bad, skipped, truncated = base.bad, Counter(base.skipped), Counter(base.truncated)
        item = self.pairs[i]
        events = DataEvents(
            seen=1,
            bad=base.bad - bad,
            skipped=Counter(base.skipped) - skipped,
            truncated=Counter(base.truncated) - truncated,
        )
        if item is None:
            reason = next(iter(events.skipped), "invalid_sample")
            events.examples = {reason: [base.last_skip or ""]}
            return {EVENTS_KEY: events.to_dict()}
        return {**item, EVENTS_KEY: events.to_dict()}


def gather_events(events: DataEvents) -> DataEvents:
    """The sum over ranks (every rank must call it); ``events`` itself when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return events
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, events.to_dict())
    return DataEvents.total(parts)
