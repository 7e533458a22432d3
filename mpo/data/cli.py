"""``mpo data``: validate MMPR data and show pairs exactly as the model sees them.

    mpo data check --config X [--json] [--out DIR] [key.sub=value ...]
    mpo data inspect --config X --index I|all --json [key.sub=value ...]
    mpo data convert --from trl|llamafactory|swift IN OUT [--name N] [--root DIR] [--on-bad skip]

``check`` and ``inspect`` read the tokenizer and the model's ``config.json`` (for tile size and
tokens per tile); no model weights are loaded. ``convert`` needs no model (``mpo.data.convert``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from mpo.data.mmpr import DataError


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Config, tokenizer and vision spec. Only ``model`` and ``data`` are validated: the data can
    be checked before the ``training`` section is settled."""
    from mpo.config import ConfigError, data_problems, load_config, model_problems

    cfg = load_config(args.config, args.overrides, check=False)
    problems = model_problems(cfg.model) + data_problems(cfg.data)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    from mpo.model.loading import check_model_path, load_tokenizer, load_vision_spec

    check_model_path(cfg.model.path)
    return cfg, load_tokenizer(cfg.model.path), load_vision_spec(cfg.model.path)


def check_dataset(meta_path: str, tokenizer, vision, data_cfg) -> dict[str, Any]:
    """Encode every line of every dataset in ``meta_path`` once; counts and skips.

    Bad lines are always counted here (never raised) so one run lists every problem; whether
    training would accept them is reported as ``ok``.
    """
    import dataclasses

    from mpo.data.events import DataEvents, skip_report
    from mpo.data.pairs import PairDataset
    from mpo.stats import percentiles

    counting = dataclasses.replace(data_cfg, on_bad_sample="skip", max_bad_fraction=1.0)
    ds = PairDataset(meta_path, tokenizer, vision, counting, pixels=False)
    per_dataset: dict[str, Counter] = {}
    events = DataEvents()
    lengths: Counter[int] = Counter()  # memory grows with distinct lengths, not with lines
    for spec, f in zip(ds.source.specs, ds.source.files):
        stats = per_dataset.setdefault(spec.name, Counter())
        for row in range(len(f)):
            pair, ev = ds.encode_record(lambda row=row, spec=spec, f=f: (spec, *f.record(row)))
            events.add(ev)
            stats["lines"] += 1
            if pair is None:
                stats["skipped"] += 1
                continue
            stats["valid_lines"] += 1
            stats["images"] += len(pair["num_tiles"])
            stats["tiles"] += sum(pair["num_tiles"])
            for n in pair["full_lengths"].values():
                lengths[n] += 1
    ok, problem = True, None
    usable = sum(stats["valid_lines"] for stats in per_dataset.values())
    if usable == 0:
        ok, problem = (
            False,
            f"no usable pairs: {len(ds)} sample(s) after repeat_time, skips by reason {dict(events.skipped)}",
        )
    elif data_cfg.on_bad_sample == "error" and events.bad:
        ok, problem = (
            False,
            f"{events.bad} bad line(s); training with data.on_bad_sample=error stops at the first",
        )
    else:
        problem = events.bad_fraction_problem(data_cfg.max_bad_fraction)
        ok = problem is None
        problem = f"{meta_path}: {problem}" if problem else None
    counts = ds.source.counts()
    for name, stats in per_dataset.items():
        stats["pairs_after_repeat"] = counts.get(name, 0)
    formats = {spec.name: fmt for spec, fmt in zip(ds.source.specs, ds.source.formats)}
    return {
        "meta_path": str(meta_path),
        "ok": ok,
        "problem": problem,
        "datasets": {k: dict(v) for k, v in per_dataset.items()},
        "formats": formats,  # what each dataset was read as (mpo.data.formats)
        "pairs": len(ds),
        "token_lengths": percentiles(lengths),
        "truncated_responses": dict(events.truncated),
        "skipped": dict(events.skipped),
        "report": skip_report(meta_path, len(ds), data_cfg.max_bad_fraction, events),
    }


def _format_check(res: dict[str, Any]) -> str:
    lines = [
        f"{res['meta_path']}: {'OK' if res['ok'] else 'FAILED'}  pairs (after repeat_time): {res['pairs']}"
    ]
    for name, s in res["datasets"].items():
        lines.append(
            f"  {name} ({res['formats'].get(name)}): lines {s.get('lines', 0)}, valid {s.get('valid_lines', 0)}, skipped {s.get('skipped', 0)}, "
            f"images {s.get('images', 0)}, tiles {s.get('tiles', 0)}, pairs after repeat {s.get('pairs_after_repeat', 0)}"
        )
    lines.append(f"  sequence tokens (untruncated, chosen and rejected): {res['token_lengths']}")
    lines.append(f"  truncated responses: {res['truncated_responses'] or 0}")
    lines.append(f"  skips by reason: {res['skipped'] or 0}")
    for reason, msgs in res["report"]["examples"].items():
        lines.append(f"    {reason}: {msgs[0]}")
    if res["problem"]:
        lines.append(f"  problem: {res['problem']}")
    return "\n".join(lines)


