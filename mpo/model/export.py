"""Deployable output folders: merged LoRA, either checkpoint format, and the serving metadata.

A folder written here can be served as is: weights + config (native for vLLM/transformers, or
original for LMDeploy), the tokenizer, ``generation_config.json`` (greedy, stops at the template's
end-of-turn token), the chat template of the checkpoint's generation (``mpo.data.template``) with
its system prompt as default (the published -hf ``chat_template.jinja`` of
OpenGVLab/InternVL2_5-1B-MPO-hf has none; training adds it, see docs/internvl-format.md §3), the
image processor settings that reproduce InternVL's tiling (docs/internvl-format.md §2) and a short
model card.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mpo.data.template import INTERNVL2_5, ChatTemplate, TemplateEncoder, resolve_template, template_mark
from mpo.data.tiling import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
# What a tokenizer folder holds (export and consolidate copy these; the first marks a tokenizer).
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _literal(text: str) -> str:
    """A Jinja string literal for ``text``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(
    system_message: str | None = None, template: ChatTemplate = INTERNVL2_5, with_bos: bool = False
) -> str:
    """Jinja chat template rendering exactly the text ``template`` trains on, with a default system turn.

    Images in list-style content become ``<IMG_CONTEXT>\\n``, which transformers'/vLLM's
    ``InternVLProcessor`` expands to ``<img>`` + ``<IMG_CONTEXT>`` x N + ``</img>``, so the text equals
    what ``mpo.data.template`` trains on (``<image>\\n`` prefixed to the question). ``with_bos``: the
    tokenizer adds a BOS token (InternLM2's), so the template starts with it, once. The first line
    names the template, for ``data.template=auto`` on the exported folder.
    """
    t = template
    system = t.system_message if system_message is None else system_message
    close = _literal(t.end_of_turn + t.turn_separator)
    prefixes = (
        "{"
        + ", ".join(
            f"'{role}': {_literal(p)}"
            for role, p in (
                ("system", t.system_prefix),
                ("user", t.user_prefix),
                ("assistant", t.assistant_prefix),
            )
        )
        + "}"
    )
    # internlm2-chat strips user and assistant messages (preprocess_internlm); never the system one.
    body = "render(message['content'])" + (" | trim" if t.strip_messages else "")
    return (
        template_mark(t.name) + "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for item in content -%}"
        "{%- if item['type'] == 'image' -%}{{ '<IMG_CONTEXT>\\n' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        "{%- set prefix = "
        + prefixes
        + " -%}"
        + ("{{- bos_token -}}" if with_bos else "")
        + "{%- if messages[0]['role'] != 'system' -%}"
        "{{ " + _literal(t.system_prefix + system) + " + " + close + " }}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ prefix['system'] + render(message['content']) + "
        + close
        + " }}"
        "{%- else -%}{{ prefix[message['role']] + (" + body + ") + " + close + " }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ prefix['assistant'] }}{%- endif -%}"
    )


# ---- loading what to export ------------------------------------------------------------------------
def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(ckpt: str | Path, base: str | None = None) -> str:
    """The base model of a LoRA checkpoint: ``base`` if given, else the adapter config's record."""
    if base:
        return base
    cfg = json.loads((Path(ckpt) / ADAPTER_CONFIG).read_text())
    recorded = cfg.get("base_model_name_or_path")
    if not recorded:
        raise ValueError(f"{ckpt}/{ADAPTER_CONFIG}: no base_model_name_or_path; pass --base")
    return recorded


def load_merged(ckpt: str | Path, base: str | None = None, torch_dtype: str = "float32"):
    """A full model from ``ckpt``: LoRA adapters are merged into their base; a full checkpoint loads as is.

    Returns:
        (model, source) where ``source`` is the folder holding the tokenizer to ship.
    """
    from mpo.model.loading import load_model

    ckpt = Path(ckpt)
    if not is_adapter_dir(ckpt):
        return load_model(str(ckpt), torch_dtype), str(ckpt)
    from peft import PeftModel

    base_path = adapter_base_path(ckpt, base)
    model = PeftModel.from_pretrained(load_model(base_path, torch_dtype), str(ckpt))
    # W' = W + (alpha / r) * B @ A per adapted layer (Hu et al. 2021, LoRA §4.1).
    merged = model.merge_and_unload()
    tokenizer_src = str(ckpt) if (ckpt / TOKENIZER_FILES[0]).is_file() else base_path
    return merged.eval(), tokenizer_src


def export_model(
    ckpt: str | Path,
    out_dir: str | Path,
    fmt: str = "native",
    base: str | None = None,
    torch_dtype: str = "float32",
    cfg=None,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write ``ckpt`` (LoRA merged when it is an adapter folder) as a servable folder in ``fmt``."""
    from mpo.model.convert import save_original
    from mpo.model.loading import load_tokenizer

    if fmt not in ("native", "original"):
        raise ValueError(f"--format must be native or original, got {fmt!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    model, tok_src = load_merged(ckpt, base, torch_dtype)
    tokenizer = load_tokenizer(tok_src)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "native":
        model.save_pretrained(str(out))
    else:
        save_original(model, out, template=export_template(cfg, tokenizer).name)
    extra = {"exported_from": str(ckpt), "format": fmt, "lora_merged": is_adapter_dir(ckpt)}
    if is_adapter_dir(ckpt):
        extra["base_model"] = adapter_base_path(ckpt, base)
    write_export_metadata(out, cfg, summary or {}, tokenizer=tokenizer, config=model.config, extra=extra)
    return out


# ---- metadata ----------------------------------------------------------------------------------
def write_export_metadata(
    out_dir: str | Path,
    cfg=None,
    summary: dict[str, Any] | None = None,
    tokenizer=None,
    config=None,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """Write tokenizer + chat template, generation config, processor settings and README.md.

    Args:
        out_dir: a folder that already holds the model (``config.json`` + weights, or a LoRA adapter).
        cfg: the run's ``ExperimentConfig`` (for the model card and the system prompt); may be None.
        summary: the run summary (``global_step``, ``train_loss``, ``eval``...); may be empty.
        tokenizer: the tokenizer to ship; default: the one in ``out_dir``, else ``cfg.model.path``'s.
        config: the model config (native ``InternVLConfig``); default: read from ``out_dir``.
        extra: more facts for the model card (``base_model``, ``format``...).

    Returns:
        Names of the files written.
    """
    from mpo.model.loading import load_tokenizer

    out = Path(out_dir)
    summary = summary or {}
    system = getattr(getattr(cfg, "data", None), "system_message", None)
    if tokenizer is None:
        has_tok = (out / TOKENIZER_FILES[0]).is_file()
        if not has_tok and cfg is None:
            raise ValueError(f"{out}: holds no tokenizer; pass tokenizer= or cfg=")
        tokenizer = load_tokenizer(str(out) if has_tok else cfg.model.path)
    encoder = TemplateEncoder(tokenizer, system, export_template(cfg, tokenizer))
    tokenizer.chat_template = chat_template(system, encoder.spec, with_bos=bool(encoder.bos_ids))
    written = list(tokenizer.save_pretrained(str(out)))
    (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    written.append(str(out / "chat_template.jinja"))
    written.append(_write_generation_config(out, tokenizer, encoder.eos_id))
    vision = _vision_spec(out, config)
    if vision is not None:
        written += _write_processor_files(out, vision, cfg)
    (out / "README.md").write_text(model_card(cfg, summary, extra or {}, system, vision))
    written.append(str(out / "README.md"))
    return [Path(w).name for w in written]


def export_template(cfg, tokenizer) -> ChatTemplate:
    """The run's template (``data.template``, ``auto`` resolved on the tokenizer)."""
    return resolve_template(getattr(getattr(cfg, "data", None), "template", "auto"), tokenizer)


def _write_generation_config(out: Path, tokenizer, end_of_turn: int) -> str:
    from transformers import GenerationConfig

    gen = (
        GenerationConfig.from_pretrained(str(out))
        if (out / "generation_config.json").is_file()
        else GenerationConfig()
    )
    eos = (
        gen.eos_token_id
        if isinstance(gen.eos_token_id, list)
        else [gen.eos_token_id]
        if gen.eos_token_id is not None
        else []
    )
    # A chat answer ends with the template's end-of-turn token; keep any other stop ids the base model had.
    gen.eos_token_id = [end_of_turn] + [e for e in eos if e != end_of_turn]
    gen.pad_token_id = tokenizer.pad_token_id
    gen.do_sample = False
    gen.save_pretrained(str(out))
    return str(out / "generation_config.json")


def _vision_spec(out: Path, config):
    from mpo.data.tiling import VisionSpec

    if config is not None:
        return VisionSpec.from_config(config)
    path = out / "config.json"
    return VisionSpec.from_config(json.loads(path.read_text())) if path.is_file() else None


def _write_processor_files(out: Path, vision, cfg) -> list[str]:
    from transformers import GotOcr2ImageProcessorPil

    max_patches = getattr(getattr(cfg, "data", None), "max_dynamic_patch", 12)
    # These settings reproduce InternVL's dynamic tiling exactly (tests/test_data_tiling.py compares
    # the pixels); the class defaults (384 px, CLIP mean/std, no tiling) do not.
    proc = GotOcr2ImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
    )
    files = [str(p) for p in proc.save_pretrained(str(out))]
    (out / "processor_config.json").write_text(
        json.dumps(
            {"image_seq_length": vision.tokens_per_tile, "processor_class": "InternVLProcessor"}, indent=2
        )
        + "\n"
    )
    return files + [str(out / "processor_config.json")]


def model_card(cfg, summary: dict[str, Any], extra: dict[str, Any], system: str | None, vision) -> str:
    """A short README.md: what the model is, how it was trained, how to load it."""
    base = extra.get("base_model") or (cfg.model.path if cfg is not None else "unknown")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [internvl, mpo, internvl-mpo]",
        "---",
        "",
    ]
    lines += ["# InternVL fine-tuned with MPO", "", f"- Base model: `{base}`"]
    if cfg is not None:
        loss = cfg.loss
        lines += [
            f"- Data: `{cfg.data.meta_path}`"
            + (f" (held-out: `{cfg.data.eval_meta_path}`)" if cfg.data.eval_meta_path else ""),
            f"- Loss: {loss.preference_weight} x preference ({loss.preference_type}) + {loss.quality_weight} x quality (BCO pair) "
            f"+ {loss.generation_weight} x generation (SFT), beta={loss.beta}",
            f"- Reference: {cfg.model.reference}; LoRA: {cfg.model.lora or 'none'}",
            f"- Trained parts: vision={'frozen' if cfg.model.freeze_vision else 'trained'}, "
            f"projector={'frozen' if cfg.model.freeze_projector else 'trained'}, llm={'frozen' if cfg.model.freeze_llm else 'trained'}",
            f"- Learning rate: {cfg.training.get('learning_rate')}",
        ]
    if "global_step" in summary:
        lines.append(f"- Steps: {summary['global_step']}; final train loss: {summary.get('train_loss')}")
    for k, v in (summary.get("eval") or {}).items():
        lines.append(f"- Held-out {k}: {v}")
    for k, v in extra.items():
        if k != "base_model":
            lines.append(f"- {k.replace('_', ' ').capitalize()}: {v}")
    if vision is not None:
        lines.append(f"- Tiles: {vision.image_size}px, {vision.tokens_per_tile} image tokens per tile")
    sys_note = "the template's default system prompt" if system is None else "the run's system prompt"
    lines += [
        "",
        "## Use",
        "",
        f"The chat template adds {sys_note} when the conversation has no system turn. Greedy smoke test:",
        "",
        "```",
        "mpo generate --model THIS_FOLDER --image picture.jpg --question 'Describe the image.'",
        "```",
        "",
        "Trained with internvl-mpo: Mixed Preference Optimization (Wang et al. 2024, arXiv:2411.10442).",
        "",
    ]
    return "\n".join(lines)
