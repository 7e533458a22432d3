"""Length-grouped batching for preference pairs.

A micro-batch is padded to its longest sequence, and with InternVL's dynamic tiling a pair's
length runs from a few hundred tokens (one tile) to over 3,000 (12 tiles + thumbnail), so random
batches waste most of their compute on padding. transformers' ``LengthGroupedSampler`` looks for
an ``input_ids`` column, which preference data does not have (the peers crash there); here the
length of a pair is its longer sequence, read from the data set's length index
(``mpo.data.lengths``: computed once per annotation file, in parallel, and cached), capped at
``data.max_length``.

A video's frames are estimated as the encoder's frame budget would choose them (the most that leave
the longer answer whole inside ``data.max_length``, at most ``video_max_frames`` and the frame
count the container's header announces), without demuxing the file.

The grouping follows ``get_length_grouped_indices`` in transformers (``trainer_pt_utils``): shuffle
with a seeded generator, cut into mega-batches of ``mega_batch_mult x batch_size``, sort each by
length, so consecutive ``batch_size`` slices hold similar lengths while the order stays random at
the mega-batch scale. The longest batch goes first so an out-of-memory shows at step 1. It runs on
numpy arrays (8 bytes per pair), not Python lists, so millions of pairs cost tens of megabytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from mpo.data.lengths import length_index


def pair_lengths(pairs) -> np.ndarray:
    """Tokens of each pair's longer sequence, capped at ``data.max_length``, int32 ``(N,)``, for a
    ``PairDataset``, from its length index (built and cached on first use, reused after)."""
    return length_index(pairs).pair_tokens(pairs.cfg.max_length)


def packed_lengths(pairs) -> np.ndarray:
    """Tokens of each pair in the packed layout ``[prefix | chosen | rejected]`` (``mpo.packing``),
    int32 ``(N,)``: an upper bound (``LengthIndex.packed_tokens``), from the same length index."""
    prefix = len(pairs.encoder.template.prefix_ids)
    return length_index(pairs).packed_tokens(pairs.cfg.max_length, prefix)


def length_grouped_indices(
    lengths: np.ndarray, batch_size: int, generator: torch.Generator, mega_batch_mult: int = 50
) -> np.ndarray:
    """A permutation of ``range(len(lengths))``, int64, whose consecutive ``batch_size`` slices have
    similar lengths. Within a mega-batch, equal lengths keep their shuffled order (a stable sort)."""
    n = len(lengths)
    order = torch.randperm(n, generator=generator).numpy()
    if n == 0:
        return order
    lengths = np.asarray(lengths).astype(np.int64, copy=False)
    mega = max(batch_size, batch_size * mega_batch_mult)
    for lo in range(0, n, mega):
        group = order[lo : lo + mega]
        order[lo : lo + mega] = group[np.argsort(-lengths[group], kind="stable")]
    # mega is a multiple of batch_size, so the batches are the consecutive slices of the order.
    starts = np.arange(0, n, batch_size)
    longest = int(np.argmax(lengths[order[starts]]))  # a sorted batch's first pair is its longest
    if longest == 0:
        return order
    lo, hi = int(starts[longest]), min(n, int(starts[longest]) + batch_size)
    return np.concatenate([order[lo:hi], order[batch_size:lo], order[:batch_size], order[hi:]])


class EpochTaggedSampler(torch.utils.data.Sampler[int]):
    """Yields ``epoch·N + i`` for each index ``i`` of ``inner``: the dataset learns the epoch from
    the index (``PairDataset`` takes ``divmod(index, N)``), so per-sample random views are seeded
    by (sample, epoch) in DataLoader workers too and a resumed run draws the same views.

    ``set_epoch`` (called by the Trainer at every epoch, resumed ones included) is passed on.
    """

    def __init__(self, inner: torch.utils.data.Sampler, num_samples: int):
        self.inner = inner
        self.num_samples = num_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.num_samples
        return (base + int(i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class LengthGroupedPairSampler(torch.utils.data.Sampler[int]):
    """Seeded, per-epoch deterministic sampler that puts pairs of similar length in a micro-batch.

    Args:
        lengths: ``(N,)`` tokens per pair (``pair_lengths``); a memory-mapped array is not copied.
        batch_size: pairs per micro-batch on one process.
        seed: the order depends only on ``seed`` and the epoch (``set_epoch``).
        num_replicas, rank: leave at 1/0 under ``transformers.Trainer`` (accelerate then hands
            whole consecutive batches to each process, so every process still gets grouped
            batches); set them for a plain ``DataLoader`` loop, where this sampler yields only
            this rank's batches (batch k goes to rank k mod num_replicas, the list padded by
            repeating its start so every rank gets the same number).
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        mega_batch_mult: int = 50,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return length_grouped_indices(self.lengths, self.batch_size, g, self.mega_batch_mult)

    def _rank_batches(self, order) -> list:
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        per_rank = math.ceil(len(batches) / self.num_replicas)
        batches += batches[: per_rank * self.num_replicas - len(batches)]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.num_replicas == 1:
            return (int(i) for i in order)  # lazily: a list of Python ints costs ~36 bytes per pair
        return iter([int(i) for b in self._rank_batches(order) for i in b])

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return len(self.lengths)
        return sum(len(b) for b in self._rank_batches(list(range(len(self.lengths)))))
