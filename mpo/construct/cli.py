"""``mpo pairs``: build MPO preference pairs from your own prompts.

    mpo pairs sample --config X --prompts P --out DIR [--num-samples 8] [--temperature 1.0]
                     [--top-p 1.0] [--top-k 0] [--max-new-tokens 512] [--batch-size 4] [--seed 0]
                     [key.sub=value ...]
    mpo pairs build --correctness --samples DIR --out DIR [--max-pairs-per-prompt 3]
                    [--unanswered rejected|drop] [--rel-tol R] [--abs-tol A] [--judge module:function]
    mpo pairs build --dropout-ntp --samples DIR --out DIR --config X [--cut-ratio 0.5]
                    [--max-pairs-per-prompt 1] [key.sub=value ...]

``sample`` answers every prompt N times with the configured model (``model.path``; the run's
template, tiling and system prompt) into append-only shards; run it again to resume, or under
``torchrun``/``deepspeed`` to share the prompts among processes. ``build`` turns the samples into
MMPR pairs (``meta.json`` + JSONL, ready for ``mpo data check`` and training) and a report.
"""

from __future__ import annotations

import argparse
import json
import os


def _sample_parser() -> argparse.ArgumentParser:
    from mpo.cli_args import config_parser

    p = config_parser("mpo pairs sample", "Sample N answers per prompt with the configured model")
    p.add_argument(
        "--prompts", required=True, help="prompts .jsonl (question, image/video, answer_gt, id) or meta JSON"
    )
    p.add_argument("--out", required=True, help="samples folder (created; an existing one is resumed)")
    p.add_argument("--num-samples", type=int, default=8, help="answers per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (every sample the same)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="prompts per generate call (x num-samples rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chunks", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop early
    return p


def _load_config(args: argparse.Namespace, prompts: str):
    """Config with only ``model`` and ``data`` validated (no training section is needed); the
    prompts stand for ``data.meta_path``, which sampling does not read."""
    import dataclasses

    from mpo.config import ConfigError, data_problems, load_config, model_problems

    cfg = load_config(args.config, args.overrides, check=False)
    data = dataclasses.replace(cfg.data, meta_path=cfg.data.meta_path or prompts)
    problems = model_problems(cfg.model) + data_problems(data)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def cmd_sample(argv: list[str]) -> int:
    args = _sample_parser().parse_args(argv)
    from mpo.cli import print_error
    from mpo.config import ConfigError
    from mpo.construct.sample import SampleSettings, run_sampling
    from mpo.data.mmpr import DataError
    from mpo.model.loading import ModelLoadError

    settings = SampleSettings(
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if settings.problems():
            raise ConfigError("invalid sampling settings:\n  - " + "\n  - ".join(settings.problems()))
        cfg = _load_config(args, args.prompts)
        log = print if rank == 0 else (lambda line: None)
        summary = run_sampling(cfg, args.prompts, args.out, settings, rank, world, args.max_chunks, log)
    except (ConfigError, DataError, ModelLoadError) as exc:
        print_error(exc)
        return 2
    print(
        f"rank {rank}/{world}: {summary['prompts']} prompts, {summary['done_before']} already sampled, "
        f"{summary['sampled']} sampled now ({summary['skipped']} could not be encoded) -> {args.out}"
    )
    return 0


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpo pairs build",
        description="Sampled answers -> MPO pairs (MMPR meta + JSONL) and a report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--correctness", action="store_true", help="chosen: a right answer, rejected: a wrong one"
    )
    how.add_argument(
        "--dropout-ntp",
        action="store_true",
        help="rejected: the chosen answer cut, continued without the image",
    )
    p.add_argument("--samples", required=True, help="folder written by `mpo pairs sample`")
    p.add_argument("--out", required=True, help="output folder: meta.json, <dataset>.jsonl, report.json")
    p.add_argument(
        "--max-pairs-per-prompt", type=int, default=None, help="default 3 (correctness), 1 (dropout-ntp)"
    )
    p.add_argument(
        "--unanswered",
        choices=["rejected", "drop"],
        default="rejected",
        help="answers with no readable final answer: use as rejected (default) or leave out",
    )
    p.add_argument("--rel-tol", type=float, default=1e-9, help="relative tolerance of numeric answers")
    p.add_argument("--abs-tol", type=float, default=1e-9, help="absolute tolerance of numeric answers")
    p.add_argument("--judge", default=None, help="module:function(record, answer) -> True/False/None")
    p.add_argument("--cut-ratio", type=float, default=0.5, help="dropout-ntp: share of the answer kept")
    p.add_argument("--config", default=None, help="dropout-ntp: experiment YAML (the model that continues)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("overrides", nargs="*", help="dropout-ntp: key.sub=value overrides of --config")
    return p


def cmd_build(argv: list[str]) -> int:
    p = _build_parser()
    args = p.parse_args(argv)
    if args.dropout_ntp and not args.config:
        p.error("--dropout-ntp needs --config (the model that continues the cut answers)")
    if args.max_pairs_per_prompt is not None and args.max_pairs_per_prompt < 1:
        p.error("--max-pairs-per-prompt must be at least 1")
    if not 0 < args.cut_ratio < 1:
        p.error(f"--cut-ratio must be in (0, 1), got {args.cut_ratio}")
    from pathlib import Path

    from mpo.cli import print_error
    from mpo.config import ConfigError
    from mpo.construct.build import format_report
    from mpo.data.mmpr import DataError
    from mpo.model.loading import ModelLoadError

    try:
        if args.correctness:
            report = _build_correctness(args, Path(args.samples), Path(args.out))
        else:
            from mpo.construct.dropout_ntp import DropoutSettings, build_dropout_ntp
            from mpo.construct.store import read_manifest

            settings = DropoutSettings(
                cut_ratio=args.cut_ratio, max_pairs_per_prompt=args.max_pairs_per_prompt or 1
            )
            report = build_dropout_ntp(
                _load_config(args, read_manifest(Path(args.samples))["prompts"]),
                Path(args.samples),
                Path(args.out),
                settings,
                _judge(args),
            )
    except (ConfigError, DataError, ModelLoadError, ValueError) as exc:
        print_error(exc)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _judge(args: argparse.Namespace):
    from mpo.construct.judge import AnswerJudge, load_judge

    return load_judge(args.judge) if args.judge else AnswerJudge(args.rel_tol, args.abs_tol)


def _build_correctness(args: argparse.Namespace, samples, out):
    from mpo.construct.build import CorrectnessSettings, correctness_pairs, sorted_rows, write_pairs
    from mpo.construct.store import read_manifest, read_shards

    read_manifest(samples)
    judge = _judge(args)
    settings = CorrectnessSettings(args.max_pairs_per_prompt or 3, args.unanswered)
    rows = sorted_rows(read_shards(samples))
    return write_pairs(out, rows, lambda row, report: correctness_pairs(row, judge, settings, report))


SUBCOMMANDS = {"sample": cmd_sample, "build": cmd_build}


def cmd_pairs(argv: list[str]) -> int:
    from mpo.cli_args import dispatch

    return dispatch(argv, SUBCOMMANDS, __doc__)
