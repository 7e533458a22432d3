"""Shared vision pass + response-only log-probs vs the peers' path (two full forwards, full logits).

Tolerance: float32 throughout. The two paths do the same arithmetic in a different order (one
batched forward vs two, gathered vs full logits), so only rounding differs: a summed log-prob of
n ≤ 40 tokens (|log p| ≤ ln 600 ≈ 6.4 for the tiny vocabulary) is off by at most a few ε per term,
≪ rtol 1e-5 (≈ 84 ε) of the sum; atol 1e-5 covers sums near 0. A gradient entry sums ≤ a few
hundred products whose signs vary, so its rounding is relative to the largest of them, not to the
(possibly cancelled) total: rtol 1e-4 with atol 1e-5 (the largest gradient entries here are O(1)).
"""

from __future__ import annotations

import json

import pytest
import torch
from oracles import naive_batch_logps, token_logps_brute_force  # tests/ is on sys.path
from PIL import Image

from mpo.data.collate import PairCollator
from mpo.data.template import IGNORE_INDEX
from mpo.logprobs import batch_logps, lm_head_calls, response_logps, trained_positions

ATOL = 1e-5


def write_tiled_pairs(root, sizes):
    """One JSONL line per image size; with max_dynamic_patch 4 and 64px tiles the sizes give
    64x64 -> 1 tile, 128x64 -> 2x1 + thumbnail = 3, 128x128 -> 2x2 + thumbnail = 5."""
    lines = []
    for i, size in enumerate(sizes):
        img = Image.new("RGB", size, (40 * i % 255, 90, 200 - 30 * i))
        img.paste((250, 10, 10), (5 + i, 7, 30 + i, 40))
        img.save(root / f"img{i}.png")
        lines.append(
            json.dumps(
                {
                    "image": f"img{i}.png",
                    "question": f"<image>\nWhat color is the shape {i}?",
                    "chosen": "The shape is red." + " It is a circle." * i,
                    "rejected": "The shape is blue.",
                }
            )
        )
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir, tmp_path_factory):
    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    root = tmp_path_factory.mktemp("tiled")
    path = write_tiled_pairs(root, [(64, 64), (128, 64), (128, 128)])
    ds = PairDataset(path, tok, VisionSpec.from_config(model.config), DataConfig(max_dynamic_patch=4))
    items = [ds[i] for i in range(len(ds))]
    assert [pair["num_tiles"] for pair, _ in items] == [[1], [3], [5]]
    batch, events = PairCollator(tok.pad_token_id)(items)
    assert events.seen == 3 and not events.skipped
    return model, batch


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shared_vision_logps_equal_naive(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        ours = batch_logps(model, batch, chunk_size=7)
        naive = naive_batch_logps(model, batch)
    assert ours.logps.shape == (6,)
    torch.testing.assert_close(ours.logps, naive.logps, atol=ATOL, rtol=1e-5)
    assert torch.equal(ours.num_tokens, naive.num_tokens)
    assert (ours.num_tokens > 0).all()


def test_shared_vision_gradients_equal_naive(model_and_batch):
    model, batch = model_and_batch
    # An objective that weights rows differently so each row's gradient path matters.
    weights = torch.linspace(0.5, 2.0, batch["input_ids"].shape[0])
    model.zero_grad()
    (batch_logps(model, batch, chunk_size=5).logps * weights).sum().backward()
    ours = _grads(model)
    model.zero_grad()
    (naive_batch_logps(model, batch).logps * weights).sum().backward()
    naive = _grads(model)
    model.zero_grad()
    assert set(ours) == set(naive)
    for prefix in ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model."):
        names = [n for n in ours if n.startswith(prefix)]
        assert names, f"no gradients under {prefix}"
        # The vision tower must actually receive gradient through the shared features.
        assert any(ours[n].abs().sum() > 0 for n in names), prefix
    for name in ours:
        torch.testing.assert_close(
            ours[name], naive[name], atol=ATOL, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_response_logps_equals_brute_force_with_small_chunks():
    g = torch.Generator().manual_seed(0)
    n, length, hidden, vocab = 3, 11, 8, 50
    h = torch.randn(n, length, hidden, generator=g)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    labels = torch.randint(0, vocab, (n, length), generator=g)
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[1, 8:] = IGNORE_INDEX  # padding
    labels[2, 6] = IGNORE_INDEX  # a masked token inside the response
    trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
    chunk = 4
    assert chunk < trained
    out = response_logps(h, labels, head, chunk_size=chunk)
    expected = token_logps_brute_force(head(h), labels)
    torch.testing.assert_close(out.logps, expected, atol=ATOL, rtol=1e-5)
    assert out.num_tokens.tolist() == (labels[:, 1:] != IGNORE_INDEX).sum(-1).tolist()


def test_response_logps_row_without_trained_tokens_is_zero():
    h = torch.randn(2, 5, 4)
    head = torch.nn.Linear(4, 9, bias=False)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 3:] = torch.tensor([1, 2])
    out = response_logps(h, labels, head, chunk_size=1)
    assert out.logps[1].item() == 0.0 and out.num_tokens.tolist() == [2, 0]
    torch.testing.assert_close(out.logps, token_logps_brute_force(head(h), labels), atol=ATOL, rtol=1e-5)


def test_extra_lm_head_calls_change_nothing_and_empty_batches_keep_a_gradient_path():
    """Data-parallel ranks make the same number of LM-head calls (the most any rank needs); the
    extra calls are empty chunks. A batch with no trained token (a rank whose pairs were all
    skipped) still gives a loss with a gradient path, so backward and ZeRO's hooks run."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, 4, generator=g, requires_grad=True)
    head = torch.nn.Linear(4, 9, bias=False)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 2:] = torch.tensor([1, 2, 3, 4])
    assert lm_head_calls(trained_positions({"labels": labels}), 2) == 2
    base = response_logps(h, labels, head, chunk_size=2)
    more = response_logps(h, labels, head, chunk_size=2, calls=5)
    assert torch.equal(base.logps, more.logps)
    with pytest.raises(ValueError, match="cannot cover"):
        response_logps(h, labels, head, chunk_size=2, calls=1)
    nothing = torch.full((2, 6), IGNORE_INDEX)
    assert lm_head_calls(trained_positions({"labels": nothing}), 2) == 1
    empty = response_logps(h, nothing, head, chunk_size=2)
    assert empty.logps.tolist() == [0.0, 0.0] and empty.logps.requires_grad
    (empty.logps.sum() * 0).backward()
    assert head.weight.grad is not None and torch.equal(head.weight.grad, torch.zeros_like(head.weight))
