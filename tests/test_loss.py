"""MPO loss: hand-worked numbers, limit cases, and TRL 1.16's own terms on identical inputs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mpo.loss import LossWeights, RewardShift, bco_pair_loss, mpo_loss, preference_loss, sft_loss

LN2 = math.log(2)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_step0_loss_is_0p832_plus_nll():
    # π = πref and δ = 0: L = 0.8·ln2 + 0.2·2·ln2 + NLL (facts §5).
    logps = torch.tensor([-12.0, -7.5, -30.0])
    nll_sum = torch.tensor([12.0, 7.5, 30.0])
    ntok = torch.tensor([4, 3, 8])
    loss, m = mpo_loss(logps, logps - 2, logps, logps - 2, nll_sum, ntok, 0.0, LossWeights())
    nll = (12 + 7.5 + 30) / (4 + 3 + 8)
    assert loss.item() == pytest.approx(0.8 * LN2 + 0.2 * 2 * LN2 + nll, abs=1e-6)
    assert 0.8 * LN2 + 0.4 * LN2 == pytest.approx(0.8318, abs=1e-4)
    assert m["rewards/accuracies"].item() == 0.0  # ties are not wins
    assert m["rewards/margins"].item() == 0.0


def test_hand_worked_values():
    # One pair: Δc = 2, Δr = -3, β = 0.1, δ = 0.05.
    c, r = torch.tensor([2.0]), torch.tensor([-3.0])
    dpo = -math.log(_sig(0.1 * 5))
    bco = -math.log(_sig(0.2 - 0.05)) - math.log(_sig(-(-0.3 - 0.05)))
    assert preference_loss(c, r, 0.1).item() == pytest.approx(dpo, abs=1e-6)
    assert bco_pair_loss(c, r, 0.1, 0.05).item() == pytest.approx(bco, abs=1e-6)
    assert preference_loss(c, r, 0.1, "hinge").item() == pytest.approx(max(0.0, 1 - 0.5), abs=1e-6)
    assert preference_loss(c, r, 0.1, "ipo").item() == pytest.approx((5 - 1 / 0.2) ** 2, abs=1e-6)
    smooth = -math.log(_sig(0.5)) * 0.9 - math.log(_sig(-0.5)) * 0.1
    assert preference_loss(c, r, 0.1, "sigmoid", 0.1).item() == pytest.approx(smooth, abs=1e-6)
    assert sft_loss(torch.tensor([6.0, 4.0]), torch.tensor([3, 2])).item() == pytest.approx(2.0)


def test_weights_switch_terms_off_and_combine_linearly():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 3 - 20 for _ in range(4))
    nll, nt = -pc, torch.full((5,), 6)
    terms = {}
    for name, w in (("p", (1, 0, 0)), ("q", (0, 1, 0)), ("g", (0, 0, 1))):
        weights = LossWeights(preference_weight=w[0], quality_weight=w[1], generation_weight=w[2])
        terms[name] = mpo_loss(pc, pr, rc, rr, nll, nt, 0.3, weights)[0].item()
    assert terms["p"] == pytest.approx(preference_loss(pc - rc, pr - rr, 0.1).mean().item(), rel=1e-6)
    assert terms["q"] == pytest.approx(bco_pair_loss(pc - rc, pr - rr, 0.1, 0.3).mean().item(), rel=1e-6)
    assert terms["g"] == pytest.approx((nll.sum() / 30).item(), rel=1e-6)
    full, metrics = mpo_loss(pc, pr, rc, rr, nll, nt, 0.3, LossWeights())
    assert full.item() == pytest.approx(0.8 * terms["p"] + 0.2 * terms["q"] + terms["g"], rel=1e-6)
    assert metrics["loss/bco"].item() == pytest.approx(terms["q"], rel=1e-6)


def test_limits_large_margin_drives_preference_to_zero():
    big = torch.tensor([500.0])
    assert preference_loss(big, -big, 0.1).item() == pytest.approx(0.0, abs=1e-12)
    # Huge wrong-way margin: loss grows linearly (no overflow to inf).
    assert preference_loss(-big, big, 0.1).item() == pytest.approx(100.0, rel=1e-6)
    # BCO with δ equal to both rewards: two coin flips, 2·ln2.
    assert bco_pair_loss(torch.tensor([3.0]), torch.tensor([3.0]), 0.1, 0.3).item() == pytest.approx(
        2 * LN2, abs=1e-6
    )


def test_gradients_flow_to_policy_only_through_expected_terms():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-6.0], requires_grad=True)
    loss, _ = mpo_loss(
        pc, pr, torch.tensor([-5.0]), torch.tensor([-6.0]), -pc, torch.tensor([5]), 0.0, LossWeights()
    )
    loss.backward()
    # d/dpc: 0.8·(-β·σ(0)) + 0.2·(-β·σ(0)) + (-1/5); d/dpr: 0.8·β·σ(0) + 0.2·β·σ(0)
    assert pc.grad.item() == pytest.approx(-0.8 * 0.05 - 0.2 * 0.05 - 0.2, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.8 * 0.05 + 0.2 * 0.05, abs=1e-6)


def test_reward_shift_running_mean_and_state():
    s = RewardShift()
    assert s.value == 0.0
    s.update(3.0, 4)  # rewards 0.5, 1, 1, 0.5
    assert s.value == pytest.approx(0.75)
    s.update(-1.0, 2)
    assert s.value == pytest.approx(2.0 / 6)
    t = RewardShift()
    t.load_state_dict(s.state_dict())
    assert t.value == s.value and t.count == 6


# ---- parity with TRL 1.16 on identical inputs ------------------------------------------------


def _trl_loss(loss_types, loss_weights, per_token_logps, mask, ref_chosen, ref_rejected, beta=0.1):
    """Run TRL's DPOTrainer._compute_loss on precomputed per-token log-probs (no model, no data)."""
    from trl import DPOTrainer

    n, t = per_token_logps.shape
    outputs = SimpleNamespace(
        log_probs=per_token_logps * mask,
        entropy=torch.zeros(n, t),
        mean_logits=torch.zeros(n, t),
        is_top1=torch.zeros(n, t, dtype=torch.bool),
    )

    class FakeModel:
        training = True

        def __call__(self, **kwargs):
            return outputs

    identity = SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        unwrap_model=lambda m: m,
    )
    stub = SimpleNamespace(
        model=FakeModel(),
        accelerator=identity,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    # completion_mask is unshifted in TRL; its [..., 1:] must equal our per-token mask.
    completion_mask = torch.cat([torch.zeros(n, 1), mask], dim=1).long()
    inputs = {
        "input_ids": torch.zeros(n, t + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, t + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(stub, stub.model, inputs, False)


@pytest.fixture
def logps_batch():
    g = torch.Generator().manual_seed(3)
    n_pairs, t = 3, 7
    per_token = -torch.rand(2 * n_pairs, t, generator=g) * 4
    mask = (torch.rand(2 * n_pairs, t, generator=g) > 0.3).float()
    mask[:, 0] = 1
    seq = (per_token * mask).sum(1)
    ref = seq + torch.randn(2 * n_pairs, generator=g)
    return per_token, mask, seq, ref, n_pairs


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_preference_matches_trl(logps_batch, loss_type):
    per_token, mask, seq, ref, b = logps_batch
    trl = _trl_loss([loss_type], [1.0], per_token, mask, ref[:b], ref[b:])
    ours = preference_loss(seq[:b] - ref[:b], seq[b:] - ref[b:], 0.1, loss_type).mean()
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6, abs=1e-7)


def test_sft_matches_trl(logps_batch):
    per_token, mask, seq, ref, b = logps_batch
    trl = _trl_loss(["sft"], [1.0], per_token, mask, ref[:b], ref[b:])
    ours = sft_loss(-seq[:b], mask[:b].sum(1))
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6)


def test_bco_pair_matches_trl_when_delta_is_zero(logps_batch):
    # TRL >= 0.29 dropped δ; with δ = 0 the two must agree exactly.
    per_token, mask, seq, ref, b = logps_batch
    trl = _trl_loss(["bco_pair"], [1.0], per_token, mask, ref[:b], ref[b:])
    ours = bco_pair_loss(seq[:b] - ref[:b], seq[b:] - ref[b:], 0.1, 0.0).mean()
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6)


