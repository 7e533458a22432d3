"""Freezing flags change exactly the intended parameter sets; inconsistent flags are errors."""

from __future__ import annotations

import logging

import pytest

from mpo.config import ModelConfig
from mpo.model.freeze import apply_freezing, freezing_problems, trainable_summary
from mpo.model.tiny import build_tiny_model


@pytest.fixture
def model(tokenizer):
    return build_tiny_model(tokenizer)


def _frozen(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _names(model, *prefixes: str) -> set[str]:
    """Parameter names under the given module prefixes, found independently of mpo.model.freeze."""
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


VISION = ("model.vision_tower.",)
PROJECTOR = ("model.multi_modal_projector.",)
LLM = ("model.language_model.", "lm_head.")


@pytest.mark.parametrize(
    ("flags", "frozen_parts"),
    [
        ({}, ()),
        ({"freeze_vision": True}, (VISION,)),
        ({"freeze_projector": True}, (PROJECTOR,)),
        ({"freeze_llm": True}, (LLM,)),
        ({"freeze_vision": True, "freeze_llm": True}, (VISION, LLM)),
        ({"freeze_vision": True, "freeze_projector": True}, (VISION, PROJECTOR)),
    ],
)
def test_each_flag_freezes_exactly_its_part(model, flags, frozen_parts):
    apply_freezing(model, ModelConfig(**flags))
    expected = set().union(*(_names(model, *part) for part in frozen_parts)) if frozen_parts else set()
    assert _frozen(model) == expected
    # The three parts cover every parameter: nothing is left out of the flags' reach.
    assert _names(model, *VISION, *PROJECTOR, *LLM) == {n for n, _ in model.named_parameters()}


def test_unfreeze_vision_last_n_keeps_only_the_last_layers(model):
    apply_freezing(model, ModelConfig(freeze_vision=True, unfreeze_vision_last_n=1))
    trainable_vision = _names(model, *VISION) - _frozen(model)
    assert trainable_vision == _names(model, "model.vision_tower.encoder.layer.1.")
    assert _names(model, "model.vision_tower.embeddings.", "model.vision_tower.encoder.layer.0.") <= _frozen(
        model
    )
    assert not (_names(model, *PROJECTOR, *LLM) & _frozen(model))


def test_unfreeze_more_layers_than_exist_is_an_error(model):
    with pytest.raises(ValueError, match="vision tower has 2 layers"):
        apply_freezing(model, ModelConfig(freeze_vision=True, unfreeze_vision_last_n=3))


def test_counts_and_log(model, caplog):
    with caplog.at_level(logging.INFO, logger="mpo.model.freeze"):
        summary = apply_freezing(model, ModelConfig(freeze_vision=True))
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith(VISION))
    total = sum(p.numel() for p in model.parameters())
    assert summary["total"] == total and summary["trainable"] == total - vision
    assert summary["share"] == pytest.approx((total - vision) / total)
    assert summary == trainable_summary(model)
    assert f"trainable parameters: {total - vision} of {total}" in caplog.text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"freeze_vision": True, "freeze_projector": True, "freeze_llm": True}, "nothing to train"),
        ({"unfreeze_vision_last_n": 2}, "only makes sense with model.freeze_vision=true"),
        ({"unfreeze_vision_last_n": -1}, "must be an integer >= 0"),
        ({"freeze_llm": True, "lora": {"target": "llm"}}, "drop the freeze flags"),
    ],
)
def test_inconsistent_flags(model, flags, message):
    cfg = ModelConfig(**flags)
    assert any(message in p for p in freezing_problems(cfg))
    with pytest.raises(ValueError, match=message):
        apply_freezing(model, cfg)
    assert not _frozen(model)  # nothing was changed before the error


def test_lora_alone_has_no_freezing_problem():
    # With LoRA, peft freezes the base and the adapters train: no freeze flag is needed.
    assert freezing_problems(ModelConfig(lora={"target": "llm"})) == []
