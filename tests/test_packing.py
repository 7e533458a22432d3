"""Pair-atomic packing: the layout, the mask by every kernel, per-pair log-probs and gradients equal
to the unpacked ones, the packer and its batch sampler, and the training step over packed batches.

Tolerances. Attention kernels on random float64 inputs: two evaluations of the same function in
another order differ by a few ε64 = 2⁻⁵² per operation; with sums of ≤ 12 terms, 1e-10 of the
magnitude is ~10⁴× that and ~10⁹× below what one wrong mask entry does (O(0.1)). The tiny model
run in float64 is not float64 throughout: transformers' Qwen2 RMSNorm and rotary tables compute
in float32 and cast back, so when two evaluations' float64 inputs differ in their last bits a
float32 rounding can land the other way and move that element by ε32 = 2⁻²³ of its size. Model
comparisons therefore use the float32 bound of tests/tolerances.py, C·ε32 (C = 4) of the
magnitude compared: |L| for a summed log-prob (every token log-prob is ≤ 0, so Σ|token log-probs|
= |L|), the largest entry for a gradient tensor (measured: ≤ 0.8·ε32); a masking or position bug
moves them by ≳ 1e-3 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import pair_allowed_brute_force, varlen_attention_reference  # tests/ is on sys.path
from test_logprobs import write_tiled_pairs
from tolerances import EPS32, C

from mpo.data.collate import PackedPairCollator, PairCollator
from mpo.data.template import IGNORE_INDEX
from mpo.logprobs import batch_logps
from mpo.packing import PackedBatchSampler, pack_bins, pack_pairs
from mpo.pair_attention import DenseBlocks, FlashVarlen, FlexBlocks, pair_mask_mod, token_ids
from mpo.sampler import packed_lengths
from mpo.shared_prompt import packed_batch_logps

REL64 = 1e-10


def _t(*x):
    return torch.tensor(x)


HAND_PAIRS = [
    # chosen [1 2 3 4 5], rejected [1 2 3 9 8 7]: prefix [1 2 3]; answers trained from position 3.
    (_t(1, 2, 3, 4, 5), _t(-100, -100, -100, 4, 5), _t(1, 2, 3, 9, 8, 7), _t(-100, -100, -100, 9, 8, 7)),
    # chosen [1 6], rejected [1 7 7]: prefix [1].
    (_t(1, 6), _t(-100, 6), _t(1, 7, 7), _t(-100, 7, 7)),
]


def test_pack_pairs_hand_example():
    b = pack_pairs(HAND_PAIRS, pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 8, 7, 1, 6, 7, 7]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1, 2]]
    assert b["attention_mask"].tolist() == [[1] * 12]
    assert b["pairs"].tolist() == [[0, 0, 3, 2, 3], [0, 8, 1, 1, 2]]
    # (row, col, target, owner): owners 0, 1 = chosen of pairs 0, 1; 2, 3 = their rejected.
    # The rejected answer of pair 0 starts at the prefix's last position (col 2), then jumps over
    # the chosen suffix; pair 1's rejected answer is scored at its prefix (col 8), then at col 10.
    assert b["scored"].tolist() == [
        [0, 2, 4, 0], [0, 3, 5, 0], [0, 2, 9, 2], [0, 5, 8, 2], [0, 6, 7, 2],
        [0, 8, 6, 1], [0, 8, 7, 3], [0, 10, 7, 3],
    ]  # fmt: skip
    two = pack_pairs(HAND_PAIRS, pad_token_id=0, rows=[0, 1])
    assert two["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 8, 7], [1, 6, 7, 7, 0, 0, 0, 0]]
    assert two["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert two["pairs"].tolist() == [[0, 0, 3, 2, 3], [1, 0, 1, 1, 2]]
    with pytest.raises(ValueError, match="row by row"):
        pack_pairs(HAND_PAIRS, 0, rows=[1, 0])


# Two rows: three pairs (one whose rejected answer is a prefix of the chosen one: no rejected
# suffix), a padded tail in row 1.
SPANS = [(0, 0, 3, 2, 3), (0, 8, 2, 2, 0), (1, 0, 2, 1, 4)]
ROWS, WIDTH = 2, 12


def _dense_from_blocks(kernel: DenseBlocks) -> torch.Tensor:
    allowed = torch.zeros(ROWS, WIDTH, WIDTH, dtype=torch.bool)
    for r, blocks in enumerate(kernel.blocks):
        for s, n, mask in blocks:
            allowed[r, s : s + n, s : s + n] = mask
    return allowed


def test_every_mask_construction_equals_the_definition():
    want = pair_allowed_brute_force(SPANS, ROWS, WIDTH)
    real = torch.zeros(ROWS, WIDTH, dtype=torch.bool)
    for r, s, p, c, j in SPANS:
        real[r, s : s + p + c + j] = True
    pair, branch = token_ids(SPANS, ROWS, WIDTH)
    b = torch.arange(ROWS)[:, None, None]
    q, kv = torch.arange(WIDTH)[None, :, None], torch.arange(WIDTH)[None, None, :]
    flex = pair_mask_mod(pair, branch)(b, 0, q, kv)  # the FlexAttention mask_mod, evaluated densely
    assert torch.equal(flex, want)
    blocks = _dense_from_blocks(DenseBlocks(SPANS, ROWS, WIDTH, "cpu"))
    pair_rows = real[:, :, None] & real[:, None, :]  # the sdpa blocks say nothing about padding
    assert torch.equal(blocks, want & pair_rows)
    assert want[0, 6].tolist()[:8] == [1, 1, 1, 0, 0, 1, 1, 0]  # rejected sees the prefix, not chosen


def _reference_attention(q, k, v, allowed, scale):
    """Dense softmax attention with an explicit ``(R, P, P)`` mask; ``(R, P, H, D)``."""
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(ROWS, 4, WIDTH, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(ROWS, 2, WIDTH, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


def _real_tokens() -> torch.Tensor:
    real = torch.zeros(ROWS, WIDTH, dtype=torch.bool)
    for r, s, p, c, j in SPANS:
        real[r, s : s + p + c + j] = True
    return real


@pytest.mark.parametrize("kind", ["sdpa", "eager", "flash_varlen"])
def test_kernels_equal_dense_attention_values_and_gradients(qkv, kind):
    """float64; the flash path's index bookkeeping runs against a plain-torch stand-in for
    ``flash_attn_varlen_func`` (same signature, bottom-right causal alignment)."""
    q, k, v = (x.clone().requires_grad_() for x in qkv)
    if kind == "flash_varlen":
        kernel = FlashVarlen(SPANS, ROWS, WIDTH, "cpu", varlen=varlen_attention_reference)
    else:
        kernel = DenseBlocks(SPANS, ROWS, WIDTH, "cpu", eager=kind == "eager")
    got = kernel(q, k, v, 0.35, 0.0, True)
    real = _real_tokens()
    want = _reference_attention(*qkv, pair_allowed_brute_force(SPANS, ROWS, WIDTH), 0.35)
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=REL64)
    weights = torch.linspace(-1, 2, got[real].numel(), dtype=torch.float64).view_as(got[real])
    grads = torch.autograd.grad((got[real] * weights).sum(), (q, k, v))
    ref = [x.clone().requires_grad_() for x in qkv]
    ref_out = _reference_attention(*ref, pair_allowed_brute_force(SPANS, ROWS, WIDTH), 0.35)
    want_grads = torch.autograd.grad((ref_out[real] * weights).sum(), ref)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=REL64 * w.abs().max().item())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_kernel_equals_dense_attention(qkv):
    """FlexAttention's own (eager, forward-only) CPU path with our block mask. float32: outputs
    are softmax-weighted means of O(1) values over ≤ 12 keys, so rounding is ≲ 12·ε32 ≈ 1.4e-6;
    1e-5 leaves room and is far below a wrong mask entry's effect (O(0.1))."""
    q, k, v = (x.float() for x in qkv)
    with torch.no_grad():
        got = FlexBlocks(SPANS, ROWS, WIDTH, "cpu", compiled=False)(q, k, v, 0.35, 0.0, False)
    real = _real_tokens()
    want = _reference_attention(q, k, v, pair_allowed_brute_force(SPANS, ROWS, WIDTH), 0.35)
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiled_items(tiny_model_dir, tmp_path_factory):
    from transformers import AutoConfig

    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    vision = VisionSpec.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    path = write_tiled_pairs(tmp_path_factory.mktemp("packing"), [(64, 64), (128, 64), (128, 128), (128, 64)])
    ds = PairDataset(path, tok, vision, DataConfig(max_dynamic_patch=4))
    return [ds[i] for i in range(len(ds))], tok.pad_token_id


