"""Shared-prompt forward (each pair one row [prefix, chosen, rejected]) vs the plain path.

The float64 comparison of values and gradients, for this path and for packed rows, is in
tests/test_packing.py. Here: the layout of a plain batch, and text-only pairs in float32 with the
bound of tests/tolerances.py, |ΔL| ≤ C·ε32·|L| (a summed log-prob L is Σ of token log-probs ≤ 0).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import EPS32, C  # tests/ is on sys.path

from mpo.data.collate import PairCollator
from mpo.data.events import DataEvents
from mpo.logprobs import batch_logps
from mpo.shared_prompt import pack_plain_batch, packed_batch_logps


def test_plain_batch_packs_one_pair_per_row():
    # chosen = [1 2 3 4 5], rejected = [1 2 3 9 8 7] (+ padding to 6): shared prefix [1 2 3].
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 3, 9, 8, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 4, 5, -100], [-100, -100, -100, 9, 8, 7]])
    p = pack_plain_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, pad_token_id=0)
    assert p["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 8, 7]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert p["pairs"].tolist() == [[0, 0, 3, 2, 3]]
    # Chosen tokens 4, 5 predicted at columns 2, 3; rejected 9, 8, 7 at 2, 5, 6.
    assert p["scored"][:, 1].tolist() == [2, 3, 2, 5, 6] and p["scored"][:, 2].tolist() == [4, 5, 9, 8, 7]


def test_pack_plain_batch_refuses_left_padding():
    ids = torch.tensor([[0, 1, 2], [1, 2, 3]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="right padding"):
        pack_plain_batch({"input_ids": ids, "attention_mask": mask, "labels": ids}, 0)


def test_shared_prompt_text_only_pairs(tiny_model_dir, tokenizer):
    from mpo.model.loading import load_model

    model = load_model(str(tiny_model_dir))
    p = [10, 11, 12, 13]
    pairs = [
        {
            "chosen_input_ids": torch.tensor(p + [20, 21, 22]),
            "chosen_labels": torch.tensor([-100] * 4 + [20, 21, 22]),
            "rejected_input_ids": torch.tensor(p + [30]),
            "rejected_labels": torch.tensor([-100] * 4 + [30]),
            "pixel_values": None,
        },
        {
            "chosen_input_ids": torch.tensor([14, 15, 16]),
            "chosen_labels": torch.tensor([-100, 16, 16]),
            "rejected_input_ids": torch.tensor([14, 17, 18, 19, 40]),
            "rejected_labels": torch.tensor([-100, 17, 18, 19, 40]),
            "pixel_values": None,
        },
    ]
    items = [(pair, DataEvents(seen=1)) for pair in pairs]
    batch, _ = PairCollator(tokenizer.pad_token_id)(items)
    with torch.no_grad():
        got, want = packed_batch_logps(model, batch).logps, batch_logps(model, batch).logps
    assert ((got - want).abs() <= C * EPS32 * want.abs()).all(), (got, want)
