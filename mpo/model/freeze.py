"""Which parameters train: vision tower, projector, language model (with the LM head).

The three parts are InternVL's "ViT-MLP-LLM" (docs/internvl-format.md §1). The official MPO run trains all three;
freezing the ViT (optionally keeping its last N layers trainable) is the usual memory lever.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def freezing_problems(model_cfg: Any) -> list[str]:
    """Cross-field problems of the ``model.freeze_*`` / ``unfreeze_vision_last_n`` / ``lora`` flags.

    Returns one message per problem (empty when consistent), so ``config.validate`` can report all
    of them at once.
    """
    m = model_cfg
    problems = []
    if m.freeze_vision and m.freeze_projector and m.freeze_llm and not m.lora:
        problems.append("model.freeze_vision, freeze_projector and freeze_llm are all true: nothing to train")
    if not isinstance(m.unfreeze_vision_last_n, int) or m.unfreeze_vision_last_n < 0:
        problems.append(
            f"model.unfreeze_vision_last_n must be an integer >= 0, got {m.unfreeze_vision_last_n!r}"
        )
    elif m.unfreeze_vision_last_n and not m.freeze_vision:
        problems.append("model.unfreeze_vision_last_n only makes sense with model.freeze_vision=true")
    if m.lora and (m.freeze_vision or m.freeze_projector or m.freeze_llm or m.unfreeze_vision_last_n):
        # peft freezes every base weight; what trains is decided by model.lora.target.
        problems.append(
            "model.lora is set together with model.freeze_* / unfreeze_vision_last_n: with LoRA the base weights "
            "are frozen and model.lora.target (llm|vision|both) chooses what trains; drop the freeze flags"
        )
    return problems


def parameter_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter names of an ``InternVLForConditionalGeneration`` by part.

    Returns:
        ``{"vision": [...], "projector": [...], "llm": [...]}``; the LM head counts as LLM.
    """
    groups: dict[str, list[str]] = {"vision": [], "projector": [], "llm": []}
    for name, _ in model.named_parameters():
        if ".vision_tower." in f".{name}":
            groups["vision"].append(name)
        elif ".multi_modal_projector." in f".{name}":
            groups["projector"].append(name)
        else:
            groups["llm"].append(name)
    return groups


def trainable_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts (also per part) and the trainable share.

    Under ZeRO-3 a partitioned parameter reports ``ds_numel`` (its full size) instead of numel.
    """

    def count(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return {"trainable": trainable, "total": total, "share": trainable / max(total, 1)}


def apply_freezing(model: torch.nn.Module, model_cfg: Any) -> dict[str, Any]:
    """Set ``requires_grad`` per the ``model.freeze_*`` flags and log what trains.

    Args:
        model: an ``InternVLForConditionalGeneration`` (not yet wrapped by peft).
        model_cfg: ``ModelConfig`` (freeze_vision, freeze_projector, freeze_llm,
            unfreeze_vision_last_n, lora).

    Returns:
        ``{"trainable": int, "total": int, "share": float}``.

    Raises:
        ValueError: inconsistent flags, or more layers to unfreeze than the ViT has.
    """
    problems = freezing_problems(model_cfg)
    if problems:
        raise ValueError("; ".join(problems))
    core = model.model
    if model_cfg.freeze_vision:
        core.vision_tower.requires_grad_(False)
        n = model_cfg.unfreeze_vision_last_n
        if n:
            layers = core.vision_tower.encoder.layer
            if n > len(layers):
                raise ValueError(
                    f"model.unfreeze_vision_last_n={n} but the vision tower has {len(layers)} layers"
                )
            for layer in layers[-n:]:
                layer.requires_grad_(True)
    if model_cfg.freeze_projector:
        core.multi_modal_projector.requires_grad_(False)
    if model_cfg.freeze_llm:
        core.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    summary = trainable_summary(model)
    logger.info(
        "trainable parameters: %d of %d (%.2f%%)",
        summary["trainable"],
        summary["total"],
        100 * summary["share"],
    )
    return summary