def _logps_and_grads(model, fn, batch, weights):
    model.zero_grad()
    out = fn(model, batch, chunk_size=5)
    (out.logps * weights).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logps_and_gradients_equal_unpacked(tiny_model_dir, tiled_items, attn):
    """float64 model: one packed row of 4 pairs, and the plain batch packed one pair per row (the
    shared-prompt path), against the plain padded batch: per-pair log-probs and every gradient."""
    from mpo.model.loading import load_model

    items, pad = tiled_items
    model = load_model(str(tiny_model_dir), attn_implementation=attn).double()
    plain, _ = PairCollator(pad)(items)
    packed, _ = PackedPairCollator(pad)(items)
    plain["pixel_values"] = plain["pixel_values"].double()
    packed["pixel_values"] = packed["pixel_values"].double()
    assert packed["input_ids"].shape[0] == 1 and packed["attention_mask"].all()  # one row, no padding
    weights = torch.linspace(0.5, 2.0, 2 * len(items), dtype=torch.float64)
    want, want_grads = _logps_and_grads(model, batch_logps, plain, weights)
    for batch in (packed, plain):  # plain: packed_batch_logps packs it one pair per row
        got, grads = _logps_and_grads(model, packed_batch_logps, batch, weights)
        assert ((got.logps - want.logps).abs() <= C * EPS32 * want.logps.abs()).all()
        assert torch.equal(got.num_tokens, want.num_tokens)
        assert set(grads) == set(want_grads) and any(n.startswith("model.vision_tower.") for n in grads)
        for n, w in want_grads.items():
            torch.testing.assert_close(grads[n], w, rtol=0, atol=C * EPS32 * w.abs().max().item(), msg=n)


