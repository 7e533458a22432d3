"""Shared-prompt forward (packed [prefix, chosen, rejected] rows, block mask) vs the plain path.

Tolerance: float32; per-sequence log-probs and every parameter gradient equal the plain path's to
atol 1e-5 (rtol 1e-5 / 1e-4), derived as in tests/test_logprobs.py. Masked keys get exactly zero attention weight, so in practice the
log-probs agree bit for bit on CPU (max difference 0.0 seen with sdpa and eager); the tolerance
leaves room for other kernels.
"""

from __future__ import annotations

import pytest
import torch
from test_logprobs import write_tiled_pairs

from mpo.data.collate import PairCollator
from mpo.data.events import DataEvents
from mpo.logprobs import batch_logps
from mpo.shared_prompt import pack_pairs, shared_prompt_batch_logps


def test_pack_pairs_hand_example():
    # chosen = [1 2 3 4 5], rejected = [1 2 3 9 8 7] (+ padding to 6): shared prefix [1 2 3].
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 3, 9, 8, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    p = pack_pairs(ids, mask, pad_token_id=0, dtype=torch.float32)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 9, 8, 7]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    allowed = (p.attention_mask[0, 0] == 0).int().tolist()
    assert allowed[2] == [1, 1, 1, 0, 0, 0, 0, 0]  # prefix: causal
    assert allowed[4] == [1, 1, 1, 1, 1, 0, 0, 0]  # chosen suffix: prefix + itself
    assert allowed[6] == [1, 1, 1, 0, 0, 1, 1, 0]  # rejected suffix: prefix + itself, not chosen
    assert p.gather_index.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 5, 6, 7]]


def test_pack_pairs_refuses_left_padding():
    ids = torch.tensor([[0, 1, 2], [1, 2, 3]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="right padding"):
        pack_pairs(ids, mask, 0, torch.float32)


@pytest.fixture(scope="module")
def tiled_items(tiny_model_dir, tmp_path_factory):
    from transformers import AutoConfig

    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    vision = VisionSpec.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    path = write_tiled_pairs(tmp_path_factory.mktemp("shared"), [(64, 64), (128, 64), (128, 128)])
    ds = PairDataset(path, tok, vision, DataConfig(max_dynamic_patch=4))
    return [ds[i] for i in range(len(ds))], tok.pad_token_id


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_equals_plain_logps_and_gradients(tiny_model_dir, tiled_items, attn):
    from mpo.model.loading import load_model

    items, pad = tiled_items
    model = load_model(str(tiny_model_dir), attn_implementation=attn)
    batch, _ = PairCollator(pad)(items)
    weights = torch.linspace(0.5, 2.0, batch["input_ids"].shape[0])

    model.zero_grad()
    plain = batch_logps(model, batch, chunk_size=6)
    (plain.logps * weights).sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    shared = shared_prompt_batch_logps(model, batch, chunk_size=6)
    (shared.logps * weights).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(shared.logps, plain.logps, atol=1e-5, rtol=1e-5)
    assert torch.equal(shared.num_tokens, plain.num_tokens)
    assert set(shared_grads) == set(plain_grads)
    assert any(n.startswith("model.vision_tower.") for n in shared_grads)
    for n in plain_grads:
        torch.testing.assert_close(
            shared_grads[n], plain_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}"
        )


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
        torch.testing.assert_close(
            shared_prompt_batch_logps(model, batch).logps,
            batch_logps(model, batch).logps,
            atol=1e-5,
            rtol=1e-5,
        )
