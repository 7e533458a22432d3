"""Argument parsing shared by the commands that take an experiment config (a leaf module: it
imports nothing of ``mpo`` but the config, and neither torch nor transformers)."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable


def config_parser(prog: str, description: str, keys_help: bool = False) -> argparse.ArgumentParser:
    """``--config X [key.sub=value ...]``; with ``keys_help`` the help lists every config key."""
    epilog = None
    if keys_help:
        from mpo.config import describe_keys

        epilog = "config sections and keys (key = default [type]):\n" + describe_keys()
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="experiment YAML (sections model/data/loss/training)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides applied after the YAML")
    # The deepspeed launcher appends --local_rank=N; the rank also arrives in LOCAL_RANK.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def dispatch(argv: list[str], subcommands: dict[str, Callable[[list[str]], int]], usage: str) -> int:
    """Run ``subcommands[argv[0]]`` on the rest of ``argv``; ``usage`` (the group's docstring)
    for ``-h``/``--help`` or no subcommand, and a "did you mean" line for a misspelt one."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] not in subcommands:
        close = difflib.get_close_matches(argv[0], subcommands, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown subcommand '{argv[0]}'{hint} ({', '.join(subcommands)})", file=sys.stderr)
        return 2
    return subcommands[argv[0]](argv[1:])