def test_packed_float32_logps_within_rounding_of_float64(tiny_model_dir, tiled_items):
    from mpo.model.loading import load_model

    items, pad = tiled_items
    packed, _ = PackedPairCollator(pad)(items)
    model = load_model(str(tiny_model_dir))
    with torch.no_grad():
        got = packed_batch_logps(model, packed).logps
        exact = packed_batch_logps(
            model.double(), {**packed, "pixel_values": packed["pixel_values"].double()}
        ).logps
    bound = C * EPS32 * exact.abs()
    assert ((got.double() - exact).abs() <= bound).all(), (got.double() - exact, bound)


def test_packed_lengths_estimate_the_packed_row(tiny_model_dir, demo_data):
    """The estimate counts the prompt once and both answers: the packed length plus the answers'
    common leading tokens (counted twice by the estimate), up to the ±2 tokens per answer that
    tokenizing an answer alone may shift (tests/test_sampler.py)."""
    from transformers import AutoConfig

    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.loading import load_tokenizer
    from mpo.packing import common_prefix

    tok = load_tokenizer(str(tiny_model_dir))
    vision = VisionSpec.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    ds = PairDataset(demo_data["train"], tok, vision, DataConfig(max_dynamic_patch=4))
    est = packed_lengths(ds)
    for i in range(len(ds)):
        pair, _ = ds[i]
        c, r = pair["chosen_input_ids"], pair["rejected_input_ids"]
        p = common_prefix(c, r)
        prompt = int((pair["chosen_labels"] != IGNORE_INDEX).nonzero()[0]) - 1  # + <|im_start|>assistant\n
        assert abs(int(est[i]) - (len(c) + len(r) - p + (p - prompt))) <= 4, i


def test_pack_bins_fill_budget_and_order():
    rng = np.random.default_rng(0)
    lengths = np.minimum((rng.pareto(1.2, 3000) + 1) * 300, 20000).astype(int)  # skewed, some over budget
    budget = 8192
    order = rng.permutation(len(lengths)).tolist()
    bins = pack_bins(lengths, budget, order, window=1000)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every pair exactly once
    for b in bins:
        assert len(b) == 1 or lengths[b].sum() <= budget
    assert all(len(b) == 1 for b in bins if lengths[b].sum() > budget)
    # Best-fit decreasing uses at most 11/9·OPT + 6/9 bins per window (Dósa 2007), and OPT is at
    # least the window's tokens over the budget (over-budget items count one bin each).
    bound = 0.0
    for w in range(0, len(order), 1000):
        chunk = lengths[order[w : w + 1000]]
        small = chunk[chunk <= budget]
        bound += 11 / 9 * (np.ceil(small.sum() / budget) + (chunk > budget).sum()) + 6 / 9
    assert len(bins) <= bound
    assert pack_bins(lengths, budget, order, window=1000) == bins  # a function of its inputs


