"""Configuration: every YAML in configs/ validates; bad keys and types fail naming the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

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


# What the official MPO scripts set (OpenGVLab/InternVL at 2410d1d, internvl_chat/shell/...):
# (config, start model, lr, max length, ZeRO stage).
OFFICIAL = [
    ("internvl2_5_1b_mpo.yaml", "OpenGVLab/InternVL2_5-1B", 1e-6, 8192, 1),
    ("internvl2_5_8b_mpo.yaml", "OpenGVLab/InternVL2_5-8B", 1e-6, 8192, 1),
    ("internvl3_8b_mpo.yaml", "OpenGVLab/InternVL3-8B-Instruct", 2e-7, 12288, 3),
]


@pytest.mark.parametrize("name,start,lr,max_length,stage", OFFICIAL, ids=[o[0] for o in OFFICIAL])
def test_official_recipes(name, start, lr, max_length, stage):
    from mpo.distributed import deepspeed_stage

    cfg = load_config(ROOT / "configs" / name)
    t = cfg.training
    # The SFT model the official run starts from (not its -MPO result): the reference is this model.
    assert cfg.model.path == start and cfg.model.ref_path is None and cfg.model.reference == "copy"
    assert t["learning_rate"] == pytest.approx(lr) and cfg.data.max_length == max_length
    assert deepspeed_stage(str(ROOT / t["deepspeed"])) == stage
    assert t["num_train_epochs"] == 1 and t["weight_decay"] == pytest.approx(0.05)
    assert t["warmup_steps"] == pytest.approx(0.03) and t["lr_scheduler_type"] == "cosine"
    assert t["bf16"] is True and t["gradient_checkpointing"] is True
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * 8 == 256
    assert (cfg.loss.preference_weight, cfg.loss.quality_weight, cfg.loss.generation_weight) == (
        0.8,
        0.2,
        1.0,
    )
    assert cfg.loss.beta == pytest.approx(0.1) and cfg.loss.sft_normalization == "sequence"
    assert cfg.model.vision_drop_path_rate == pytest.approx(0.1)
    assert not (cfg.model.freeze_vision or cfg.model.freeze_projector or cfg.model.freeze_llm)
    assert cfg.data.max_dynamic_patch == 12 and cfg.data.use_thumbnail
    header = "".join((ROOT / "configs" / name).read_text().splitlines()[:3])
    assert "2410d1d" in header and "_mpo.sh" in header  # the header cites the official script


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
    with pytest.raises(
        ConfigError, match=r"'model\.reference' must be one of copy, lora_disabled, cache, got 'twin'"
    ):
        load_config(None, ["model.path=a/b", "data.meta_path=m", "model.reference=twin"])
    with pytest.raises(ConfigError, match=r"'loss\.preference_type' must be one of sigmoid, hinge, ipo"):
        load_config(None, ["model.path=a/b", "data.meta_path=m", "loss.preference_type=dpo"])
    # strict: a string is not silently an int, nor an int a bool
    with pytest.raises(ConfigError, match=r"'training\.max_steps' must be int, got '5'"):
        load_config(None, ["model.path=a/b", "data.meta_path=m", "training.max_steps='5'"])
    with pytest.raises(ConfigError, match=r"'model\.freeze_llm' must be bool, got 1"):
        load_config(None, ["model.path=a/b", "data.meta_path=m", "model.freeze_llm=1"])


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


def test_one_knob_for_length_grouping():
    base = ["model.path=m", "data.meta_path=d.jsonl"]
    with pytest.raises(
        ConfigError, match="train_sampling_strategy=group_by_length .* use data.group_by_length=true"
    ):
        load_config(None, [*base, "training.train_sampling_strategy=group_by_length"])
    assert load_config(None, [*base, "data.group_by_length=true"]).data.group_by_length


def test_print_config_and_help_list_every_key(capsys):
    from mpo.cli import main
    from mpo.config import SECTIONS, RunExtras

    assert (
        main(
            [
                "train",
                "--config",
                str(ROOT / "configs" / "demo.yaml"),
                "--print-config",
                "training.max_steps=7",
            ]
        )
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(ROOT / "configs" / "demo.yaml", ["training.max_steps=7"]).to_dict()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for section, cls in [*SECTIONS.items(), ("training", RunExtras)]:
        for f in dataclasses.fields(cls):
            assert f"  {f.name} = " in text, (section, f.name)
    assert "sft_normalization = 'sequence'" in text and "one of sequence, token" in text


def test_unknown_commands_suggest_the_closest(capsys):
    from mpo.cli import main

    assert (
        main(["trian"]) == 2 and "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err
    )
    assert main(["data", "chek"]) == 2
    assert "unknown subcommand 'chek'; did you mean 'check'?" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["data", "check", "--help"],
                                  ["report", "--help"], ["convert", "--help"], ["precompute-ref", "--help"]])  # fmt: skip
def test_help_imports_neither_torch_nor_transformers(argv):
    """`mpo --help` and `mpo COMMAND --help` must answer at once: no torch/transformers import."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom mpo.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules)\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
