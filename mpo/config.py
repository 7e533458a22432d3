"""Experiment configuration: typed sections, YAML files and ``key.sub=value`` overrides.

Sections: ``model``, ``data``, ``loss`` (dataclasses below) and ``training`` (any
``transformers.TrainingArguments`` field under its own name, plus the MPO run settings of
``RunExtras``). Defaults <- YAML <- overrides; each value is type-checked against its annotation
(pydantic, strict) as it is set, so an unknown key or a wrong type fails at start-up naming the
key (and the closest valid key); cross-field rules live in ``validate`` and report every problem
at once. This module imports neither torch nor transformers at import time: ``mpo --help`` and
``mpo train --help`` stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key."""


def opt(default: Any, help: str) -> Any:  # noqa: A002 (the name argparse users expect)
    """A dataclass field with a help text (shown by ``mpo train --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """Which checkpoint to train and how to hold it."""

    path: str = opt("", "hub id or local folder (native -hf or original InternVLChatModel format)")
    ref_path: str | None = opt(None, "reference model; default: model.path")
    reference: Literal["copy", "lora_disabled", "cache"] = opt(
        "copy", "copy: a frozen copy; lora_disabled: the LoRA base; cache: precomputed log-probs"
    )
    ref_cache: str | None = opt(None, "folder written by `mpo precompute-ref` (reference=cache)")
    torch_dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "parameter dtype when loading")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = opt(
        "auto",
        "attention kernel; auto: flash_attention_2 on CUDA with flash-attn installed, else flex_attention "
        "on CUDA, else sdpa. Shared-prompt and packed pairs use the same kind (mpo.pair_attention)",
    )
    freeze_vision: bool = opt(False, "freeze the vision tower")
    freeze_projector: bool = opt(False, "freeze the MLP projector")
    freeze_llm: bool = opt(False, "freeze the language model and LM head")
    unfreeze_vision_last_n: int = opt(0, "with freeze_vision: train the last N ViT layers")
    vision_drop_path_rate: float = opt(
        0.0, "stochastic depth in the policy's ViT, rates linspace(0, r, layers) (official MPO runs: 0.1)"
    )
    lora: dict[str, Any] | None = opt(None, "peft LoRA settings {target: llm|vision|both, r, alpha, dropout}")
    logprob_chunk_size: int = opt(4096, "response tokens per LM-head call (bounds the logits memory)")
    shared_prompt: bool = opt(False, "one LLM pass over [prompt | chosen | rejected] per pair")


@dataclass
class DataConfig:
    """MMPR preference data and how it becomes model inputs."""

    meta_path: str = opt("", "MMPR meta JSON, a .jsonl file, or a HF datasets folder/.parquet/.arrow")
    eval_meta_path: str | None = opt(None, "held-out pairs, same formats")
    system_message: str | None = opt(None, "system prompt; default: the chat template's")
    template: Literal["auto", "internvl2_5", "internlm2-chat", "Hermes-2", "phi3-chat"] = opt(
        "auto", "chat template; auto: the checkpoint's (`template` in an original config.json)"
    )
    max_length: int = opt(8192, "tokens per sequence (prompt + response); image spans are never cut")
    truncation: Literal["truncate_response", "skip"] = opt(
        "truncate_response", "what to do with a sequence over max_length"
    )
    max_dynamic_patch: int = opt(12, "tile budget per sample; a meta entry may override it")
    min_dynamic_patch: int = opt(1, "fewest tiles per image")
    use_thumbnail: bool = opt(True, "add a thumbnail tile when an image has several tiles")
    on_bad_sample: Literal["error", "skip"] = opt(
        "error", "a bad line stops the run, or is skipped and counted"
    )
    max_bad_fraction: float = opt(0.01, "with on_bad_sample=skip: fail when more than this share is bad")
    video_min_frames: int = opt(8, "fewest frames sampled from a video")
    video_max_frames: int = opt(
        32, "most frames sampled from a video (fewer when the sequence budget or the clip is shorter)"
    )
    video_sampling: Literal["rand", "middle"] = opt(
        "rand",
        "training frames: rand = a random count up to the most that fit and a random frame per "
        "segment, seeded per sample and epoch (InternVL); middle = the most that fit, segment "
        "middles (evaluation and the reference cache always use middle)",
    )
    seed: int = opt(42, "seed of subsamples (repeat_time < 1) and of per-sample random views")
    follow_symlinks_outside_root: bool = opt(
        False, "allow media paths that are symlinks to files outside their dataset root"
    )
    group_by_length: bool = opt(False, "batch pairs of similar estimated length (less padding)")
    packing: bool = opt(
        False,
        "training micro-batches are whole pairs packed into one row under max_tokens_per_batch, no padding "
        "(each pair [prompt | chosen | rejected]; replaces per_device_train_batch_size)",
    )
    max_tokens_per_batch: int = opt(16384, "with packing: tokens per micro-batch, image tokens counted")
    length_cache_dir: str | None = opt(
        None,
        "folder of cached length indexes (`mpo data index`); default $MPO_CACHE/lengths or ~/.cache/mpo/lengths",
    )
    length_workers: int | None = opt(
        None, "worker processes per rank building the length index; 0: in-process; default: CPUs per rank"
    )


@dataclass
class LossConfig:
    """MPO loss: w_p·preference + w_q·quality (BCO pair with δ) + w_g·generation (SFT).

    Defaults are the paper's (Wang et al. 2024, arXiv:2411.10442, §3.2).
    """

    beta: float = opt(0.1, "β of the preference and quality terms")
    preference_type: Literal["sigmoid", "hinge", "ipo"] = opt("sigmoid", "preference loss (DPO sigmoid)")
    preference_weight: float = opt(0.8, "w_p")
    quality_weight: float = opt(0.2, "w_q (BCO pair with its running reward shift δ)")
    generation_weight: float = opt(1.0, "w_g (SFT on the chosen answer)")
    label_smoothing: float = opt(0.0, "conservative DPO, for preference_type=sigmoid")
    sft_normalization: Literal["sequence", "token"] = opt(
        "sequence",
        "sequence: mean over pairs of each chosen answer's per-token NLL (paper, official run); "
        "token: one token mean over the optimizer step",
    )


# Benchmark answer instructions: InternVL's own evaluation prompts (internvl_chat/eval/mmbench/
# evaluate_mmbench.py for multiple choice, internvl_chat/eval/vqa/evaluate_vqa.py for short answers).
BENCHMARK_MC_PROMPT = "Answer with the option's letter from the given choices directly."
BENCHMARK_OPEN_PROMPT = "Answer the question using a single word or phrase."


@dataclass
class RunExtras:
    """MPO-only run settings that sit in the ``training`` section beside TrainingArguments fields."""

    sample_steps: int = opt(0, "every N steps, log greedy answers to fixed held-out prompts (0: off)")
    sample_num_prompts: int = opt(4, "prompts for sample_steps")
    sample_max_new_tokens: int = opt(32, "tokens per sampled answer")
    run_tags: list[str] = opt([], "wandb tags")
    eval_benchmarks: list[str] = opt(
        [], "VLMEvalKit-style TSV benchmarks answered greedily during training (accuracy into metrics.jsonl)"
    )
    eval_benchmark_steps: int = opt(
        0, "benchmark every N steps, besides the start and the end (0: those two only)"
    )
    eval_benchmark_max_new_tokens: int = opt(32, "tokens per benchmark answer")
    eval_benchmark_batch_size: int = opt(8, "questions per generate call (per process)")
    eval_benchmark_limit: int = opt(0, "answer only the first N questions of each benchmark (0: all)")
    eval_benchmark_mc_prompt: str = opt(
        BENCHMARK_MC_PROMPT, "instruction after a multiple-choice question (InternVL's MMBench prompt)"
    )
    eval_benchmark_open_prompt: str = opt(
        BENCHMARK_OPEN_PROMPT, "instruction after a short-answer question (InternVL's VQA prompt)"
    )
    overwrite_output_dir: bool = opt(
        False, "a fresh run into an output_dir holding another run's outputs deletes them (else refused)"
    )


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


# ---- typing ----------------------------------------------------------------------------------
def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


@functools.cache
def training_fields() -> dict[str, Any]:
    """Type hints of every ``transformers.TrainingArguments`` init field (imports transformers)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _literal_values(hint: Any) -> tuple | None:
    """The allowed values when ``hint`` is a Literal (or Literal | None)."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return typing.get_args(args[0])
    return None


def _yaml_quirks(value: Any, hint: Any) -> Any:
    """What YAML 1.1 reads differently from what the user meant."""
    from pydantic import TypeAdapter, ValidationError

    def fits(v: Any) -> bool:
        try:
            TypeAdapter(hint).validate_python(v, strict=True)
            return True
        except (ValidationError, TypeError):
            return False

    # A bare `no` reads as false: `save_strategy: no` means the string "no".
    if value is False and not fits(False) and fits("no"):
        return "no"
    # PyYAML reads 1e-6 (no dot) as a string; accept numeric strings where a number is expected.
    if isinstance(value, str) and not fits(value) and fits(1.0):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_value(value: Any, hint: Any, key: str, source: str) -> Any:
    """``value`` validated against ``hint`` (strict: no silent str -> int); ConfigError naming ``key``."""
    from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

    value = _yaml_quirks(value, hint)
    try:
        adapter = TypeAdapter(hint)
    except (PydanticSchemaGenerationError, TypeError):
        return value  # an annotation pydantic cannot express: TrainingArguments validates it
    try:
        checked = adapter.validate_python(value, strict=True)
    except ValidationError:
        allowed = _literal_values(hint)
        if allowed is not None:
            raise ConfigError(
                f"{source}: '{key}' must be one of {', '.join(str(a) for a in allowed)}, got {value!r}"
            ) from None
        raise ConfigError(
            f"{source}: '{key}' must be {_describe(hint)}, got {value!r} ({type(value).__name__})"
        ) from None
    # Keep YAML's own objects (a dict stays a dict, an enum-typed field keeps its string).
    return checked if isinstance(checked, (bool, int, float)) and not isinstance(value, str) else value


# ---- loading ---------------------------------------------------------------------------------
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
        for key, value in values.items():
            if section == "training":
                _set_training(cfg, key, value, source)
                continue
            hints = _hints(SECTIONS[section])
            if key not in hints:
                raise ConfigError(f"{source}: unknown key '{section}.{key}'{_suggest(key, hints)}")
            setattr(getattr(cfg, section), key, check_value(value, hints[key], f"{section}.{key}", source))


def _set_training(cfg: ExperimentConfig, key: str, value: Any, source: str) -> None:
    extra_hints = _hints(RunExtras)
    if key in extra_hints:
        setattr(cfg.extras, key, check_value(value, extra_hints[key], f"training.{key}", source))
        return
    hints = training_fields()
    if key not in hints:
        raise ConfigError(
            f"{source}: unknown key 'training.{key}' (not a transformers.TrainingArguments field)"
            + _suggest(key, [*hints, *extra_hints])
        )
    cfg.training[key] = check_value(value, hints[key], f"training.{key}", source)


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
    path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), check: bool = True
) -> ExperimentConfig:
    """Defaults <- YAML file <- overrides, then ``validate`` (unless ``check`` is false).

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
    if check:
        validate(cfg)
    return cfg


