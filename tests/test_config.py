"""Configuration: every YAML in configs/ validates; bad keys and types fail naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpo.config import ConfigError, load_config, parse_override, save_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert "demo.yaml" in names and "internvl2_5_1b_mpo.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    from transformers import TrainingArguments

    cfg = load_config(path)
    assert cfg.model.path and cfg.data.meta_path
    ds = cfg.training.get("deepspeed")
    if ds:
        assert (ROOT / ds).is_file(), f"{path.name}: deepspeed config {ds} missing"
        json.loads((ROOT / ds).read_text())
    # The training section must build real TrainingArguments (no DeepSpeed init on this machine).
    fields = {
        k: v
        for k, v in cfg.training.items()
        if k not in ("deepspeed", "bf16", "tf32", "resume_from_checkpoint")
    }
    fields["use_cpu"] = True
    TrainingArguments(**fields)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name
)
def test_deepspeed_jsons_parse(path):
    cfg = json.loads(path.read_text())
    assert "zero_optimization" in cfg


def test_official_hyperparameters_in_real_config():
    cfg = load_config(ROOT / "configs" / "internvl2_5_1b_mpo.yaml")
    t = cfg.training
    assert t["learning_rate"] == pytest.approx(1e-6)
    assert t["weight_decay"] == pytest.approx(0.05)
    assert t["warmup_steps"] == pytest.approx(0.03)
    assert t["lr_scheduler_type"] == "cosine"
    assert t["bf16"] is True and t["gradient_checkpointing"] is True
    assert t["per_device_train_batch_size"] == 1
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * 8 == 256
    assert (cfg.loss.preference_weight, cfg.loss.quality_weight, cfg.loss.generation_weight) == (
        0.8,
        0.2,
        1.0,
    )
    assert cfg.loss.beta == pytest.approx(0.1)
    assert cfg.data.max_length == 8192 and cfg.data.max_dynamic_patch == 12


def test_unknown_key_is_named_with_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  path: x/y\n  paht2: 1\ndata:\n  meta_path: m.json\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.paht2'.*did you mean 'path'"):
        load_config(p)


def test_unknown_training_key_and_section(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.learning_rat'.*did you mean 'learning_rate'"):
        load_config(None, ["model.path=a/b", "data.meta_path=m", "training.learning_rat=1"])
    with pytest.raises(ConfigError, match=r"unknown section 'trainng'.*did you mean 'training'"):
        load_config(None, ["trainng.max_steps=1"])


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match=r"'loss\.beta' must be float, got 'high'"):
        load_config(None, ["model.path=a/b", "data.meta_path=m", "loss.beta=high"])
    with pytest.raises(ConfigError, match=r"'training\.max_steps' must be int"):
        load_config(None, ["model.path=a/b", "data.meta_path=m", "training.max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"'model\.reference' must be"):
        load_config(None, ["model.path=a/b", "data.meta_path=m", "model.reference=twin"])


def test_overrides_parse_yaml_values_and_win_over_file(tmp_path):
    assert parse_override("training.max_steps=20") == {"training": {"max_steps": 20}}
    assert parse_override("data.system_message=") == {"data": {"system_message": ""}}
    p = tmp_path / "c.yaml"
    p.write_text(
        "model:\n  path: a/b\ndata:\n  meta_path: m\ntraining:\n  max_steps: 3\n  learning_rate: 1e-6\n"
    )
    cfg = load_config(p, ["training.max_steps=20", "loss.beta=0.2"])
    assert cfg.training["max_steps"] == 20 and cfg.loss.beta == 0.2
    assert cfg.training["learning_rate"] == pytest.approx(1e-6)  # YAML's "1e-6" string coerced to float
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("max_steps")


def test_validate_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as exc:
        load_config(
            None,
            ["loss.beta=0", "loss.preference_weight=0", "loss.quality_weight=0", "loss.generation_weight=0"],
        )
    msg = str(exc.value)
    for part in ("model.path is required", "data.meta_path is required", "loss.beta must be > 0", "all 0"):
        assert part in msg


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_roundtrips(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["training.max_steps=7", "training.sample_steps=3"])
    path = save_config(cfg, tmp_path)
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert again.extras.sample_steps == 3


def test_evaluation_without_eval_data_is_a_config_error():
    from mpo.config import ConfigError, load_config

    base = ["model.path=m", "data.meta_path=d.jsonl", "data.eval_meta_path=null"]
    with pytest.raises(ConfigError, match="training.eval_strategy=steps needs held-out pairs"):
        load_config(None, [*base, "training.eval_strategy=steps"])
    with pytest.raises(ConfigError, match="eval_on_start=true needs held-out pairs"):
        load_config(None, [*base, "training.eval_on_start=true"])
    assert load_config(None, [*base, "training.eval_strategy=no"]).data.eval_meta_path is None
