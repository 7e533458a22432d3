"""LoRA: targets stay in their part, bad settings are named, the reference is the base, LoRA-MPO
trains and its merged export loads with from_pretrained and gives the adapter model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from mpo.model.lora import LoraConfigError, apply_lora, lora_problems, target_regex
from mpo.model.tiny import build_tiny_model

LLM_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VIT_LEAVES = {"q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"}


def _adapted(peft_model) -> set[str]:
    """Names (relative to the InternVL model) of modules that carry a LoRA A matrix."""
    inner = peft_model.base_model.model
    return {n for n, m in inner.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}


def _expected(model, part: str, leaves: set[str]) -> set[str]:
    prefix = "model.language_model.layers." if part == "llm" else "model.vision_tower.encoder.layer."
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith(prefix) and n.rsplit(".", 1)[1] in leaves
    }


@pytest.mark.parametrize("target", ["llm", "vision", "both"])
def test_default_targets_stay_in_their_part(tokenizer, target):
    model = build_tiny_model(tokenizer)
    expected = set()
    if target in ("llm", "both"):
        expected |= _expected(model, "llm", LLM_LEAVES)
    if target in ("vision", "both"):
        expected |= _expected(model, "vision", VIT_LEAVES)
    peft_model = apply_lora(model, {"target": target, "r": 2})
    assert _adapted(peft_model) == expected
    n_llm, n_vit = 7 * 2, 6 * 2  # linear layers per decoder / encoder layer x 2 layers
    assert len(expected) == {"llm": n_llm, "vision": n_vit, "both": n_llm + n_vit}[target]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_leaf_override_does_not_leak_into_the_vit(tokenizer):
    """A plain ['q_proj', 'v_proj'] list in peft would also hit InternViT's q/v (peft matches leaf names anywhere)."""
    model = build_tiny_model(tokenizer)
    expected = _expected(model, "llm", {"q_proj", "v_proj"})
    peft_model = apply_lora(model, {"target": "llm", "target_modules": ["q_proj", "v_proj"]})
    adapted = _adapted(peft_model)
    assert adapted == expected and len(expected) == 4
    assert not any("vision_tower" in n for n in adapted)


def test_regex_examples():
    import re

    rx = re.compile(target_regex("llm"))
    assert rx.fullmatch("model.language_model.layers.3.self_attn.q_proj")
    assert rx.fullmatch("model.language_model.layers.0.mlp.down_proj")
    assert not rx.fullmatch("model.vision_tower.encoder.layer.0.attention.q_proj")
    assert not rx.fullmatch("lm_head")
    assert not rx.fullmatch("model.language_model.layers.0.self_attn.q_proj.lora_A.default")


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"target": "llm", "target_modules": ["qkv"]}, "matches no linear layer of the llm part"),
        ({"target": "vision", "target_modules": ["gate_proj"]}, "matches no linear layer of the vision part"),
        ({"target": "both", "target_modules": ["fc1"]}, "of the llm part; its linear layers are named"),
        ({"target": "decoder"}, "must be llm, vision or both"),
        ({"rank": 8}, "did you mean 'r'"),
        ({"r": 0}, "model.lora.r must be an integer >= 1"),
        ({"dropout": 1.5}, "model.lora.dropout"),
        ({"target_modules": "q_proj"}, "must be a non-empty list"),
    ],
)
def test_bad_lora_settings_are_named(tokenizer, lora, message):
    model = build_tiny_model(tokenizer)
    with pytest.raises(LoraConfigError, match=message):
        apply_lora(model, lora)


def test_lora_problems_without_a_model():
    assert lora_problems(None) == [] and lora_problems({"target": "both", "r": 8, "alpha": 16}) == []
    assert len(lora_problems({"target": "x", "r": -1, "alpha": 0})) == 3


def _inputs(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    ids = [1, 7] + [cfg.image_token_id] * cfg.image_seq_length + [9, 11, 12]
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, 64, 64, generator=g)}


def test_disabled_adapters_give_the_base_model(tokenizer):
    base = build_tiny_model(tokenizer)
    inputs = _inputs(base)
    with torch.no_grad():
        expected = base(**inputs).logits
    peft_model = apply_lora(build_tiny_model(tokenizer), {"target": "both", "r": 2, "dropout": 0.0})
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # B starts at 0; make the adapters do something
                p.normal_(0, 0.5)
        inner = peft_model.base_model.model
        adapted = inner(**inputs).logits
        with peft_model.disable_adapter():
            reference = inner(**inputs).logits
    assert not torch.allclose(adapted, expected, atol=1e-3)
    assert torch.equal(reference, expected)


@pytest.mark.slow
def test_lora_mpo_trains_and_merged_export_matches(tiny_config, tmp_path):
    """LoRA-MPO with reference = base with adapters disabled; export merges; logits agree."""
    from mpo.model.cli import cmd_export
    from mpo.model.convert import load_original_as_native
    from mpo.run import build_trainer

    cfg = tiny_config(
        "model.reference=lora_disabled",
        "model.lora={target: both, r: 4, alpha: 8, dropout: 0.0}",
        "training.max_steps=2",
        "training.save_steps=2",
        "training.learning_rate=1e-2",
    )
    trainer, _ = build_trainer(cfg)  # freezing, LoRA, no reference copy: the real path
    assert trainer.ref_model is None
    model = trainer.model
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [r for r in trainer.state.log_history if "logps/chosen" in r]
    # After one update the policy (adapters on) and the reference (adapters off) differ.
    assert logs[-1]["logps/chosen"] != logs[-1]["logps/ref_chosen"]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)
    final = tmp_path / "final"
    trainer.save_model(str(final))
    assert (final / "adapter_config.json").is_file()
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (
        Path(base).is_absolute() and Path(base) == Path(cfg.model.path).resolve()
    )  # export works from any cwd

    peft_model = trainer.accelerator.unwrap_model(trainer.model).eval()
    inputs = _inputs(peft_model.base_model.model)
    with torch.no_grad():
        expected = peft_model.base_model.model(**inputs).logits

    assert cmd_export([str(final), str(tmp_path / "no-merge")]) == 2  # adapters need --merge-lora
    assert cmd_export(["--merge-lora", str(final), str(tmp_path / "native")]) == 0
    merged = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "native")).eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        got = merged(**inputs).logits
    # W + s·BA merged in float32 vs applied on the fly: each logit sums ~100 products either way,
    # so they differ by ~100·ε·|terms| ≪ 1e-4 for logits of magnitude ≤ ~10.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    card = (tmp_path / "native" / "README.md").read_text()
    assert str(cfg.model.path) in card and "Lora merged: True" in card

    assert cmd_export(["--merge-lora", str(final), str(tmp_path / "orig"), "--format", "original"]) == 0
    assert json.loads((tmp_path / "orig" / "config.json").read_text())["architectures"] == [
        "InternVLChatModel"
    ]
    with torch.no_grad():
        got_orig = load_original_as_native(Path(tmp_path / "orig"))(**inputs).logits
    assert torch.equal(got_orig, got)