def load_section(section: str, values: dict[str, Any], source: str):
    """One typed section (``model``, ``data`` or ``loss``) from a dict, defaults for missing keys."""
    cfg = ExperimentConfig()
    _apply(cfg, {section: values}, source)
    return getattr(cfg, section)


# ---- cross-field rules -----------------------------------------------------------------------
def validate(cfg: ExperimentConfig) -> None:
    """Cross-field rules; raises one ConfigError listing every problem."""
    from mpo.model.freeze import freezing_problems
    from mpo.model.lora import lora_problems

    problems = model_problems(cfg.model) + data_problems(cfg.data) + loss_problems(cfg.loss)
    problems += training_problems(cfg)
    problems += freezing_problems(cfg.model) + lora_problems(cfg.model.lora)
    if problems:
        where = f" in {cfg.config_path}" if cfg.config_path else ""
        raise ConfigError(f"invalid configuration{where}:\n  - " + "\n  - ".join(problems))


def model_problems(m: ModelConfig) -> list[str]:
    problems = []
    if not m.path:
        problems.append("model.path is required (a hub id or a local checkpoint folder)")
    if m.reference == "lora_disabled" and not m.lora:
        problems.append("model.reference=lora_disabled needs model.lora settings")
    if m.reference == "cache" and not m.ref_cache:
        problems.append("model.reference=cache needs model.ref_cache (written by `mpo precompute-ref`)")
    if m.logprob_chunk_size < 1:
        problems.append("model.logprob_chunk_size must be >= 1")
    if not 0 <= m.vision_drop_path_rate < 1:
        problems.append(f"model.vision_drop_path_rate must be in [0, 1), got {m.vision_drop_path_rate}")
    return problems


