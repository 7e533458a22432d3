"""Stochastic depth ("drop path") in the vision tower, as the official MPO runs train with.

InternViT's own layer (``InternVisionEncoderLayer`` in OpenGVLab/InternVL
``internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py``) adds each residual branch
through timm's ``DropPath``: ``x + drop_path(attn(norm1(x)) · ls1)`` and
``x + drop_path(mlp(norm2(x)) · ls2)``, with rates rising linearly over the layers,
``torch.linspace(0, drop_path_rate, num_layers)``; the MPO scripts set ``--drop_path_rate 0.1``
(``shell/internvl2.5_mpo/preference_optimization/*.sh``). transformers' native
``InternVLVisionLayer`` has no drop path, so the policy's layers are switched to a subclass that
adds it; the parameters and the state dict are unchanged.

Active only in training mode: the reference model never gets it (InternVL's reference runs in
eval mode), and evaluation, generation and reference-cache precomputation run in eval mode.
The masks come from torch's global generator, which the Trainer saves in every checkpoint and
restores on resume (and gradient checkpointing replays), so a resumed run draws the same masks.

One difference from the official trainer, on purpose: we run the vision tower once per pair and
feed the features to both answers, so the chosen and the rejected sequence of a pair share one
mask per tile; InternVL repeats the pixels for the two rows, and each row draws its own mask.
"""

from __future__ import annotations

import torch
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Zero whole samples (first dimension) of ``x`` with probability ``rate``, scale the kept
    ones by ``1 / (1 − rate)`` (timm's ``drop_path`` with ``scale_by_keep``); identity when not
    training or when ``rate`` is 0.

    Args:
        x: ``(tiles, tokens, hidden)``, a residual branch.
    """
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPathVisionLayer(InternVLVisionLayer):
    """``InternVLVisionLayer`` with drop path on both residual branches (InternViT's layer)."""

    drop_path_rate: float = 0.0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attention_output, _ = self.attention(self.layernorm_before(hidden_states))
        hidden_states = hidden_states + drop_path(
            self.lambda_1 * attention_output, self.drop_path_rate, self.training
        )
        layer_output = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        if self.lambda_2 is not None:
            layer_output = self.lambda_2 * layer_output
        return hidden_states + drop_path(layer_output, self.drop_path_rate, self.training)


def apply_vision_drop_path(model: torch.nn.Module, rate: float) -> list[float]:
    """Give every layer of ``model``'s vision tower InternViT's drop path, rates
    ``linspace(0, rate, num_layers)``; returns the per-layer rates (empty when ``rate`` is 0).

    Args:
        model: an ``InternVLForConditionalGeneration`` (before any peft wrapping).
    """
    if rate <= 0.0:
        return []
    layers = model.model.vision_tower.encoder.layer
    rates = torch.linspace(0, rate, len(layers)).tolist()
    for layer, layer_rate in zip(layers, rates):
        if not isinstance(layer, InternVLVisionLayer):
            raise TypeError(f"vision layer {type(layer).__name__} is not an InternVLVisionLayer")
        layer.__class__ = DropPathVisionLayer
        layer.drop_path_rate = float(layer_rate)
    return rates
