"""Loading an InternVL checkpoint (policy and reference) and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import InternVLForConditionalGeneration

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model path is missing or is not an InternVL checkpoint."""


def check_model_path(path: str) -> None:
    """Fail early and clearly on a local path that does not exist or holds no config.json.

    Anything that is not an existing folder and looks like ``owner/name`` is treated as a hub id.
    """
    p = Path(path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model.path {path}: folder has no config.json, so it is not a checkpoint")
        config = json.loads((p / "config.json").read_text())
        model_type, architectures = config.get("model_type"), config.get("architectures") or []
        if model_type != "internvl" and "InternVLChatModel" not in architectures:
            raise ModelLoadError(
                f"model.path {path}: config.json has model_type={model_type!r}, architectures={architectures}; "
                "expected an InternVL checkpoint (native 'internvl' or original 'InternVLChatModel')"
            )
        if "InternVLChatModel" in architectures:
            from mpo.model.backbones import BackboneError, backbone_for_arch

            try:  # before anything is built: an unsupported LLM is one clear line
                backbone_for_arch((config.get("llm_config") or {}).get("architectures"), "config.json")
            except BackboneError as exc:
                raise ModelLoadError(f"model.path {path}: {exc}") from exc
        return
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelLoadError(
            f"model.path {path}: no such folder (and it is not a hub id of the form owner/name)"
        )
    problem = hub_problem(path)
    if problem:
        raise ModelLoadError(problem)


def unreachable(path: str, exc: OSError) -> ModelLoadError:
    """A clear error for a checkpoint that cannot be read (a hub id offline, a private repo, ...)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(
        f"model.path {path}: cannot load it ({first}). A hub id needs access to huggingface.co or a "
        "copy in the local Hugging Face cache; otherwise point model.path at a local folder"
    )


def load_tokenizer(path: str):
    """The checkpoint's tokenizer; never runs remote code (original-format folders name some).

    ``tokenizer.internvl_template`` records the checkpoint's chat template name, which
    ``data.template=auto`` uses (``mpo.data.template.resolve_template``).
    """
    from mpo.model.convert import open_tokenizer

    try:
        return open_tokenizer(path)
    except OSError as exc:
        raise unreachable(path, exc) from exc


def load_model(
    path: str, torch_dtype: str = "float32", attn_implementation: str = "auto"
) -> InternVLForConditionalGeneration:
    """Load an InternVL checkpoint in native (-hf) format; original format is converted in memory.
    ``attn_implementation``: a transformers name, or ``auto`` (``mpo.pair_attention``'s choice)."""
    from mpo.pair_attention import resolve_attn_implementation

    attn_implementation = resolve_attn_implementation(attn_implementation)
    check_model_path(path)
    p = Path(path)
    if p.exists():
        # Absolute, so what records it (LoRA's adapter_config.json base path) works from anywhere.
        p = p.resolve()
        path = str(p)
        arch = json.loads((p / "config.json").read_text()).get("architectures") or []
        if "InternVLChatModel" in arch:
            from mpo.model.convert import load_original_as_native

            return load_original_as_native(
                p, dtype=DTYPES[torch_dtype], attn_implementation=attn_implementation
            )
    try:
        return InternVLForConditionalGeneration.from_pretrained(
            path, dtype=DTYPES[torch_dtype], attn_implementation=attn_implementation
        )
    except OSError as exc:
        raise unreachable(path, exc) from exc


def hub_problem(repo_id: str, timeout_s: float = 3.0) -> str | None:
    """Why a hub id cannot be loaded, found in seconds: it is neither in the local Hugging Face
    cache nor reachable (``HF_HUB_OFFLINE`` set, or huggingface.co not answering within
    ``timeout_s``). None when it is cached or the hub answers (a typo then fails on the hub's
    own 404, also fast). Without this, an offline machine retries for about a minute."""
    import os
    import socket

    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    where = f"model.path {repo_id}: no such local folder, and not in the local Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"{where} (HF_HUB_OFFLINE is set). Check the spelling, or download it first, or point model.path at a folder"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
    except OSError as exc:
        return f"{where}, and huggingface.co cannot be reached ({exc}). Check the spelling, or point model.path at a local folder"
    return None


def load_vision_spec(path: str):
    """``VisionSpec`` (tile size, tokens per tile) from a checkpoint's config.json, either format,
    without loading weights."""
    from mpo.data.tiling import VisionSpec

    local = Path(path) / "config.json"
    if local.is_file():
        return VisionSpec.from_config(json.loads(local.read_text()))
    from transformers import AutoConfig

    try:
        return VisionSpec.from_config(AutoConfig.from_pretrained(path))
    except OSError as exc:
        raise unreachable(path, exc) from exc
