"""Pair-atomic packing: whole preference pairs laid one after another in a row, no padding.

Each pair is ``[prefix | chosen suffix | rejected suffix]`` (the shared-prompt layout of
``mpo.shared_prompt``): the prefix is the two sequences' common tokens (the prompt with its image
tokens and ``<|im_start|>assistant\\n``), computed once. A packed micro-batch is one row holding as
many pairs as fit in ``data.max_tokens_per_batch`` tokens; attention is block-diagonal over pairs
(``mpo.pair_attention``), so each pair's log-probs are those of its own unpacked sequences.

- ``mpo.sampler.packed_lengths``: tokens of each pair in that layout (from the length index).
- ``pack_bins``: best-fit decreasing (Johnson 1974; ≤ 11/9·OPT + 6/9 bins) within windows of a
  seeded random order, so rows fill well on skewed lengths and the result depends only on the seed.
- ``PackedBatchSampler``: the training batches: bins formed once per run, their order reshuffled
  every epoch with the largest first (an out-of-memory shows at step 1), indices tagged with the
  epoch (``EpochTaggedSampler``'s contract), one share of the batches per rank.
- ``pack_pairs``: the packed tensors of encoded pairs, and where each trained token is scored.

The groups stay the same across epochs (their order changes), as in packing that is done once per
data set (TRL's ``pack_dataset``, ms-swift's packing); it keeps the number of batches per epoch
fixed, which the Trainer's resume arithmetic (step → epoch, batches to skip) relies on.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler

from mpo.data.template import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Columns of the ``pairs`` table of a packed batch, and of its ``scored`` table.
PAIR_COLUMNS = ("row", "start", "prefix", "chosen", "rejected")  # suffix lengths for chosen/rejected
SCORED_COLUMNS = ("row", "col", "target", "owner")  # owner: k = chosen of pair k, K + k = its rejected


def pack_bins(
    lengths: Sequence[int], budget: int, order: Sequence[int], window: int = 4096
) -> list[list[int]]:
    """Indices of ``order`` grouped into bins of at most ``budget`` total length (a longer item
    gets a bin alone), best-fit decreasing within consecutive windows of ``order``.

    Best fit: each item (longest first) goes to the bin whose free space is the smallest that
    still holds it. Ties keep ``order``'s order, so the result is a function of the inputs.
    """
    bins: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: -int(lengths[i]))
        local: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (free tokens, bin number), sorted
        for i in chunk:
            need = int(lengths[i])
            j = bisect.bisect_left(free, (need, -1))
            if j < len(free):
                space, b = free.pop(j)
                local[b].append(i)
                if space - need > 0:
                    bisect.insort(free, (space - need, b))
            else:
                local.append([i])
                if budget - need > 0:
                    bisect.insort(free, (budget - need, len(local) - 1))
        bins += local
    return bins


class BinOrder(torch.utils.data.Sampler[int]):
    """Bin numbers in a seeded random order per epoch, bin ``first`` always first."""

    def __init__(self, num_bins: int, first: int, seed: int):
        self.num_bins, self.first, self.seed, self.epoch = num_bins, first, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        order = torch.randperm(self.num_bins, generator=g).tolist()
        order.remove(self.first)
        return iter([self.first, *order])

    def __len__(self) -> int:
        return self.num_bins


class PackedBatchSampler(BatchRebalanceSampler):
    """Micro-batches of pair indices under a token budget, for ``transformers.Trainer``.

    Subclasses transformers' ``BatchRebalanceSampler`` only for its type: the Trainer (5.23,
    ``_get_dataloader``) passes a sampler of that type to the DataLoader as its ``batch_sampler``
    and keeps accelerate from sharding it again, since it is rank-aware. None of its methods are used.

    Args:
        lengths: ``(N,)`` estimated packed tokens per pair (``mpo.sampler.packed_lengths``).
        max_tokens: the budget of one micro-batch.
        seed: bins and every epoch's order depend on it (and the epoch) only.
        num_replicas, rank: this process's share: batch ``k`` of an epoch goes to rank
            ``k mod num_replicas``, the list extended by its first batches so every rank gets as many.
    """

    def __init__(self, lengths, max_tokens: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.num_samples, self.max_tokens = len(self.lengths), max_tokens
        self.num_replicas, self.rank = num_replicas, rank
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
        self.bins = pack_bins(self.lengths, max_tokens, order)
        over = self.lengths > max_tokens
        if over.any():
            logger.warning(
                "%d pairs are longer than data.max_tokens_per_batch=%d (the longest: %d tokens); each is a "
                "micro-batch of its own", int(over.sum()), max_tokens, int(self.lengths.max()),
            )  # fmt: skip
        totals = [int(self.lengths[b].sum()) for b in self.bins]
        first = max(range(len(self.bins)), key=totals.__getitem__) if self.bins else 0
        self.sampler = BinOrder(len(self.bins), first, seed)  # accelerate calls its set_epoch too

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def fill(self) -> float:
        """Estimated tokens over the budget of all bins: how full the rows are."""
        return float(self.lengths.sum()) / (self.max_tokens * max(len(self.bins), 1))

    def _rank_batches(self, order: list[int]) -> list[int]:
        per_rank = math.ceil(len(order) / self.num_replicas)
        order = order + order[: per_rank * self.num_replicas - len(order)]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        base = self.epoch * self.num_samples
        for b in self._rank_batches(list(self.sampler)):
            yield [base + i for i in self.bins[b]]

    def __len__(self) -> int:
        return math.ceil(len(self.bins) / self.num_replicas)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D token tensors."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def _scored(row: int, cols: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, owner: int) -> torch.Tensor:
    """``(len(t), 4)`` rows of the scored table: the hidden state at ``cols`` predicts ``labels[t + 1]``."""
    n = len(t)
    return torch.stack([torch.full((n,), row), cols, labels[t + 1], torch.full((n,), owner)], dim=1)


def pack_pairs(
    pairs: Sequence[tuple[torch.Tensor, ...]], pad_token_id: int, rows: Sequence[int] | None = None
) -> dict:
    """The packed layout of encoded pairs.

    Args:
        pairs: per pair ``(chosen_ids, chosen_labels, rejected_ids, rejected_labels)``, 1-D long,
            labels ``IGNORE_INDEX`` where untrained.
        rows: the row of each pair, non-decreasing (default: every pair in row 0).

    Returns:
        ``input_ids``, ``position_ids``, ``attention_mask`` (1 on tokens, 0 on a row's padded
        tail): ``(R, P)``. ``pairs``: ``(K, 5)`` row, start, prefix, chosen suffix, rejected
        suffix lengths. ``scored``: ``(S, 4)`` row, column, target token, owner sequence (``k`` the
        chosen answer of pair ``k``, ``K + k`` its rejected one) of every trained token. Positions
        restart at 0 for each pair and at the prefix length for the rejected suffix, so each token
        has the position it has in its own sequence.
    """
    rows = list(rows) if rows is not None else [0] * len(pairs)
    if any(b < a for a, b in zip(rows, rows[1:])):
        raise ValueError("pairs must come row by row (rows non-decreasing)")
    k_total = len(pairs)
    spans = []
    for chosen, _, rejected, _ in pairs:
        p = common_prefix(chosen, rejected)
        spans.append((p, len(chosen), len(rejected)))
    used = [0] * (rows[-1] + 1 if rows else 1)
    for r, (p, lc, lr) in zip(rows, spans):
        used[r] += lc + lr - p
    width = max(used)
    input_ids = torch.full((len(used), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(used), width), dtype=torch.long)
    attention_mask = torch.zeros((len(used), width), dtype=torch.long)
    table, scored, cursor = [], [], [0] * len(used)
    for k, (r, (p, lc, lr), (chosen, c_labels, rejected, r_labels)) in enumerate(zip(rows, spans, pairs)):
        s, n = cursor[r], lc + lr - p
        input_ids[r, s : s + lc], input_ids[r, s + lc : s + n] = chosen, rejected[p:]
        position_ids[r, s : s + lc], position_ids[r, s + lc : s + n] = torch.arange(lc), torch.arange(p, lr)
        attention_mask[r, s : s + n] = 1
        table.append((r, s, p, lc - p, lr - p))
        t = (c_labels[1:] != IGNORE_INDEX).nonzero().squeeze(-1)
        scored.append(_scored(r, s + t, c_labels, t, k))
        t = (r_labels[1:] != IGNORE_INDEX).nonzero().squeeze(-1)
        # A rejected position inside the prefix is the chosen sequence's position too.
        scored.append(_scored(r, torch.where(t < p, s + t, s + lc + t - p), r_labels, t, k_total + k))
        cursor[r] += n
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "pairs": torch.tensor(table, dtype=torch.long).reshape(-1, len(PAIR_COLUMNS)),
        "scored": torch.cat(scored).long() if scored else torch.zeros((0, 4), dtype=torch.long),
    }


def unpack_plain_batch(batch: dict) -> list[tuple[torch.Tensor, ...]]:
    """The pairs of a ``PairCollator`` batch (``(2B, L)``, right padded), unpadded, for ``pack_pairs``."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.shape[0] % 2:
        raise ValueError(f"a pair batch has an even number of rows, got {ids.shape[0]}")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("the shared-prompt forward expects right padding (PairCollator's layout)")
    half = ids.shape[0] // 2
    lengths = mask.sum(-1).tolist()
    out = []
    for k in range(half):
        lc, lr = lengths[k], lengths[half + k]
        out.append((ids[k, :lc], labels[k, :lc], ids[half + k, :lr], labels[half + k, :lr]))
    return out
