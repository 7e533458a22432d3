"""The MPO loss: a small module over typed per-pair log-probs, returning per-pair terms.

MPO (Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models via
Mixed Preference Optimization", arXiv:2411.10442, §3.2): L = w_p·L_p + w_q·L_q + w_g·L_g with
- L_p, preference: DPO sigmoid, −log σ(β·Δc − β·Δr) (Rafailov et al. 2023, eq. 7), or the
  hinge (SLiC, relu(1 − β·(Δc − Δr))) / IPO (Azar et al. 2023, eq. 17) alternatives;
- L_q, quality: BCO pair, −log σ(β·Δc − δ) − log σ(−(β·Δr − δ)) (Jung et al. 2024, eq. 9), with
  δ the running mean of every reward seen so far (``RewardShift``);
- L_g, generation: the chosen answer's NLL, −log π(y_c|x)/|y_c| per pair (the paper's form).
Δ = log π(y|x) − log π_ref(y|x), summed over response tokens.

``MPOLoss`` returns the terms per pair; the trainer chooses the denominators (pairs and tokens of
a whole optimizer step, over every rank) and ``MPOLoss.combine`` applies the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mpo.config import LossConfig


@dataclass
class PairLogps:
    """Summed response log-probs of ``B`` pairs, every field ``(B,)``."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # trained tokens of each chosen response
    rejected_tokens: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.policy_chosen.shape[0])

    def logratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δc, Δr), in the policy's dtype."""
        dtype = self.policy_chosen.dtype
        return (
            self.policy_chosen - self.ref_chosen.to(dtype),
            self.policy_rejected - self.ref_rejected.to(dtype),
        )


@dataclass
class PairTerms:
    """Per-pair loss terms and rewards, every field ``(B,)``.

    ``sft`` is the chosen NLL divided by its own token count (``sft_normalization=sequence``) or
    left summed (``token``, to be divided by the step's token count).
    """

    preference: torch.Tensor
    quality: torch.Tensor
    sft: torch.Tensor
    chosen_rewards: torch.Tensor  # β·Δc, detached
    rejected_rewards: torch.Tensor  # β·Δr, detached


def preference_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair preference loss, ``(B,)``, from Δc and Δr ``(B,)`` each.

    ``kind``: ``sigmoid`` (DPO, conservative with ``label_smoothing``), ``hinge``
    (relu(1 − β·(Δc − Δr))) or ``ipo`` ((Δc − Δr − 1/(2β))²; ``MPOLoss`` passes per-token log-ratios
    there, as TRL 1.16 does).
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
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, delta: float
) -> torch.Tensor:
    """Per-pair BCO loss with reward shift δ, ``(B,)``."""
    return -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))


class RewardShift:
    """BCO's δ: the running mean of every reward seen so far (chosen and rejected, all ranks).

    Kept as a float64 sum and count, so it is exact, independent of the order within a step, and
    resumable bit for bit. TRL ≥ 0.29 dropped this shift from ``bco_pair``; here it is training
    state saved in every checkpoint.
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


class MPOLoss(torch.nn.Module):
    """``w_p·L_p + w_q·L_q(δ) + w_g·L_g`` per pair; owns δ.

    Args:
        cfg: the ``loss`` config section (weights, β, preference type, SFT normalisation).
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.reward_shift = RewardShift()

    @property
    def delta(self) -> float:
        return self.reward_shift.value

    def rewards(self, logps: PairLogps) -> torch.Tensor:
        """β·Δc and β·Δr of every pair, detached, ``(2B,)``: what δ averages."""
        chosen, rejected = logps.logratios()
        return self.cfg.beta * torch.cat([chosen, rejected]).detach()

    def forward(self, logps: PairLogps) -> PairTerms:
        c = self.cfg
        chosen, rejected = logps.logratios()
        pref_c, pref_r = chosen, rejected
        if c.preference_type == "ipo":
            pref_c = chosen / logps.chosen_tokens.clamp(min=1).to(chosen.dtype)
            pref_r = rejected / logps.rejected_tokens.clamp(min=1).to(rejected.dtype)
        nll = -logps.policy_chosen
        if c.sft_normalization == "sequence":
            nll = nll / logps.chosen_tokens.clamp(min=1).to(nll.dtype)
        return PairTerms(
            preference=preference_loss(pref_c, pref_r, c.beta, c.preference_type, c.label_smoothing),
            quality=bco_pair_loss(chosen, rejected, c.beta, self.delta),
            sft=nll,
            chosen_rewards=(c.beta * chosen).detach(),
            rejected_rewards=(c.beta * rejected).detach(),
        )

    def sft_denominator(self, pairs: float, tokens: float) -> float:
        """What the summed ``sft`` terms are divided by: pairs (sequence) or tokens (token)."""
        return pairs if self.cfg.sft_normalization == "sequence" else tokens

    def combine(self, terms: PairTerms, pairs: float, tokens: float) -> torch.Tensor:
        """The weighted loss: L_p and L_q summed over pairs and divided by ``pairs``; L_g summed
        and divided by ``sft_denominator(pairs, tokens)``. A weight of 0 drops its term (no NaN
        from it reaches the gradient)."""
        c = self.cfg
        zero = terms.sft.sum() * 0
        loss = zero
        if c.preference_weight:
            loss = loss + c.preference_weight * terms.preference.sum() / pairs
        if c.quality_weight:
            loss = loss + c.quality_weight * terms.quality.sum() / pairs
        if c.generation_weight:
            loss = loss + c.generation_weight * terms.sft.sum() / self.sft_denominator(pairs, tokens)
        return loss
