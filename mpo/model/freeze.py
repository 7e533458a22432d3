"""Which parameters train: vision tower, projector, language model (with the LM head)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def apply_freezing(model, model_cfg) -> dict[str, int]:
    """Set ``requires_grad`` per ``model.freeze_*`` flags; returns trainable/total counts."""
    core = model.model
    if model_cfg.freeze_vision:
        core.vision_tower.requires_grad_(False)
        n = model_cfg.unfreeze_vision_last_n
        if n:
            layers = core.vision_tower.encoder.layer
            if n > len(layers):
                raise ValueError(f"model.unfreeze_vision_last_n={n} but the vision tower has {len(layers)} layers")
            for layer in layers[-n:]:
                layer.requires_grad_(True)
    if model_cfg.freeze_projector:
        core.multi_modal_projector.requires_grad_(False)
    if model_cfg.freeze_llm:
        core.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return {"trainable": trainable, "total": total}
