"""``mpo convert``, ``mpo export``, ``mpo generate`` and ``mpo eval`` (loaded by ``mpo.cli``).

mpo convert --to native|original IN OUT [--llm-arch ARCH]
mpo export [--merge-lora] CKPT OUT [--format native|original] [--base BASE]
mpo generate --model DIR [--image X] --question Q [--max-new-tokens N]
mpo eval --model DIR --benchmark FILE.tsv [--benchmark ...] [--out ANSWERS.jsonl] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_convert(argv: list[str]) -> int:
    """Convert a checkpoint folder between the original (LMDeploy) and native (-hf) formats."""
    p = argparse.ArgumentParser(prog="mpo convert", description=cmd_convert.__doc__)
    p.add_argument("--to", required=True, choices=["native", "original"])
    p.add_argument("src", help="checkpoint folder (either format)")
    p.add_argument("dst", help="output folder")
    p.add_argument(
        "--llm-arch",
        default=None,
        help="with --to original: the LLM layout to write, e.g. InternLM2ForCausalLM for an InternVL2.5-2B/8B/26B "
        "-hf model (default: the one the native model was converted from, else its text model's own)",
    )
    a = p.parse_args(argv)
    from mpo.model.convert import FormatError, convert_checkpoint

    try:
        print(convert_checkpoint(a.src, a.dst, a.to, llm_arch=a.llm_arch))
    except (FormatError, ValueError, FileExistsError) as exc:
        return _fail(exc)
    return 0


def cmd_export(argv: list[str]) -> int:
    """Write a servable full model (LoRA adapters merged) with tokenizer, chat template and model card."""
    p = argparse.ArgumentParser(prog="mpo export", description=cmd_export.__doc__)
    p.add_argument("ckpt", help="a run's final/ or checkpoint-N/ folder (LoRA adapter or full model)")
    p.add_argument("out", help="new output folder")
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="merge LoRA adapters into the base (required for adapter folders)",
    )
    p.add_argument(
        "--format",
        default="native",
        choices=["native", "original"],
        help="native (-hf, vLLM/transformers) or original (LMDeploy)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model of the adapters (default: the one recorded in adapter_config.json)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    from mpo.model.convert import FormatError
    from mpo.model.export import export_model, is_adapter_dir
    from mpo.model.lora import LoraConfigError

    if is_adapter_dir(a.ckpt) and not a.merge_lora:
        return _fail(ValueError(f"{a.ckpt} holds LoRA adapters: pass --merge-lora to write a full model"))
    try:
        print(export_model(a.ckpt, a.out, fmt=a.format, base=a.base, torch_dtype=a.dtype))
    except (FormatError, LoraConfigError, ValueError, FileExistsError) as exc:
        return _fail(exc)
    return 0


def cmd_generate(argv: list[str]) -> int:
    """Greedy answer from a model folder, with InternVL's tiling and chat template."""
    p = argparse.ArgumentParser(prog="mpo generate", description=cmd_generate.__doc__)
    p.add_argument("--model", required=True, help="model folder (native, original or LoRA adapter)")
    p.add_argument("--image", default=None, help="image file (optional)")
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-num", type=int, default=12, help="max tiles per image")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    from mpo.model.convert import FormatError
    from mpo.model.generate import answer_from_dir

    try:
        print(answer_from_dir(a.model, a.question, a.image, a.max_new_tokens, a.max_num, a.dtype))
    except (FormatError, ValueError, FileNotFoundError) as exc:
        return _fail(exc)
    return 0


def cmd_eval(argv: list[str]) -> int:
    """``mpo eval``: greedy answers to VLMEvalKit-style TSV benchmarks with the training template, scored."""
    from mpo.config import BENCHMARK_MC_PROMPT, BENCHMARK_OPEN_PROMPT

    p = argparse.ArgumentParser(
        prog="mpo eval",
        description="Accuracy of a model on VLMEvalKit-style TSV benchmarks (greedy, batched)",
    )
    p.add_argument(
        "--model", required=True, help="model folder (native, original, or a LoRA adapter: merged)"
    )
    p.add_argument("--benchmark", required=True, action="append", help="a .tsv file; repeat for several")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="first N questions of each benchmark (0: all)")
    p.add_argument("--template", default="auto", help="chat template (auto: the checkpoint's)")
    p.add_argument("--system-message", default=None, help="system prompt (default: the template's)")
    p.add_argument(
        "--max-dynamic-patch", type=int, default=12, help="tiles per question (split among its images)"
    )
    p.add_argument(
        "--mc-prompt", default=BENCHMARK_MC_PROMPT, help="instruction after a multiple-choice question"
    )
    p.add_argument(
        "--open-prompt", default=BENCHMARK_OPEN_PROMPT, help="instruction after a short-answer question"
    )
    p.add_argument("--torch-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="write every question's answer and score here (JSONL)")
    p.add_argument("--json", action="store_true", help="one JSON object per benchmark instead of a line")
    a = p.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "max_dynamic_patch"):
        if getattr(a, name) < 1:
            return _fail(ValueError(f"--{name.replace('_', '-')} must be >= 1"))
    from mpo.data.mmpr import DataError
    from mpo.eval import format_result
    from mpo.eval_model import evaluate_model_dir
    from mpo.model.loading import ModelLoadError

    try:
        results = evaluate_model_dir(a)
    except (DataError, ModelLoadError) as exc:
        return _fail(exc)
    for res in results:
        if a.json:
            print(json.dumps({"benchmark": res["name"], "questions": res["n"], **res["metrics"]}))
        else:
            print(format_result(res["name"], res["metrics"], res["n"]))
    return 0