def cmd_check(argv: list[str]) -> int:
    """``mpo data check``: exit 0 when every dataset passes the run's bad-sample policy, 1 if not."""
    from mpo.cli_args import config_parser

    p = config_parser("mpo data check", "Validate every line; counts, tiles, token lengths, skips")
    p.add_argument("--json", action="store_true", help="print one JSON object per meta file")
    p.add_argument("--out", default=None, help="also write data_skips[_eval].json into this folder")
    args = p.parse_args(argv)
    from mpo.config import ConfigError
    from mpo.model.loading import ModelLoadError

    try:
        cfg, tokenizer, vision = _load(args)
        metas = [("train", cfg.data.meta_path)] + (
            [("eval", cfg.data.eval_meta_path)] if cfg.data.eval_meta_path else []
        )
        ok = True
        for split, meta in metas:
            res = check_dataset(meta, tokenizer, vision, cfg.data)
            ok = ok and res["ok"]
            if args.out:
                name = "data_skips.json" if split == "train" else f"data_skips_{split}.json"
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / name).write_text(json.dumps(res["report"], indent=1, ensure_ascii=False))
            if args.json:
                print(
                    json.dumps(
                        {"split": split, **{k: v for k, v in res.items() if k != "report"}},
                        ensure_ascii=False,
                    )
                )
            else:
                print(f"[{split}] " + _format_check(res))
    except (ConfigError, DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def inspect_pair(pair: dict[str, Any], tokenizer, tokens_per_tile: int, ignore_index: int) -> dict[str, Any]:
    """A pair as the model sees it (see ``mpo data inspect``)."""
    pv = pair["pixel_values"]
    out: dict[str, Any] = {
        "dataset": pair["dataset"],
        "line": pair["line"],
        "num_tiles": list(pair["num_tiles"]),
        "num_image_tokens": sum(pair["num_tiles"]) * tokens_per_tile,
        "pixel_stats": None
        if pv is None
        else {"shape": list(pv.shape), "sum": float(pv.double().sum()), "mean": float(pv.double().mean())},
    }
    for name in ("chosen", "rejected"):
        ids, labels = pair[f"{name}_input_ids"], pair[f"{name}_labels"]
        out[name] = {
            "text": tokenizer.decode(ids.tolist(), skip_special_tokens=False),
            "trained_text": tokenizer.decode(
                labels[labels != ignore_index].tolist(), skip_special_tokens=False
            ),
            "num_tokens": int(ids.numel()),
        }
    return out


def cmd_inspect(argv: list[str]) -> int:
    """``mpo data inspect``: one JSON line per requested pair (global index after repeat_time)."""
    from mpo.cli_args import config_parser

    p = config_parser("mpo data inspect", "One pair exactly as the model sees it, as JSON")
    p.add_argument("--index", required=True, help="sample index (0-based, after repeat_time) or 'all'")
    p.add_argument("--json", action="store_true", help="JSON output (the only format)")
    p.add_argument("--eval", action="store_true", help="read data.eval_meta_path instead of data.meta_path")
    args = p.parse_args(argv)
    from mpo.config import ConfigError
    from mpo.data.pairs import PairDataset
    from mpo.data.template import IGNORE_INDEX
    from mpo.model.loading import ModelLoadError

    try:
        cfg, tokenizer, vision = _load(args)
        meta = cfg.data.eval_meta_path if args.eval else cfg.data.meta_path
        if meta is None:
            raise DataError("--eval given but data.eval_meta_path is not set")
        ds = PairDataset(meta, tokenizer, vision, cfg.data)
        if args.index == "all":
            indices = range(len(ds))
        else:
            try:
                indices = [int(args.index)]
            except ValueError as exc:
                raise DataError(f"--index must be an integer or 'all', got {args.index!r}") from exc
            if not 0 <= indices[0] < len(ds):
                raise DataError(f"--index {indices[0]} out of range: {meta} has {len(ds)} pairs")
        for i in indices:
            pair, events = ds[i]
            if pair is None:  # skipped under on_bad_sample=skip; the reason goes to stderr
                print(f"index {i}: skipped: {events.first_examples(1)[0]}", file=sys.stderr)
                continue
            print(
                json.dumps(
                    inspect_pair(pair, tokenizer, vision.tokens_per_tile, IGNORE_INDEX), ensure_ascii=False
                )
            )
    except (ConfigError, DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_convert(argv: list[str]) -> int:
    """``mpo data convert``: TRL / LLaMA-Factory / ms-swift preference data -> MMPR meta + JSONL."""
    p = argparse.ArgumentParser(
        prog="mpo data convert",
        description="Write another project's preference data as MMPR files (meta.json + JSONL)",
    )
    p.add_argument("--from", dest="fmt", required=True, choices=["trl", "llamafactory", "swift"])
    p.add_argument(
        "source", help="a .jsonl/.json/.parquet/.arrow file, a datasets folder, or a dataset_info.json"
    )
    p.add_argument("out_dir", help="folder to write meta.json, <dataset>.jsonl and images/ into")
    p.add_argument("--name", default=None, help="dataset name in meta.json (default: the file's stem)")
    p.add_argument(
        "--root", default=None, help="folder relative media paths resolve against (default: IN's folder)"
    )
    p.add_argument(
        "--on-bad", choices=["error", "skip"], default="error", help="a bad record stops, or is counted"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/meta.json")
    a = p.parse_args(argv)
    from mpo.data.convert import convert

    try:
        rep = convert(a.source, a.fmt, a.out_dir, a.name, a.root, a.on_bad, a.overwrite)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, n in rep.written.items():
        print(f"{name}: {n} pairs")
    for reason, n in rep.skipped.items():
        print(f"skipped {n} ({reason}), first: {rep.examples[reason]}")
    print(f"meta: {rep.meta_path}")
    return 0


SUBCOMMANDS = {"check": cmd_check, "inspect": cmd_inspect, "convert": cmd_convert}


def cmd_data(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown subcommand '{argv[0]}'{hint} ({', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    return SUBCOMMANDS[argv[0]](argv[1:])
