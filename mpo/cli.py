"""The ``mpo`` command: training and the tools around it.

mpo train --config X [key.sub=value ...]    train (also: python/deepspeed train/train_mpo.py)
mpo data check --config X                   validate every line; counts, tiles, lengths, skips
mpo data inspect --config X --index I       one pair exactly as the model sees it
mpo precompute-ref --config X model.ref_cache=DIR   cache reference log-probs (reference=cache)
mpo report RUN_DIR                          HTML report + plots from metrics.jsonl, with a verdict
mpo summary RUN_DIR                         a finished run's summary
mpo generate --model DIR --image X --question Q     greedy answer from a model
mpo consolidate CKPT OUT                    ZeRO shards -> one HF-format model
mpo convert --to native|original IN OUT     checkpoint format conversion
mpo export [--merge-lora] CKPT OUT          a deployable folder (LoRA merged)
mpo make-tiny OUT_DIR                       build the tiny test/demo InternVL + tokenizer

`mpo COMMAND --help` describes each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def config_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="experiment YAML (sections model/data/loss/training)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides applied after the YAML")
    # The deepspeed launcher appends --local_rank=N; the rank also arrives in LOCAL_RANK.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _barrier() -> None:
    """All ranks finish writing before any tears down: a gloo group destroyed while a peer still
    has work in flight can abort that peer at exit (seen once in CI as SIGABRT under ZeRO-3)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cmd_train(argv: list[str]) -> int:
    from mpo.config import ConfigError, load_config
    from mpo.model.loading import ModelLoadError
    from mpo.refcache import RefCacheError
    from mpo.run import format_summary, main_process, run_training

    args = config_parser("Train InternVL with MPO").parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = run_training(cfg)
        _barrier()
    except (ConfigError, ModelLoadError, RefCacheError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if main_process():
        print(format_summary(summary))
    return 0


def cmd_make_tiny(argv: list[str]) -> int:
    from mpo.model.tiny import save_tiny_internvl

    p = argparse.ArgumentParser(prog="mpo make-tiny", description="Build the tiny InternVL and tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(save_tiny_internvl(a.out_dir, seed=a.seed))
    return 0


def cmd_summary(argv: list[str]) -> int:
    from mpo.run import format_summary

    p = argparse.ArgumentParser(prog="mpo summary")
    p.add_argument("run_dir")
    a = p.parse_args(argv)
    path = Path(a.run_dir) / "summary.json"
    if not path.is_file():
        print(f"error: {path} not found (has the run finished?)", file=sys.stderr)
        return 2
    print(format_summary(json.loads(path.read_text())))
    return 0


COMMANDS = {
    "train": cmd_train,
    "make-tiny": cmd_make_tiny,
    "summary": cmd_summary,
}


def register(name: str, fn) -> None:
    COMMANDS[name] = fn


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_plugins()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(sorted(COMMANDS)))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'{hint}", file=sys.stderr)
        return 2
    return COMMANDS[name](rest) or 0


def _load_plugins() -> None:
    """Sub-commands that live beside their concern (data, convert, report, ...), if present."""
    import importlib

    for module in ("mpo.data.cli", "mpo.model.cli", "mpo.report", "mpo.refcache", "mpo.consolidate"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for name, fn in getattr(mod, "CLI_COMMANDS", {}).items():
            COMMANDS[name] = fn


if __name__ == "__main__":
    sys.exit(main())
