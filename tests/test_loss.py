"""MPO loss: hand-worked numbers, limit cases, and TRL 1.16's own terms on identical inputs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mpo.config import LossConfig
from mpo.loss import MPOLoss, PairLogps, RewardShift, bco_pair_loss, preference_loss

LN2 = math.log(2)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def mpo_loss(pc, pr, rc, rr, chosen_tokens, delta=0.0, rejected_tokens=None, **cfg):
    """The combined loss over one batch (its own pair and token counts as denominators)."""
    loss_fn = MPOLoss(LossConfig(**cfg))
    loss_fn.reward_shift.update(delta, 1)
    logps = PairLogps(
        pc, pr, rc, rr, chosen_tokens, chosen_tokens if rejected_tokens is None else rejected_tokens
    )
    terms = loss_fn(logps)
    return loss_fn.combine(terms, float(len(pc)), float(chosen_tokens.sum())), terms


def test_step0_loss_is_0p832_plus_nll():
    # π = πref and δ = 0: L = 0.8·ln2 + 0.2·2·ln2 + NLL (MPO paper §3.2).
    logps = torch.tensor([-12.0, -7.5, -30.0])
    ntok = torch.tensor([4, 3, 8])
    for normalization, nll in (("token", (12 + 7.5 + 30) / (4 + 3 + 8)), ("sequence", (3 + 2.5 + 3.75) / 3)):
        loss, terms = mpo_loss(logps, logps - 2, logps, logps - 2, ntok, sft_normalization=normalization)
        assert loss.item() == pytest.approx(0.8 * LN2 + 0.2 * 2 * LN2 + nll, abs=1e-6), normalization
    assert 0.8 * LN2 + 0.4 * LN2 == pytest.approx(0.8318, abs=1e-4)
    assert (terms.chosen_rewards > terms.rejected_rewards).sum() == 0  # ties are not wins


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
    # The same pair through the module: terms and the combined loss (token normalisation, 4 tokens).
    loss, terms = mpo_loss(torch.tensor([-6.0]), torch.tensor([-9.0]), torch.tensor([-8.0]), torch.tensor([-6.0]),
                           torch.tensor([4]), delta=0.05)  # fmt: skip
    assert terms.preference.item() == pytest.approx(dpo, abs=1e-6)
    assert terms.quality.item() == pytest.approx(bco, abs=1e-6)
    assert loss.item() == pytest.approx(0.8 * dpo + 0.2 * bco + 6 / 4, abs=1e-6)


def test_weights_switch_terms_off_and_combine_linearly():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 3 - 20 for _ in range(4))
    nt = torch.tensor([6, 2, 9, 6, 3])
    parts = {}
    for name, w in (("p", (1, 0, 0)), ("q", (0, 1, 0)), ("g", (0, 0, 1))):
        weights = dict(preference_weight=w[0], quality_weight=w[1], generation_weight=w[2])
        parts[name] = mpo_loss(pc, pr, rc, rr, nt, 0.3, **weights)[0].item()
    assert parts["p"] == pytest.approx(preference_loss(pc - rc, pr - rr, 0.1).mean().item(), rel=1e-6)
    assert parts["q"] == pytest.approx(bco_pair_loss(pc - rc, pr - rr, 0.1, 0.3).mean().item(), rel=1e-6)
    assert parts["g"] == pytest.approx((-pc / nt).mean().item(), rel=1e-6)  # sequence normalisation
    full, _ = mpo_loss(pc, pr, rc, rr, nt, 0.3)
    assert full.item() == pytest.approx(0.8 * parts["p"] + 0.2 * parts["q"] + parts["g"], rel=1e-6)
    loss, _ = mpo_loss(pc, pr, rc, rr, nt, 0.3, generation_weight=0.0)
    assert loss.item() == pytest.approx(0.8 * parts["p"] + 0.2 * parts["q"], rel=1e-6)
    # A zero weight keeps its term out entirely: an infinite reference log-prob (a pair the
    # reference cannot produce) poisons L_p and L_q, not an SFT-only loss.
    inf = torch.full((5,), float("-inf"))
    sft_only, _ = mpo_loss(pc, pr, inf, inf, nt, 0.0, preference_weight=0.0, quality_weight=0.0)
    assert torch.isfinite(sft_only) and sft_only.item() == pytest.approx(parts["g"], rel=1e-6)


def test_sequence_normalisation_weights_every_answer_equally():
    """sequence: mean over pairs of each answer's per-token NLL (paper: −log π(y_c|x)/|y_c|);
    token: one mean over all tokens. Answers of 2 and 40 tokens with per-token NLL 1 and 3."""
    pc = torch.tensor([-2.0, -120.0])
    nt = torch.tensor([2, 40])
    same = dict(preference_weight=0.0, quality_weight=0.0)
    seq, _ = mpo_loss(pc, pc - 1, pc, pc - 1, nt, sft_normalization="sequence", **same)
    tok, _ = mpo_loss(pc, pc - 1, pc, pc - 1, nt, sft_normalization="token", **same)
    assert seq.item() == pytest.approx((1 + 3) / 2)
    assert tok.item() == pytest.approx(122 / 42)


def test_limits_large_margin_drives_preference_to_zero():
    big = torch.tensor([500.0])
    assert preference_loss(big, -big, 0.1).item() == pytest.approx(0.0, abs=1e-12)
    # Huge wrong-way margin: loss grows linearly (no overflow to inf).
    assert preference_loss(-big, big, 0.1).item() == pytest.approx(100.0, rel=1e-6)
    # BCO with δ equal to both rewards: two coin flips, 2·ln2.
    assert bco_pair_loss(torch.tensor([3.0]), torch.tensor([3.0]), 0.1, 0.3).item() == pytest.approx(
        2 * LN2, abs=1e-6
    )


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_gradients_flow_to_policy_only_through_expected_terms(normalization):
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-6.0], requires_grad=True)
    loss, _ = mpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-6.0]), torch.tensor([5]),
                       sft_normalization=normalization)  # fmt: skip
    loss.backward()
    # d/dpc: 0.8·(-β·σ(0)) + 0.2·(-β·σ(0)) + (-1/5); d/dpr: 0.8·β·σ(0) + 0.2·β·σ(0)
    # (one pair of 5 tokens: both normalisations divide the NLL by 5).
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


def test_rewards_are_beta_times_logratios_detached():
    pc = torch.tensor([-5.0, -1.0], requires_grad=True)
    logps = PairLogps(
        pc, pc - 2, torch.tensor([-6.0, -1.5]), torch.tensor([-4.0, -1.0]), torch.ones(2), torch.ones(2)
    )
    rewards = MPOLoss(LossConfig(beta=0.5)).rewards(logps)
    assert rewards.tolist() == pytest.approx([0.5, 0.25, -1.5, -1.0]) and not rewards.requires_grad


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


def test_token_sft_matches_trl(logps_batch):
    """TRL 1.16's ``sft`` is one token mean over the batch: our ``token`` normalisation."""
    per_token, mask, seq, ref, b = logps_batch
    trl = _trl_loss(["sft"], [1.0], per_token, mask, ref[:b], ref[b:])
    ours, _ = mpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], mask[:b].sum(1), preference_weight=0,
                       quality_weight=0, sft_normalization="token")  # fmt: skip
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
    ours, _ = mpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], mask[:b].sum(1), sft_normalization="token")
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6)
    # And with a nonzero δ ours differs, as it must (TRL has no shift).
    shifted, _ = mpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], mask[:b].sum(1), 0.5, sft_normalization="token")
    assert abs(shifted.item() - trl.item()) > 1e-4


