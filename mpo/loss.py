"""The MPO loss as pure functions over per-sequence log-probs.

MPO (Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models via
Mixed Preference Optimization", §3.2): L = w_p * L_p + w_q * L_q + w_g * L_g with
- L_p, preference: DPO sigmoid, -log σ(β·Δc − β·Δr) (Rafailov et al. 2023, eq. 7), or the
  hinge (SLiC) / IPO (Azar et al. 2023, eq. 17) alternatives;
- L_q, quality: BCO pair, −log σ(β·Δc − δ) − log σ(−(β·Δr − δ)) (Jung et al. 2024, eq. 9), with
  δ the running mean of all rewards seen so far;
- L_g, generation: token-mean NLL of the chosen response.
Δ = log π(y|x) − log π_ref(y|x), summed over response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def preference_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair preference loss, shape ``(B,)``.

    Args:
        chosen_logratios: Δc, ``(B,)``. rejected_logratios: Δr, ``(B,)``.
        kind: ``sigmoid`` (DPO), ``hinge`` (SLiC, relu(1 − β·(Δc − Δr))) or ``ipo``
            ((Δc − Δr − 1/(2β))²; ``mpo_loss`` passes per-token averaged log-ratios).
    """
    margin = chosen_logratios - rejected_logratios
    if kind == "sigmoid":
        return (
            -F.logsigmoid(beta * margin) * (1 - label_smoothing)
            - F.logsigmoid(-beta * margin) * label_smoothing
        )
    if kind == "hinge":
        return torch.relu(1 - beta * margin)
    if kind == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown preference loss '{kind}' (sigmoid, hinge, ipo)")


def bco_pair_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, delta: float | torch.Tensor
) -> torch.Tensor:
    """Per-pair BCO loss with reward shift δ, shape ``(B,)``."""
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


def sft_loss(chosen_nll_sum: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL over all chosen response tokens of the batch (a scalar)."""
    return chosen_nll_sum.sum() / chosen_num_tokens.sum().clamp(min=1)


@dataclass
class LossWeights:
    beta: float = 0.1
    preference_type: str = "sigmoid"
    preference_weight: float = 0.8
    quality_weight: float = 0.2
    generation_weight: float = 1.0
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> LossWeights:
        return cls(
            beta=cfg.beta,
            preference_type=cfg.preference_type,
            preference_weight=cfg.preference_weight,
            quality_weight=cfg.quality_weight,
            generation_weight=cfg.generation_weight,
            label_smoothing=cfg.label_smoothing,
        )


def mpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_nll_sum: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    delta: float | torch.Tensor,
    w: LossWeights,
    sft_denominator: float | torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
    pair_denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The combined MPO loss (mean over pairs) and its detached metrics.

    Args:
        policy_*_logps, ref_*_logps: summed response log-probs, ``(B,)``.
        chosen_nll_sum: summed NLL of each chosen response, ``(B,)`` (= −policy_chosen_logps
            when all chosen tokens are trained; kept separate so truncation and masking agree).
        chosen_num_tokens: trained tokens per chosen response, ``(B,)``.
        delta: the BCO reward shift, already updated with this batch's rewards.
        sft_denominator: tokens to divide the chosen NLL by; defaults to this batch's chosen
            token count. Data-parallel callers pass (global token count / world size) so the
            averaged gradient is that of the global token mean.
        pair_denominator: pairs to divide the preference and quality sums by; defaults to this
            batch's ``B`` (a mean). Data-parallel callers pass (global pairs / world size), so
            ranks with fewer pairs (skipped samples) still give the global pair mean.
        rejected_num_tokens: trained tokens per rejected response, ``(B,)``; with
            ``preference_type=ipo`` both log-ratios are averaged per token (as TRL 1.16 does, the
            form the IPO authors report), so it is required there.
    """
    ref_chosen_logps = ref_chosen_logps.to(policy_chosen_logps.dtype)
    ref_rejected_logps = ref_rejected_logps.to(policy_rejected_logps.dtype)
    chosen_lr = policy_chosen_logps - ref_chosen_logps
    rejected_lr = policy_rejected_logps - ref_rejected_logps
    zero = policy_chosen_logps.sum() * 0
    pref_c, pref_r = chosen_lr, rejected_lr
    if w.preference_type == "ipo":
        if rejected_num_tokens is None:
            raise ValueError("preference_type=ipo averages log-ratios per token: pass rejected_num_tokens")
        pref_c = chosen_lr / chosen_num_tokens.clamp(min=1).to(chosen_lr.dtype)
        pref_r = rejected_lr / rejected_num_tokens.clamp(min=1).to(rejected_lr.dtype)
    pairs = chosen_lr.shape[0] if pair_denominator is None else pair_denominator
    l_p = (
        preference_loss(pref_c, pref_r, w.beta, w.preference_type, w.label_smoothing).sum() / pairs
        if w.preference_weight
        else zero
    )
    l_q = bco_pair_loss(chosen_lr, rejected_lr, w.beta, delta).sum() / pairs if w.quality_weight else zero
    if not w.generation_weight:
        l_g = zero
    elif sft_denominator is None:
        l_g = sft_loss(chosen_nll_sum, chosen_num_tokens)
    else:
        l_g = chosen_nll_sum.sum() / sft_denominator
    loss = w.preference_weight * l_p + w.quality_weight * l_q + w.generation_weight * l_g
    chosen_rewards = (w.beta * chosen_lr).detach()
    rejected_rewards = (w.beta * rejected_lr).detach()
    metrics = {
        "loss/dpo": l_p.detach(),
        "loss/bco": l_q.detach(),
        "loss/sft": l_g.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
        "logps/ref_chosen": ref_chosen_logps.detach().mean(),
        "logps/ref_rejected": ref_rejected_logps.detach().mean(),
    }
    return loss, metrics


class RewardShift:
    """BCO's δ: the running mean of every reward seen so far (chosen and rejected, all ranks).

    Kept as a float64 sum and count so it is exact, order-independent within a step, and
    resumable bit-for-bit (``state_dict``/``load_state_dict``). TRL ≥ 0.29 dropped this shift
    from ``bco_pair`` (facts §5, §6); here it is training state saved in every checkpoint.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    def update(self, rewards_sum: float, count: int) -> float:
        """Fold in ``count`` rewards summing to ``rewards_sum``; returns the new δ."""
        self.total += float(rewards_sum)
        self.count += int(count)
        return self.value

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total = float(state["total"])
        self.count = int(state["count"])
