"""LoRA on InternVL's language model, its vision tower, or both (peft).

``model.lora`` in the config is a dict::

    target: llm | vision | both        (default llm)
    r: 16                              rank
    alpha: 32                          scaling numerator (scale = alpha / r)
    dropout: 0.05
    target_modules: [q_proj, v_proj]   optional: leaf names to adapt inside the chosen part(s);
                                       InternLM2's own names (wqkv, wo, w1, w2, w3) are accepted
    modules_to_save: [projector]       optional: parts trained in full beside the adapters

Targets are one regex anchored on ``language_model`` / ``vision_tower``: a plain list of leaf names
(``q_proj``...) would also hit the ViT's ``q_proj/k_proj/v_proj`` (peft matches leaf names anywhere).
The default LLM leaves cover every backbone as it is in memory: Qwen2/Qwen3/Llama/InternLM3 and
InternLM2 (hosted as Llama, ``mpo.model.backbones``) have ``q_proj``...``down_proj``, Phi-3 its fused
``qkv_proj``/``gate_up_proj``. With adapters
disabled the model is exactly the base model, which is the MPO reference
(``model.reference=lora_disabled``): no second copy of the weights.
"""

from __future__ import annotations

import difflib
import logging
import re
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Linear layers of the LLM decoders (native names; Phi-3 fuses q|k|v and gate|up) and of InternViT
# (docs/internvl-format.md §1).
LLM_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
)  # fmt: skip
VISION_MODULES = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")
# Where each part's decoder/encoder layers live (in-memory names of InternVLForConditionalGeneration).
PART_PREFIX = {"llm": r"language_model\.layers\.\d+", "vision": r"vision_tower\.encoder\.layer\.\d+"}
SAVE_MODULES = {"projector": "multi_modal_projector"}
LORA_KEYS = {"target", "r", "alpha", "dropout", "target_modules", "modules_to_save", "bias"}
# peft's own spellings, which users will type.
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}


class LoraConfigError(ValueError):
    """``model.lora`` settings that are invalid or match nothing in the model."""


def _check_keys(lora_cfg: dict[str, Any]) -> None:
    for key in lora_cfg:
        if key not in LORA_KEYS:
            close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key, LORA_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise LoraConfigError(f"model.lora.{key}: unknown key{hint} (valid: {sorted(LORA_KEYS)})")


def lora_problems(lora_cfg: dict[str, Any] | None) -> list[str]:
    """Problems of a ``model.lora`` dict that need no model (for ``config.validate``)."""
    if not lora_cfg:
        return []
    problems = []
    try:
        _check_keys(lora_cfg)
    except LoraConfigError as exc:
        problems.append(str(exc))
    target = lora_cfg.get("target", "llm")
    if target not in ("llm", "vision", "both"):
        problems.append(f"model.lora.target must be llm, vision or both, got {target!r}")
    r = lora_cfg.get("r", 16)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"model.lora.r must be an integer >= 1, got {r!r}")
    alpha = lora_cfg.get("alpha", 2 * r if isinstance(r, int) else 32)
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        problems.append(f"model.lora.alpha must be > 0, got {alpha!r}")
    dropout = lora_cfg.get("dropout", 0.05)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"model.lora.dropout must be in [0, 1), got {dropout!r}")
    tm = lora_cfg.get("target_modules")
    if tm is not None and (
        not isinstance(tm, list) or not tm or not all(isinstance(x, str) and x for x in tm)
    ):
        problems.append(f"model.lora.target_modules must be a non-empty list of module names, got {tm!r}")
    for name in lora_cfg.get("modules_to_save") or []:
        if name not in SAVE_MODULES:
            problems.append(
                f"model.lora.modules_to_save: unknown part {name!r} (valid: {sorted(SAVE_MODULES)})"
            )
    return problems