def test_ipo_averages_per_token_like_trl(logps_batch):
    """IPO's squared target 1/(2β) is on per-token log-ratios (TRL 1.16, the IPO authors' form)."""
    per_token, mask, seq, ref, b = logps_batch
    trl = _trl_loss(["ipo"], [1.0], per_token, mask, ref[:b], ref[b:])
    tokens = mask.sum(1)
    w = dict(preference_type="ipo", preference_weight=1.0, quality_weight=0.0, generation_weight=0.0)
    ours, _ = mpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], tokens[:b], rejected_tokens=tokens[b:], **w)
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6)
    summed = preference_loss(seq[:b] - ref[:b], seq[b:] - ref[b:], 0.1, "ipo").mean()
    assert abs(summed.item() - trl.item()) > 1e-3  # the unnormalised form is a different loss


def test_unknown_preference_type_raises():
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss(torch.zeros(1), torch.zeros(1), 0.1, "nope")


def test_sequence_sft_is_the_official_trainers_formula():
    """The official run: InternVL's ``trainer_dpo.py`` on TRL 0.10.1 adds ``rpo_alpha`` × the
    chosen tokens' ``nn.CrossEntropyLoss()`` (a mean over the micro-batch's chosen tokens) to each
    micro-batch's loss; with per-device batch 1 and DeepSpeed averaging over accumulation steps
    and ranks, the step's loss is the mean over pairs of (0.8·L_p + 0.2·L_q + per-token NLL).
    Written here from those semantics on per-token log-probs whose chosen answers are 20 and 400
    tokens long; float64, so values and gradients agree to rounding (1e-12)."""
    g = torch.Generator().manual_seed(7)
    lengths = {"chosen": (20, 400), "rejected": (15, 30)}
    tokens = {
        k: [-torch.rand(n, generator=g, dtype=torch.float64) * 3 for n in v] for k, v in lengths.items()
    }
    for t in tokens["chosen"] + tokens["rejected"]:
        t.requires_grad_(True)
    ref = {"chosen": [-25.0, -600.0], "rejected": [-20.0, -50.0]}
    beta, delta = 0.1, 0.05

    def official() -> torch.Tensor:
        per_micro_batch = []
        for p in range(2):  # one pair per micro-batch
            dc = tokens["chosen"][p].sum() - ref["chosen"][p]
            dr = tokens["rejected"][p].sum() - ref["rejected"][p]
            sigmoid = -F.logsigmoid(beta * dc - beta * dr)
            bco = -F.logsigmoid(beta * dc - delta) - F.logsigmoid(-(beta * dr - delta))
            nll = -tokens["chosen"][p].mean()  # CrossEntropyLoss(): mean over the chosen tokens
            per_micro_batch.append(0.8 * sigmoid + 0.2 * bco + 1.0 * nll)
        return torch.stack(per_micro_batch).mean()  # averaged over accumulation steps and ranks

    def ours(normalization: str, **weights) -> torch.Tensor:
        pc = torch.stack([t.sum() for t in tokens["chosen"]])
        pr = torch.stack([t.sum() for t in tokens["rejected"]])
        loss, _ = mpo_loss(pc, pr, torch.tensor(ref["chosen"], dtype=torch.float64),
                           torch.tensor(ref["rejected"], dtype=torch.float64), torch.tensor(lengths["chosen"]),
                           delta, sft_normalization=normalization, **weights)  # fmt: skip
        return loss

    def value_and_grads(fn):
        leaves = tokens["chosen"] + tokens["rejected"]
        value = fn()
        return value.item(), torch.autograd.grad(value, leaves, allow_unused=True)

    want, want_grads = value_and_grads(official)
    got, got_grads = value_and_grads(lambda: ours("sequence"))
    assert got == pytest.approx(want, rel=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # The SFT gradient's share of the 20-token answer (dL_g/d logp is −1/n per token for sequence,
    # −1/T for token): half of it under the official formula, 20/420 = 4.8 % under one token mean.
    sft_only = {"preference_weight": 0.0, "quality_weight": 0.0}
    for normalization, share in (("sequence", 0.5), ("token", 20 / 420)):
        _, grads = value_and_grads(lambda n=normalization: ours(n, **sft_only))
        short, long_ = grads[0].sum().item(), grads[1].sum().item()
        assert short / (short + long_) == pytest.approx(share, rel=1e-9), normalization