def test_full_mpo_matches_trl_loss_list_at_zero_delta(logps_batch):
    per_token, mask, seq, ref, b = logps_batch
    trl = _trl_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], per_token, mask, ref[:b], ref[b:])
    ours, _ = mpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], -seq[:b], mask[:b].sum(1), 0.0, LossWeights())
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6)
    # And with a nonzero δ ours differs, as it must (TRL has no shift).
    shifted, _ = mpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], -seq[:b], mask[:b].sum(1), 0.5, LossWeights())
    assert abs(shifted.item() - trl.item()) > 1e-4


def test_ipo_averages_per_token_like_trl(logps_batch):
    """IPO's squared target 1/(2β) is on per-token log-ratios (TRL 1.16, the IPO authors' form)."""
    per_token, mask, seq, ref, b = logps_batch
    trl = _trl_loss(["ipo"], [1.0], per_token, mask, ref[:b], ref[b:])
    tokens = mask.sum(1)
    w = LossWeights(preference_type="ipo", preference_weight=1.0, quality_weight=0.0, generation_weight=0.0)
    ours, _ = mpo_loss(
        seq[:b], seq[b:], ref[:b], ref[b:], -seq[:b], tokens[:b], 0.0, w, rejected_num_tokens=tokens[b:]
    )
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6)
    summed = preference_loss(seq[:b] - ref[:b], seq[b:] - ref[b:], 0.1, "ipo").mean()
    assert abs(summed.item() - trl.item()) > 1e-3  # the unnormalised form is a different loss
    with pytest.raises(ValueError, match="rejected_num_tokens"):
        mpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], -seq[:b], tokens[:b], 0.0, w)


def test_unknown_preference_type_raises():
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss(torch.zeros(1), torch.zeros(1), 0.1, "nope")