def target_regex(target: str = "llm", target_modules: list[str] | None = None) -> str:
    """The peft ``target_modules`` regex (``re.fullmatch`` on module names) for a LoRA target.

    Args:
        target: ``llm``, ``vision`` or ``both``.
        target_modules: leaf names to adapt; default every linear layer of the chosen part(s).
    """
    parts = ["llm", "vision"] if target == "both" else [target]
    alts = []
    for part in parts:
        leaves = target_modules or (LLM_MODULES if part == "llm" else VISION_MODULES)
        leaf_re = "|".join(re.escape(x) for x in leaves)
        alts.append(rf"(?:.*\.)?{PART_PREFIX[part]}\.(?:.*\.)?(?:{leaf_re})")
    return "|".join(f"(?:{a})" for a in alts)


def matching_modules(model: torch.nn.Module, regex: str) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` the regex selects."""
    pattern = re.compile(regex)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]


def apply_lora(model: torch.nn.Module, lora_cfg: dict[str, Any]):
    """Wrap an InternVL model with LoRA adapters; the base weights are frozen.

    Args:
        model: ``InternVLForConditionalGeneration``.
        lora_cfg: ``model.lora`` (see the module docstring).

    Returns:
        A ``peft.PeftModel``; ``.base_model.model`` is the InternVL model (with LoRA layers in it),
        ``.disable_adapter()`` gives the base model for the reference.

    Raises:
        LoraConfigError: bad settings, or a target that matches no linear layer of this model.
    """
    from peft import LoraConfig, get_peft_model

    problems = lora_problems(lora_cfg)
    if problems:
        raise LoraConfigError("; ".join(problems))
    target = lora_cfg.get("target", "llm")
    leaves = native_leaves(model, lora_cfg.get("target_modules"))
    regex = target_regex(target, leaves)
    matched = matching_modules(model, regex)
    parts = ["llm", "vision"] if target == "both" else [target]
    for part in parts:
        part_re = target_regex(part, leaves)
        if not matching_modules(model, part_re):
            examples = _leaf_names(model, part)
            raise LoraConfigError(
                f"model.lora: target={target!r} with target_modules={lora_cfg.get('target_modules')} matches no linear "
                f"layer of the {part} part; its linear layers are named {examples}"
            )
    r = int(lora_cfg.get("r", 16))
    config = LoraConfig(
        r=r,
        lora_alpha=lora_cfg.get("alpha", 2 * r),
        lora_dropout=float(lora_cfg.get("dropout", 0.05)),
        target_modules=regex,
        bias=lora_cfg.get("bias", "none"),
        modules_to_save=[SAVE_MODULES[m] for m in lora_cfg.get("modules_to_save") or []] or None,
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "LoRA on %s: %d linear layers adapted; trainable parameters %d of %d (%.3f%%)",
        target, len(matched), trainable, total, 100 * trainable / max(total, 1),
    )  # fmt: skip
    return peft_model


def native_leaves(model: torch.nn.Module, target_modules: list[str] | None) -> list[str] | None:
    """``target_modules`` with InternLM2's original names replaced by what the model holds.

    An original InternLM2 checkpoint is hosted as a Llama text model (``mpo.model.backbones``), so
    ``wqkv`` is ``q_proj``/``k_proj``/``v_proj`` in memory, ``wo`` is ``o_proj`` and ``w1``/``w3``/``w2``
    are ``gate_proj``/``up_proj``/``down_proj``. Names the model has are kept as they are.
    """
    if not target_modules:
        return target_modules
    from mpo.model.backbones import ORIGINAL_LORA_NAMES

    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out: list[str] = []
    for name in target_modules:
        if name not in present and name in ORIGINAL_LORA_NAMES:
            logger.info(
                "model.lora.target_modules: %s is %s in the loaded model", name, ORIGINAL_LORA_NAMES[name]
            )
            out += [n for n in ORIGINAL_LORA_NAMES[name] if n not in out]
        elif name not in out:
            out.append(name)
    return out


def _leaf_names(model: torch.nn.Module, part: str) -> list[str]:
    prefix = re.compile(rf"(?:.*\.)?{PART_PREFIX[part]}\.")
    leaves = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and prefix.match(n)
    }
    return sorted(leaves)
