"""Batching preference pairs, one set of tiles per pair: padded rows (chosen rows first, then
rejected rows) or one packed row of whole pairs (``mpo.packing``)."""

from __future__ import annotations

from typing import Any

import torch

from mpo.data.events import DataEvents
from mpo.data.template import IGNORE_INDEX
from mpo.packing import pack_pairs

Item = tuple[dict[str, Any] | None, DataEvents]


class PairCollator:
    """Pads pairs into one batch of ``2 * B`` sequences; returns ``(batch, events)``.

    Input: dataset items ``(pair or None, DataEvents)``; skipped pairs (None) are dropped.

    Output batch:
        input_ids, attention_mask, labels: ``(2B, L)``; rows ``[0, B)`` are the chosen answers,
            rows ``[B, 2B)`` the rejected ones, in the same pair order; right padding.
        pixel_values: ``(sum of tiles, 3, S, S)`` in pair order, each pair's tiles once (both
            answers reuse them), or absent when no pair has an image.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` float64, when the items carry them.
        num_pairs: B (0 when every pair of the batch was skipped: the batch holds nothing else).
    Output events: the items' events summed.
    """

    def __init__(self, pad_token_id: int, ignore_index: int = IGNORE_INDEX):
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index

    def __call__(self, items: list[Item]) -> tuple[dict[str, Any], DataEvents]:
        pairs = [pair for pair, _ in items if pair is not None]
        events = DataEvents.total(ev for _, ev in items)
        if not pairs:
            return {"num_pairs": 0}, events
        seqs = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
        labs = [p["chosen_labels"] for p in pairs] + [p["rejected_labels"] for p in pairs]
        length = max(len(s) for s in seqs)
        n = len(seqs)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), self.ignore_index, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        for row, (s, lab) in enumerate(zip(seqs, labs)):
            input_ids[row, : len(s)] = s
            labels[row, : len(lab)] = torch.where(lab == IGNORE_INDEX, self.ignore_index, lab)
            attention_mask[row, : len(s)] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "num_pairs": len(pairs),
        }
        return {**batch, **pair_extras(pairs)}, events


def pair_extras(pairs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """What a batch carries per pair besides tokens: ``pixel_values`` (every pair's tiles once,
    in pair order; absent without images) and cached reference log-probs ``(B,)`` float64."""
    out = {}
    pixels = [p["pixel_values"] for p in pairs if p.get("pixel_values") is not None]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in pairs[0]:
            out[key] = torch.tensor([p[key] for p in pairs], dtype=torch.float64)
    return out


class PackedPairCollator:
    """Packs pairs into one row, ``[prefix | chosen suffix | rejected suffix]`` after each other,
    no padding (``mpo.packing.pack_pairs``); returns ``(batch, events)``.

    Output batch: ``input_ids``, ``position_ids``, ``attention_mask`` ``(1, P)``; ``pairs``
    ``(K, 5)`` and ``scored`` ``(S, 4)`` (see ``pack_pairs``); ``pixel_values`` and reference
    log-probs as ``PairCollator``'s; ``num_pairs``: K (0 when every pair was skipped: the batch
    holds nothing else). Output events: the items' events summed.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[Item]) -> tuple[dict[str, Any], DataEvents]:
        pairs = [pair for pair, _ in items if pair is not None]
        events = DataEvents.total(ev for _, ev in items)
        if not pairs:
            return {"num_pairs": 0}, events
        keys = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
        batch = pack_pairs([tuple(p[k] for k in keys) for p in pairs], self.pad_token_id)
        return {**batch, "num_pairs": len(pairs), **pair_extras(pairs)}, events