def data_problems(d: DataConfig) -> list[str]:
    problems = []
    if not d.meta_path:
        problems.append("data.meta_path is required (an MMPR meta JSON or a .jsonl file)")
    if d.max_length < 16:
        problems.append(f"data.max_length must be >= 16, got {d.max_length}")
    if not 1 <= d.min_dynamic_patch <= d.max_dynamic_patch:
        problems.append("data.min_dynamic_patch must be >= 1 and <= data.max_dynamic_patch")
    if not 0 <= d.max_bad_fraction <= 1:
        problems.append("data.max_bad_fraction must be in [0, 1]")
    if not 1 <= d.video_min_frames <= d.video_max_frames:
        problems.append("data.video_min_frames must be >= 1 and <= data.video_max_frames")
    if d.packing and d.group_by_length:
        problems.append("data.packing=true already groups pairs by tokens: set data.group_by_length=false")
    if d.packing and d.max_tokens_per_batch < d.max_length:
        problems.append(
            f"data.max_tokens_per_batch ({d.max_tokens_per_batch}) must be >= data.max_length ({d.max_length}): "
            "a micro-batch holds at least one whole pair"
        )
    if d.length_workers is not None and d.length_workers < 0:
        problems.append(f"data.length_workers must be >= 0 (0: build in-process), got {d.length_workers}")
    return problems


