"""bf16 on CPU: the paths a GPU run takes in bf16 (weights, autocast, the reference, log-prob
chunks, shared prompt, packing, the loss), run on the tiny model so dtype bugs show without a GPU.

Dtypes are asserted where they matter: log-probs and loss terms float32, cached reference
log-probs float64. Values are compared with float32 ones under u = 2⁻⁸, bf16's unit roundoff (8
significant bits). Our token log-probs are computed in float32 from bf16 logits, so a token's
log-prob moves by the bf16 roundings of the hidden states and logits it comes from, O(u·|logit|),
and here |logit| ≪ |log-prob| (≈ ln of the vocabulary): the bound u·|L| = Σ u·|token log-prob| is
what rounding every token log-prob to bf16 would cost, a loose but derived ceiling (measured:
≤ 0.03·u·|L|). A path that casts a summed log-prob to bf16 loses up to u/2·|L| in one rounding and
is caught by the dtype asserts.
"""

from __future__ import annotations

import pytest
import torch
from test_logprobs import write_tiled_pairs  # tests/ is on sys.path

from mpo.data.collate import PackedPairCollator, PairCollator
from mpo.logprobs import batch_logps
from mpo.shared_prompt import packed_batch_logps

U_BF16 = 2.0**-8


@pytest.fixture(scope="module")
def batches(tiny_model_dir, tmp_path_factory):
    from transformers import AutoConfig

    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    vision = VisionSpec.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    path = write_tiled_pairs(tmp_path_factory.mktemp("bf16"), [(64, 64), (128, 64), (128, 128)])
    ds = PairDataset(path, tok, vision, DataConfig(max_dynamic_patch=4))
    items = [ds[i] for i in range(len(ds))]
    plain, _ = PairCollator(tok.pad_token_id)(items)
    packed, _ = PackedPairCollator(tok.pad_token_id)(items)
    with torch.no_grad():
        exact = batch_logps(load_model(str(tiny_model_dir)), plain)
    return plain, packed, exact


PATHS = {
    "plain": lambda m, plain, packed: batch_logps(m, plain, chunk_size=3),
    "shared_prompt": lambda m, plain, packed: packed_batch_logps(m, plain, chunk_size=3),
    "packed": lambda m, plain, packed: packed_batch_logps(m, packed, chunk_size=3),
}


def _close_to_float32(got, exact) -> None:
    assert got.logps.dtype == torch.float32  # log-softmax and sums in float32, whatever the model dtype
    assert torch.equal(got.num_tokens, exact.num_tokens)
    err = (got.logps - exact.logps).abs()
    assert (err <= U_BF16 * exact.logps.abs()).all(), (err / exact.logps.abs() / U_BF16).tolist()


@pytest.mark.parametrize("path", PATHS)
def test_bf16_weights(tiny_model_dir, batches, path):
    from mpo.model.loading import load_model

    plain, packed, exact = batches
    model = load_model(str(tiny_model_dir), "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        got = PATHS[path](model, plain, packed)
    _close_to_float32(got, exact)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_autocast(tiny_model_dir, batches, path):
    """float32 weights, bf16 matmuls (what ``training.bf16`` without DeepSpeed does)."""
    from mpo.model.loading import load_model

    plain, packed, exact = batches
    model = load_model(str(tiny_model_dir))
    seen = []
    layer = model.model.language_model.layers[0]
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        for m in (layer.mlp, layer.self_attn.q_proj)
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = PATHS[path](model, plain, packed)
    finally:
        for h in hooks:
            h.remove()
    assert seen and set(seen) == {torch.bfloat16}
    _close_to_float32(got, exact)


@pytest.mark.parametrize("overrides", [("training.bf16=true",), ("model.torch_dtype=bfloat16",)])
def test_packed_training_step_in_bf16(tiny_config, overrides):
    """Policy and reference (a copy) give bit-equal log-probs at step 0 in bf16 (so π = π_ref gives
    zero log-ratios, as in float32); the loss and its terms are float32 and finite."""
    from mpo.run import build_trainer

    trainer, _ = build_trainer(tiny_config("data.packing=true", "data.max_length=1024",
                                           "data.max_tokens_per_batch=1500", *overrides))  # fmt: skip
    batch, events = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert "scored" in batch and batch["num_pairs"] > 1
    trainer.model.train()
    logps = trainer._pair_logps(trainer.model, batch)
    assert logps.policy_chosen.dtype == logps.ref_chosen.dtype == torch.float32
    assert torch.equal(logps.policy_chosen.detach(), logps.ref_chosen)
    assert torch.equal(logps.policy_rejected.detach(), logps.ref_rejected)
    terms = trainer.loss_fn(logps)
    assert all(t.dtype == torch.float32 for t in (terms.preference, terms.quality, terms.sft))
    loss = trainer.compute_loss(trainer.model, (batch, events))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_cached_reference_logps_stay_float64_against_a_bf16_policy():
    """The loss takes float64 cached references and bf16-computed float32 policy log-probs; the
    log-ratio is formed in float32, after the reference is rounded to float32 (ε32·80 ≈ 1e-5),
    not to bf16 (which would move −80.1234 to −80.0)."""
    from mpo.config import LossConfig
    from mpo.loss import MPOLoss, PairLogps

    ref = torch.tensor([-80.1234, -12.5], dtype=torch.float64)
    policy = torch.tensor([-80.1234, -12.5], dtype=torch.float32)
    logps = PairLogps(policy, policy, ref, ref, torch.tensor([30, 5]), torch.tensor([30, 5]))
    chosen, _ = logps.logratios()
    assert chosen.dtype == torch.float32 and chosen.abs().max() <= 80 * 2.0**-23
    terms = MPOLoss(LossConfig())(logps)
    assert terms.preference.dtype == torch.float32


def test_deepspeed_cast_keeps_cached_reference_logps_float64(tiny_config, monkeypatch):
    """Under DeepSpeed the Trainer casts every float tensor of a batch to
    ``accelerator.state.deepspeed_plugin.hf_ds_config.dtype()`` (transformers 5.23
    ``Trainer._prepare_input``); our ``_prepare_inputs`` keeps the cached reference log-probs
    float64 (bf16 would move −80.123456789 to −80.0). DeepSpeed with bf16 cannot start on CPU
    (TrainingArguments refuses bf16 without a GPU unless use_cpu, which DeepSpeed's CPU launch turns
    off), so the cast is driven through the two attributes that code reads; the pixels turning bf16
    shows it is on. The GPU check (scripts/gpu_check.sh) runs it for real under ZeRO-3."""
    from types import SimpleNamespace

    from mpo.run import build_trainer

    trainer, _ = build_trainer(tiny_config())
    items = []
    for i in range(2):
        pair, events = trainer.train_dataset[i]
        items.append(
            ({**pair, "ref_chosen_logps": -80.123456789 - i, "ref_rejected_logps": -91.987654321}, events)
        )
    batch = trainer.data_collator(items)
    plugin = SimpleNamespace(hf_ds_config=SimpleNamespace(dtype=lambda: torch.bfloat16))
    monkeypatch.setattr(
        trainer, "accelerator", SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    )
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    out, _ = trainer._prepare_inputs(batch)
    assert out["pixel_values"].dtype == torch.bfloat16
    assert out["ref_chosen_logps"].dtype == out["ref_rejected_logps"].dtype == torch.float64
    assert out["ref_chosen_logps"].tolist() == [-80.123456789, -81.123456789]