def test_packed_batch_sampler_epochs_ranks_and_largest_first():
    lengths = np.array([900, 100, 400, 350, 800, 50, 600, 300, 700, 200, 1000, 150])
    one = PackedBatchSampler(lengths, 1000, seed=3)
    epoch0 = list(one)
    assert sorted(i for b in epoch0 for i in b) == list(range(12))
    assert all(lengths[b].sum() <= 1000 for b in epoch0)
    first = max(one.bins, key=lambda b: lengths[b].sum())
    one.set_epoch(1)
    epoch1 = list(one)
    assert epoch0[0] == first and epoch1[0] == [i + 12 for i in first]  # largest first, epoch-tagged
    assert sorted(sorted(b) for b in epoch1) == sorted(sorted(i + 12 for i in b) for b in epoch0)
    assert epoch1 != [[i + 12 for i in b] for b in epoch0]  # same bins, another order
    assert list(PackedBatchSampler(lengths, 1000, seed=3)) == epoch0
    ranks = [PackedBatchSampler(lengths, 1000, seed=3, num_replicas=3, rank=r) for r in range(3)]
    shares = [list(s) for s in ranks]
    assert len({len(s) for s in shares}) == 1 and all(len(s) == len(ranks[0]) for s in shares)
    assert {i for s in shares for b in s for i in b} == set(range(12))


def test_config_rules_for_packing(tiny_config):
    from mpo.config import ConfigError

    with pytest.raises(ConfigError, match="already groups"):
        tiny_config("data.packing=true", "data.group_by_length=true")
    with pytest.raises(ConfigError, match="max_tokens_per_batch"):
        tiny_config("data.packing=true", "data.max_tokens_per_batch=100", "data.max_length=200")
    tiny_config("model.shared_prompt=true", "model.attn_implementation=flash_attention_2")  # accepted now


def test_trainer_reads_packed_batches_under_the_budget(tiny_config):
    """The Trainer's DataLoader takes our batch sampler as is (a transformers 5.23 behaviour the
    packing relies on): its batches are the sampler's, in its order, each one packed row."""
    from mpo.run import build_trainer
    from mpo.trainer import chosen_trained_tokens

    budget = 1200
    trainer, _ = build_trainer(
        tiny_config("data.packing=true", f"data.max_tokens_per_batch={budget}", "data.max_length=1024")
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, PackedBatchSampler)
    collate = PairCollator(trainer.processing_class.pad_token_id)
    loader = trainer.get_train_dataloader()
    indices = list(sampler)
    assert len(loader) == len(indices)
    for (batch, events), idx in zip(loader, indices):
        assert batch["num_pairs"] == events.seen == len(idx)
        assert batch["input_ids"].shape[0] == 1 and batch["attention_mask"].all()  # one row, no padding
        # A single pair may exceed the budget; otherwise the estimates (±2 tokens per answer) hold it.
        assert len(idx) == 1 or batch["input_ids"].shape[1] <= budget + 4 * len(idx)
        plain, _ = collate([trainer.train_dataset[i] for i in idx])
        assert chosen_trained_tokens(batch) == chosen_trained_tokens(plain) > 0  # the SFT denominator
    assert sorted(i for b in indices for i in b) == list(range(64)) and len({len(b) for b in indices}) > 1
    metrics = trainer.evaluate()  # held-out pairs go through the packing collator too
    assert np.isfinite(metrics["eval_loss"]) and metrics["eval_rewards/accuracies"] >= 0


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_packed_step_equals_unpacked_step(tiny_config, tmp_path, normalization):
    """The loss is normalised per optimizer step: 4 pairs in one padded micro-batch, in one packed
    row, or in two packed rows (accumulated) give the same step. Tolerance as in tests/test_train.py
    (SPLIT_RTOL: float32 gradient sums of ≤ 240 terms, 100x below the normalisations' difference)."""
    from test_train import SPLIT_RTOL, one_sgd_step

    norm = f"loss.sft_normalization={normalization}"
    loss, delta, _ = one_sgd_step(
        tiny_config, tmp_path, "plain", norm, "training.per_device_train_batch_size=4"
    )
    scale = delta.abs().max().item()
    assert scale > 1e-3
    for name, budget, accum in (("one_row", 4096, 1), ("two_rows", 200, 2)):
        other_loss, other, batches = one_sgd_step(
            tiny_config, tmp_path, name, norm, "data.packing=true", f"data.max_tokens_per_batch={budget}",
            "data.max_length=128", f"training.gradient_accumulation_steps={accum}",
        )  # fmt: skip
        assert batches == accum, name  # the step holds every pair, in `accum` packed rows
        assert other_loss == pytest.approx(loss, rel=SPLIT_RTOL), name
        assert (other - delta).abs().max().item() <= SPLIT_RTOL * scale, name


