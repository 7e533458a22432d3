"""Experiment configuration: typed sections, YAML files and ``key.sub=value`` overrides.

Sections: ``model``, ``data``, ``loss`` (our dataclasses) and ``training`` (any
``transformers.TrainingArguments`` field under its own name). Unknown keys and wrong types fail
at start-up naming the key and suggesting the closest valid one; cross-field rules live in
``validate`` and report every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key."""


@dataclass
class ModelConfig:
    """Which checkpoint to train and how to hold it."""

    path: str = ""  # hub id or local folder (native -hf or original InternVLChatModel format)
    ref_path: str | None = None  # reference model; defaults to ``path``
    reference: Literal["copy", "lora_disabled", "cache"] = "copy"
    ref_cache: str | None = None  # folder written by `mpo precompute-ref` (reference = cache)
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = False
    unfreeze_vision_last_n: int = 0
    lora: dict[str, Any] | None = None  # peft LoRA settings, see mpo.model.lora
    logprob_chunk_size: int = 4096  # response tokens per LM-head chunk (bounds logits memory)
    # One LLM pass over [prompt | chosen | rejected] per pair instead of two full rows
    # (mpo.shared_prompt); needs sdpa or eager attention for its block mask.
    shared_prompt: bool = False


@dataclass
class DataConfig:
    """MMPR preference data and how it becomes model inputs."""

    meta_path: str = ""  # MMPR meta JSON (or a .jsonl file with the same columns)
    eval_meta_path: str | None = None  # held-out split, same format
    system_message: str | None = None  # None: InternVL's default system prompt
    max_length: int = 8192  # tokens per sequence (prompt + response)
    truncation: Literal["truncate_response", "skip"] = "truncate_response"
    max_dynamic_patch: int = 12  # default tile budget; a meta entry may override it
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    on_bad_sample: Literal["error", "skip"] = "error"
    max_bad_fraction: float = 0.01  # with on_bad_sample=skip: fail if more than this share is bad
    video_min_frames: int = 8
    video_max_frames: int = 32
    seed: int = 42  # subsampling for repeat_time < 1
    group_by_length: bool = False


@dataclass
class LossConfig:
    """MPO loss: w_p * preference + w_q * quality (BCO pair with delta) + w_g * generation (SFT).

    Defaults are the paper's (Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal
    Large Language Models via Mixed Preference Optimization", §3.2).
    """

    beta: float = 0.1
    preference_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    preference_weight: float = 0.8
    quality_weight: float = 0.2
    generation_weight: float = 1.0
    label_smoothing: float = 0.0  # for preference_type=sigmoid (conservative DPO)


@dataclass
class RunExtras:
    """MPO-only run settings that sit in the ``training`` section beside TrainingArguments fields."""

    sample_steps: int = 0  # every N steps, log greedy answers to fixed held-out prompts (0: off)
    sample_num_prompts: int = 4
    sample_max_new_tokens: int = 32
    run_tags: list[str] = field(default_factory=list)  # wandb tags
    # A fresh run into an output_dir that holds another run's metrics or checkpoints is refused
    # unless this is set; then those outputs are deleted first (the demo sets it).
    overwrite_output_dir: bool = False


# TrainingArguments values we set unless the YAML says otherwise; MPO needs every batch column.
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/mpo",
    "remove_unused_columns": False,
    "report_to": "none",
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 500,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "learning_rate": 1e-6,
    "seed": 42,
}


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: dict[str, Any] = field(default_factory=lambda: dict(TRAINING_DEFAULTS))
    extras: RunExtras = field(default_factory=RunExtras)
    config_path: str | None = None  # where it was loaded from (not a YAML key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "loss": dataclasses.asdict(self.loss),
            "training": {**self.training, **dataclasses.asdict(self.extras)},
        }


SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig}


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _training_fields() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as parsed from YAML) fits the annotation ``hint``."""
    if hint is Any or hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type):
        import enum

        if issubclass(hint, enum.Enum):
            return isinstance(value, str) and value in {m.value for m in hint}
        return isinstance(value, hint)
    return True  # unknown typing constructs: let TrainingArguments validate


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any) -> Any:
    # YAML 1.1 reads a bare `no` as false: `save_strategy: no` means the string "no".
    if value is False and not _type_ok(False, hint) and _type_ok("no", hint):
        return "no"
    # YAML reads 1e-6 as a string; accept numeric strings where a float is expected.
    if isinstance(value, str) and _type_ok(1.0, hint) and not _type_ok(value, hint):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and hint is float:
        return float(value)
    return value


def _apply(cfg: ExperimentConfig, raw: dict[str, Any], source: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with sections model/data/loss/training")
    valid_sections = [*SECTIONS, "training"]
    for section, values in raw.items():
        if section not in valid_sections:
            raise ConfigError(f"{source}: unknown section '{section}'{_suggest(section, valid_sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {type(values).__name__}")
        if section == "training":
            hints = _training_fields()
            for key, value in values.items():
                _set_training(cfg, hints, key, value, source)
            continue
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key '{section}.{key}'{_suggest(key, hints)}")
            value = _coerce(value, hints[key])
            if not _type_ok(value, hints[key]):
                raise ConfigError(
                    f"{source}: '{section}.{key}' must be {_describe(hints[key])}, got {value!r} ({type(value).__name__})"
                )
            setattr(obj, key, value)


def _set_training(cfg: ExperimentConfig, hints: dict[str, Any], key: str, value: Any, source: str) -> None:
    extra_hints = typing.get_type_hints(RunExtras)
    if key in extra_hints:
        value = _coerce(value, extra_hints[key])
        if not _type_ok(value, extra_hints[key]):
            raise ConfigError(
                f"{source}: 'training.{key}' must be {_describe(extra_hints[key])}, got {value!r} ({type(value).__name__})"
            )
        setattr(cfg.extras, key, value)
        return
    if key not in hints:
        raise ConfigError(
            f"{source}: unknown key 'training.{key}' (not a transformers.TrainingArguments field){_suggest(key, [*hints, *extra_hints])}"
        )
    value = _coerce(value, hints[key])
    if not _type_ok(value, hints[key]):
        raise ConfigError(
            f"{source}: 'training.{key}' must be {_describe(hints[key])}, got {value!r} ({type(value).__name__})"
        )
    cfg.training[key] = value


def parse_override(text: str) -> dict[str, Any]:
    """``model.path=/x`` -> ``{"model": {"path": "/x"}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw_value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override '{text}': the key must be section.key (e.g. training.max_steps=20)")
    try:
        value = yaml.safe_load(raw_value) if raw_value != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return {parts[0]: {parts[1]: value}}


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Defaults <- YAML file <- overrides, then ``validate``.

    Relative paths in the YAML (model.path, data.meta_path, ...) are kept as written: they resolve
    against the working directory, like the command line they came from.
    """
    cfg = ExperimentConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        _apply(cfg, raw, str(p))
        cfg.config_path = str(p)
    for text in overrides:
        _apply(cfg, parse_override(text), f"override '{text}'")
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field rules; raises one ConfigError listing every problem."""
    problems: list[str] = []
    m, d, loss, t = cfg.model, cfg.data, cfg.loss, cfg.training
    if not m.path:
        problems.append("model.path is required (a hub id or a local checkpoint folder)")
    if not d.meta_path:
        problems.append("data.meta_path is required (an MMPR meta JSON or a .jsonl file)")
    if loss.beta <= 0:
        problems.append(f"loss.beta must be > 0, got {loss.beta}")
    weights = (loss.preference_weight, loss.quality_weight, loss.generation_weight)
    if any(w < 0 for w in weights):
        problems.append("loss weights must be >= 0")
    elif sum(weights) == 0:
        problems.append(
            "loss.preference_weight, quality_weight and generation_weight are all 0: nothing to train"
        )
    if not 0 <= loss.label_smoothing < 0.5:
        problems.append(f"loss.label_smoothing must be in [0, 0.5), got {loss.label_smoothing}")
    if d.max_length < 16:
        problems.append(f"data.max_length must be >= 16, got {d.max_length}")
    if not 1 <= d.min_dynamic_patch <= d.max_dynamic_patch:
        problems.append("data.min_dynamic_patch must be >= 1 and <= data.max_dynamic_patch")
    if not 0 <= d.max_bad_fraction <= 1:
        problems.append("data.max_bad_fraction must be in [0, 1]")
    if not 1 <= d.video_min_frames <= d.video_max_frames:
        problems.append("data.video_min_frames must be >= 1 and <= data.video_max_frames")
    if t.get("load_best_model_at_end"):
        problems.append(
            "training.load_best_model_at_end is not supported: checkpoints rotate by completion, not by "
            "metric. Pick the checkpoint from metrics.jsonl's eval_* lines and `mpo consolidate` it"
        )
    if not d.eval_meta_path:
        strategy = str(t.get("eval_strategy", "no")).lower().split(".")[-1]
        if strategy != "no":
            problems.append(
                f"training.eval_strategy={strategy} needs held-out pairs: set data.eval_meta_path, "
                "or training.eval_strategy=no"
            )
        if t.get("eval_on_start"):
            problems.append("training.eval_on_start=true needs held-out pairs: set data.eval_meta_path")
    from mpo.model.freeze import freezing_problems
    from mpo.model.lora import lora_problems

    problems += freezing_problems(m)
    problems += lora_problems(m.lora)
    if m.reference == "lora_disabled" and not m.lora:
        problems.append("model.reference=lora_disabled needs model.lora settings")
    if m.shared_prompt and m.attn_implementation == "flash_attention_2":
        problems.append(
            "model.shared_prompt=true needs a block attention mask, which flash_attention_2 cannot take: "
            "use model.attn_implementation=sdpa or turn shared_prompt off"
        )
    if m.reference == "cache" and not m.ref_cache:
        problems.append("model.reference=cache needs model.ref_cache (written by `mpo precompute-ref`)")
    if m.logprob_chunk_size < 1:
        problems.append("model.logprob_chunk_size must be >= 1")
    if t.get("remove_unused_columns", False):
        problems.append("training.remove_unused_columns must stay false: MPO batches carry custom columns")
    if problems:
        where = f" in {cfg.config_path}" if cfg.config_path else ""
        raise ConfigError(f"invalid configuration{where}:\n  - " + "\n  - ".join(problems))


def save_config(cfg: ExperimentConfig, out_dir: str | os.PathLike) -> Path:
    """Write the resolved config as ``config.yaml`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    return path
