"""Argument parsing shared by the commands that take an experiment config (a leaf module: it
imports nothing of ``mpo`` but the config, and neither torch nor transformers)."""

from __future__ import annotations

import argparse


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