@pytest.mark.slow
def test_packed_run_resumes_exactly(tiny_config, tmp_path):
    """Packed batches come from the seed alone: a run stopped after step 2 and resumed gives the
    uninterrupted run's losses and δ (the tests/test_train.py resume bounds)."""
    from test_train import StopAfter, _train_logs

    from mpo.run import build_trainer, run_training

    packing = (
        "data.packing=true",
        "data.max_tokens_per_batch=1500",
        "data.max_length=1024",
        "data.eval_meta_path=null",
    )
    run_training(tiny_config(*packing, f"training.output_dir={tmp_path / 'full'}"))
    trainer, _ = build_trainer(tiny_config(*packing, f"training.output_dir={tmp_path / 'part'}"))
    trainer.add_callback(StopAfter(2))
    trainer.train()
    trainer, resume = build_trainer(
        tiny_config(
            *packing, f"training.output_dir={tmp_path / 'part'}", "training.resume_from_checkpoint=latest"
        )
    )
    assert resume.endswith("checkpoint-2")
    trainer.train(resume_from_checkpoint=resume)
    full, part = _train_logs(tmp_path / "full"), _train_logs(tmp_path / "part")
    for step in (3, 4):
        assert part[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5, abs=1e-6)
        assert part[step]["bco/delta"] == pytest.approx(full[step]["bco/delta"], rel=1e-6, abs=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flex", "flash_varlen"])
def test_cuda_kernels_equal_dense_attention(qkv, kind):
    """The CUDA kernels themselves, compiled FlexAttention and flash-attn's varlen, in bf16 with
    gradients. bf16 outputs are softmax-weighted means of O(1) values: each rounds at u = 2⁻⁸ of
    its size, and the kernels accumulate in float32, so 4u of the largest value bounds the error."""
    if kind == "flash_varlen":
        pytest.importorskip("flash_attn")
    q, k, v = (x.to("cuda", torch.bfloat16).requires_grad_() for x in qkv)
    if kind == "flex":
        kernel = FlexBlocks(SPANS, ROWS, WIDTH, "cuda")
    else:
        kernel = FlashVarlen(SPANS, ROWS, WIDTH, "cuda")
    got = kernel(q, k, v, 0.35, 0.0, True)
    real = _real_tokens().cuda()
    ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = _reference_attention(*ref, pair_allowed_brute_force(SPANS, ROWS, WIDTH).cuda(), 0.35)
    tol = 4 * 2.0**-8 * want[real].abs().max().item()
    torch.testing.assert_close(got[real].float(), want[real], rtol=0, atol=tol)
    (got[real].float().sum()).backward()
    want[real].sum().backward()
    for g, w in zip((q.grad, k.grad, v.grad), ref):
        torch.testing.assert_close(g.float(), w.grad, rtol=0, atol=4 * 2.0**-8 * w.grad.abs().max().item())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_installed_pair_attention_leaves_other_forwards_alone(tiny_model_dir, tokenizer, attn):
    """Once packed rows have run, the LLM's attention is our registered function; without a
    kernel it runs the base implementation: padded generation gives the same tokens and logits."""
    from mpo.model.loading import load_model
    from mpo.pair_attention import PREFIX, install

    model = load_model(str(tiny_model_dir), attn_implementation=attn).eval()
    ids = torch.tensor([[0, 0, 10, 11, 12], [13, 14, 15, 16, 17]])  # left padded, as generation pads
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            logits = model(input_ids=ids, attention_mask=mask).logits
        return out, logits

    before = run()
    assert install(model) == attn and model.config.text_config._attn_implementation == PREFIX + attn
    after = run()
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
