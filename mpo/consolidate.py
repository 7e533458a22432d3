"""Consolidate any checkpoint (DeepSpeed ZeRO shards included) into an HF-format model folder."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def _zero_tags(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.is_dir() and p.name.startswith("global_step"))


def consolidate(ckpt: str | Path, out: str | Path) -> Path:
    """Write ``ckpt``'s weights as a full HF-format InternVL model (with tokenizer) to ``out``.

    ZeRO checkpoints are merged with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (its
    ``zero_to_fp32.py --safe_serialization`` script fails on tied embeddings in DeepSpeed 0.19.8); a plain
    checkpoint is re-saved as is.
    """
    from transformers import AutoConfig, InternVLForConditionalGeneration

    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no config.json, so it is not a model checkpoint")
    if (ckpt / "adapter_config.json").is_file():
        raise ValueError(f"{ckpt} holds a LoRA adapter: use `mpo export --merge-lora {ckpt} OUT` instead")
    if _zero_tags(ckpt):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
        model = InternVLForConditionalGeneration(AutoConfig.from_pretrained(ckpt))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ValueError(
                f"{ckpt}: ZeRO state does not fit the model (missing {missing}, unexpected {unexpected})"
            )
        model.tie_weights()
    else:
        model = InternVLForConditionalGeneration.from_pretrained(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    from mpo.model.export import TOKENIZER_FILES, write_export_metadata

    for name in TOKENIZER_FILES:
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, out / name)
    # The same serving files as a run's final/: chat template with the run's system prompt,
    # generation config, image processor settings, model card.
    step = ckpt.name.rsplit("-", 1)[-1]
    summary = {"global_step": int(step)} if step.isdigit() else {}
    write_export_metadata(out, _run_config(ckpt.parent), summary, extra={"consolidated_from": str(ckpt)})
    return out


def _run_config(run_dir: Path):
    """The run's resolved config.yaml (for the system prompt and tile budget), if readable."""
    from mpo.config import ConfigError, load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return load_config(str(path), [])
    except (ConfigError, OSError, ValueError):
        return None


def cmd_consolidate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mpo consolidate", description=consolidate.__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    try:
        print(consolidate(a.checkpoint, a.out_dir))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
