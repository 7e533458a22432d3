"""The ``mpo`` command: training and the tools around it.

Every command is listed in ``COMMANDS`` with the module that implements it; that module is
imported only when the command runs, and parses its arguments before importing torch, so
``mpo --help`` and ``mpo COMMAND --help`` answer at once.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import sys
from pathlib import Path

# name -> (module, function, one line of help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("mpo.cli", "cmd_train", "train (also: python/deepspeed train/train_mpo.py)"),
    "data": (
        "mpo.data.cli",
        "cmd_data",
        "check | inspect | index | convert: validate data, show a pair as the model sees it, cache pair lengths, convert formats",
    ),
    "pairs": (
        "mpo.construct.cli",
        "cmd_pairs",
        "sample | build: sample answers to your prompts, build MPO pairs by correctness or DropoutNTP",
    ),
    "precompute-ref": ("mpo.cli", "cmd_precompute_ref", "cache reference log-probs (model.reference=cache)"),
    "report": ("mpo.report", "cmd_report", "HTML report + plots from metrics.jsonl, with a verdict"),
    "summary": ("mpo.cli", "cmd_summary", "a finished run's summary"),
    "generate": ("mpo.model.cli", "cmd_generate", "greedy answer from a model"),
    "eval": ("mpo.model.cli", "cmd_eval", "accuracy on VLMEvalKit-style TSV benchmarks (greedy, batched)"),
    "consolidate": ("mpo.consolidate", "cmd_consolidate", "ZeRO shards -> one HF-format model"),
    "convert": ("mpo.model.cli", "cmd_convert", "checkpoint format conversion (native <-> original)"),
    "export": ("mpo.model.cli", "cmd_export", "a deployable folder (LoRA merged)"),
    "make-tiny": ("mpo.cli", "cmd_make_tiny", "build the tiny test/demo InternVL + tokenizer"),
}

USAGE = """usage: mpo COMMAND [ARGS]

  mpo train --config X [key.sub=value ...]          train
  mpo data check --config X                         validate every line; counts, tiles, lengths, skips
  mpo data inspect --config X --index I             one pair exactly as the model sees it
  mpo data index --config X                         per-pair lengths, computed in parallel and cached
  mpo precompute-ref --config X model.ref_cache=DIR cache reference log-probs
  mpo report RUN_DIR | mpo summary RUN_DIR          a run's report / summary
  mpo generate --model DIR --image X --question Q   greedy answer from a model
  mpo eval --model DIR --benchmark FILE.tsv         benchmark accuracy (VLMEvalKit TSV layout)
  mpo data convert --from trl|llamafactory|swift IN OUT   other formats -> MMPR meta + JSONL
  mpo pairs sample --config X --prompts P --out S   N sampled answers per prompt (resumable, any ranks)
  mpo pairs build --correctness --samples S --out D right vs wrong answers -> MMPR pairs + report
  mpo consolidate CKPT OUT | convert | export       model folders

`mpo COMMAND --help` describes each."""


def _barrier() -> None:
    """All ranks finish writing before any tears down: a gloo group destroyed while a peer still
    has work in flight can abort that peer at exit (seen once in CI as SIGABRT under ZeRO-3)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def print_error(exc: BaseException) -> None:
    """An expected failure as ``error:`` lines (one per problem); the traceback too with MPO_DEBUG=1."""
    if os.environ.get("MPO_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    lines = [ln.strip().removeprefix("- ") for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        head, lines = lines[0][:-1], lines[1:]
        lines = [f"{head}: {ln}" for ln in lines]
    for line in lines:
        print(f"error: {line}", file=sys.stderr)


def cmd_train(argv: list[str]) -> int:
    from mpo.cli_args import config_parser

    p = config_parser("mpo train", "Train InternVL with MPO", keys_help=True)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    from mpo.config import ConfigError, load_config, to_yaml

    if args.print_config:
        try:
            print(to_yaml(load_config(args.config, args.overrides)), end="")
        except ConfigError as exc:
            print_error(exc)
            return 2
        return 0
    from mpo.preemption import StopRequest, TrainingStopped

    stop = StopRequest().install()  # SIGTERM / Ctrl-C: finish the step, save, stop
    from mpo.checkpoints import CheckpointError
    from mpo.data.mmpr import DataError
    from mpo.model.loading import ModelLoadError
    from mpo.refcache import RefCacheError
    from mpo.run import format_summary, main_process, run_training

    try:
        summary = run_training(load_config(args.config, args.overrides), stop)
        _barrier()
    except TrainingStopped as exc:
        if main_process():
            print(str(exc), file=sys.stderr, flush=True)
        return exc.exit_code
    except (ConfigError, DataError, ModelLoadError, RefCacheError, CheckpointError) as exc:
        print_error(exc)
        return 2
    finally:
        stop.uninstall()
        _finish_distributed()
    if main_process():
        print(format_summary(summary))
    return 0


def cmd_precompute_ref(argv: list[str]) -> int:
    from mpo.cli_args import config_parser

    p = config_parser(
        "mpo precompute-ref", "Compute reference log-probs for every pair once (model.ref_cache)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="pairs per forward (default: per_device_eval_batch_size)"
    )
    args = p.parse_args(argv)
    from mpo.config import ConfigError, load_config
    from mpo.model.loading import ModelLoadError
    from mpo.refcache import MANIFEST_NAME, RefCacheError, precompute_ref

    try:
        folder = precompute_ref(load_config(args.config, args.overrides), args.batch_size)
        _barrier()
    except (ConfigError, ModelLoadError, RefCacheError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        _finish_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        m = json.loads((folder / MANIFEST_NAME).read_text())
        print(
            f"reference cache: {folder} ({m['num_unique_pairs']} unique pairs of {m['num_pairs']}, "
            f"{len(m['shards'])} shard(s))"
        )
    return 0


def cmd_make_tiny(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="mpo make-tiny", description="Build the tiny InternVL and tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--backbone",
        default=None,
        help="write an ORIGINAL-format checkpoint with this LLM instead: qwen2, qwen3, llama, internlm3, phi3, internlm2",
    )
    p.add_argument("--vit", default="300m", help="with --backbone: InternViT 300m or 6b")
    a = p.parse_args(argv)
    if a.backbone:
        from mpo.model.tiny import save_tiny_original

        print(save_tiny_original(a.out_dir, a.backbone, a.vit, seed=a.seed))
        return 0
    from mpo.model.tiny import save_tiny_internvl

    print(save_tiny_internvl(a.out_dir, seed=a.seed))
    return 0


def cmd_summary(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="mpo summary", description="A finished run's summary")
    p.add_argument("run_dir")
    a = p.parse_args(argv)
    path = Path(a.run_dir) / "summary.json"
    if not path.is_file():
        print(f"error: {path} not found (has the run finished?)", file=sys.stderr)
        return 2
    from mpo.run import format_summary

    print(format_summary(json.loads(path.read_text())))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("\ncommands:")
        for name, (_, _, text) in COMMANDS.items():
            print(f"  {name:16s}{text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'{hint} (`mpo --help` lists them)", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