def loss_problems(loss: LossConfig) -> list[str]:
    problems = []
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
    return problems


def training_problems(cfg: ExperimentConfig) -> list[str]:
    """Rules on the ``training`` section (TrainingArguments fields and our extras)."""
    t, problems = cfg.training, []
    if t.get("load_best_model_at_end"):
        problems.append(
            "training.load_best_model_at_end is not supported: checkpoints rotate by completion, not by "
            "metric. Pick the checkpoint from metrics.jsonl's eval_* lines and `mpo consolidate` it"
        )
    if str(t.get("train_sampling_strategy", "random")).lower().endswith("group_by_length"):
        problems.append(
            "training.train_sampling_strategy=group_by_length looks for an input_ids column, which "
            "preference pairs do not have: use data.group_by_length=true instead"
        )
    if not cfg.data.eval_meta_path:
        strategy = str(t.get("eval_strategy", "no")).lower().split(".")[-1]
        if strategy != "no":
            problems.append(
                f"training.eval_strategy={strategy} needs held-out pairs: set data.eval_meta_path, "
                "or training.eval_strategy=no"
            )
        if t.get("eval_on_start"):
            problems.append("training.eval_on_start=true needs held-out pairs: set data.eval_meta_path")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if key in t and isinstance(t[key], int) and t[key] < 1:
            problems.append(f"training.{key} must be >= 1, got {t[key]}")
    for key in ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm"):
        if isinstance(t.get(key), (int, float)) and t[key] < 0:
            problems.append(f"training.{key} must be >= 0, got {t[key]}")
    if t.get("max_steps") == 0 or (isinstance(t.get("max_steps"), int) and t["max_steps"] < -1):
        problems.append(
            f"training.max_steps={t['max_steps']} trains nothing: set a positive number of optimizer steps, "
            "or -1 to train for training.num_train_epochs"
        )
    if (
        isinstance(t.get("num_train_epochs"), (int, float))
        and t["num_train_epochs"] <= 0
        and t.get("max_steps", -1) <= 0
    ):
        problems.append(f"training.num_train_epochs must be > 0, got {t['num_train_epochs']}")
    for key in ("save_steps", "logging_steps", "eval_steps"):
        if isinstance(t.get(key), (int, float)) and t[key] <= 0:
            problems.append(f"training.{key} must be > 0, got {t[key]}")
    problems += benchmark_problems(cfg.extras)
    if t.get("remove_unused_columns", False):
        problems.append("training.remove_unused_columns must stay false: MPO batches carry custom columns")
    return problems


def benchmark_problems(x: RunExtras) -> list[str]:
    """Rules on ``training.eval_benchmark*``: .tsv files with distinct names, sane numbers. (Like the
    data paths, the files themselves are read when the run is built: ``mpo.eval.read_benchmark``.)"""
    problems = []
    for path in x.eval_benchmarks:
        if Path(path).suffix.lower() != ".tsv":
            problems.append(
                f"training.eval_benchmarks: {path} is not a .tsv file (VLMEvalKit's benchmark layout)"
            )
    stems = [Path(p).stem for p in x.eval_benchmarks]
    if len(set(stems)) != len(stems):
        problems.append(
            f"training.eval_benchmarks: file names must differ (metrics are named bench/<name>/...), got {stems}"
        )
    for key in ("eval_benchmark_max_new_tokens", "eval_benchmark_batch_size"):
        if getattr(x, key) < 1:
            problems.append(f"training.{key} must be >= 1, got {getattr(x, key)}")
    for key in ("eval_benchmark_steps", "eval_benchmark_limit"):
        if getattr(x, key) < 0:
            problems.append(f"training.{key} must be >= 0, got {getattr(x, key)}")
    return problems


# ---- output ----------------------------------------------------------------------------------
def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def save_config(cfg: ExperimentConfig, out_dir: str | os.PathLike) -> Path:
    """Write the resolved config as ``config.yaml`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(to_yaml(cfg))
    return path


def describe_keys() -> str:
    """Every section and key with its type, default and help (``mpo train --help``)."""
    lines = []
    for section, cls in [*SECTIONS.items(), ("training", RunExtras)]:
        title = section if section != "training" else "training (MPO settings)"
        lines.append(f"{title}:")
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} = {default!r}  [{_describe(hints[f.name])}]")
            if f.metadata.get("help"):
                lines.append(f"      {f.metadata['help']}")
    lines.append("training (transformers.TrainingArguments): any field under its own name; our defaults:")
    lines += [f"  {k} = {v!r}" for k, v in TRAINING_DEFAULTS.items()]
    return "\n".join(lines)
