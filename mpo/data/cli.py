"""``mpo data``: validate MMPR data and show pairs exactly as the model sees them.

    mpo data check --config X [--json] [--out DIR] [key.sub=value ...]
    mpo data inspect --config X --index I|all [--epoch E] --json [key.sub=value ...]
    mpo data index --config X [--rebuild] [--json] [key.sub=value ...]
    mpo data convert --from trl|llamafactory|swift IN OUT [--name N] [--root DIR] [--on-bad skip]

``check``, ``inspect`` and ``index`` read the tokenizer and the model's ``config.json`` (for tile
size and tokens per tile); no model weights are loaded. ``convert`` needs no model
(``mpo.data.convert``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


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
    frames: Counter[int] = Counter()  # frames per video pair (evaluation's: the most that fit)
    frame_limits: Counter[str] = Counter()  # what capped each video's frame count
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
            stats["tiles"] += sum(pair["num_tiles"])
            if "video" not in pair:
                stats["images"] += len(pair["num_tiles"])
            else:
                stats["videos"] += 1
                frames[pair["video"]["frames"]] += 1
                frame_limits[video_frame_limit(pair["video"], data_cfg)] += 1
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
        "video_frames": video_frame_stats(frames, frame_limits),
        "truncated_responses": dict(events.truncated),
        "skipped": dict(events.skipped),
        "report": skip_report(meta_path, len(ds), data_cfg.max_bad_fraction, events),
    }


def video_frame_limit(video: dict[str, Any], data_cfg) -> str:
    """What decided a video's frame count (the most that fit, as evaluation samples it)."""
    if video["fit"] >= data_cfg.video_max_frames:
        return "video_max_frames"
    if video["fit"] >= video["frames_in_clip"]:
        return "clip_length"
    return "max_length"


def video_frame_stats(frames: Counter, limits: Counter) -> dict[str, Any]:
    """Frames per video (min / p50 / max) and how many videos each bound capped; {} without videos."""
    from mpo.stats import percentiles

    if not frames:
        return {}
    return {
        "videos": sum(frames.values()),
        "min": min(frames),
        **percentiles(frames, (50, 100)),
        "capped_by": dict(limits),
    }


def _format_check(res: dict[str, Any]) -> str:
    lines = [
        f"{res['meta_path']}: {'OK' if res['ok'] else 'FAILED'}  pairs (after repeat_time): {res['pairs']}"
    ]
    for name, s in res["datasets"].items():
        lines.append(
            f"  {name} ({res['formats'].get(name)}): lines {s.get('lines', 0)}, valid {s.get('valid_lines', 0)}, skipped {s.get('skipped', 0)}, "
            f"images {s.get('images', 0)}, tiles {s.get('tiles', 0)}, pairs after repeat {s.get('pairs_after_repeat', 0)}"
            + (f", videos {s['videos']}" if s.get("videos") else "")
        )
    lines.append(f"  sequence tokens (untruncated, chosen and rejected): {res['token_lengths']}")
    if res.get("video_frames"):
        v = res["video_frames"]
        lines.append(
            f"  frames per video (the most that fit data.max_length; training with data.video_sampling=rand "
            f"draws from video_min_frames up to it): min {v['min']}, p50 {v['p50']}, max {v['max']}; "
            f"capped by {v['capped_by']}"
        )
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
    from mpo.data.mmpr import DataError
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
        **({"video": pair["video"]} if "video" in pair else {}),
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
    p.add_argument(
        "--epoch",
        type=int,
        default=None,
        help="show training's random view of this epoch (video frames, data_augment) instead of the "
        "deterministic one",
    )
    args = p.parse_args(argv)
    from mpo.config import ConfigError
    from mpo.data.mmpr import DataError
    from mpo.data.pairs import PairDataset
    from mpo.data.template import IGNORE_INDEX
    from mpo.model.loading import ModelLoadError

    try:
        cfg, tokenizer, vision = _load(args)
        meta = cfg.data.eval_meta_path if args.eval else cfg.data.meta_path
        if meta is None:
            raise DataError("--eval given but data.eval_meta_path is not set")
        if args.epoch is not None and (args.epoch < 0 or args.eval):
            raise DataError("--epoch must be >= 0 and is for the training data (not with --eval)")
        ds = PairDataset(meta, tokenizer, vision, cfg.data, train=args.epoch is not None)
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
            # The training sampler's index: epoch·N + i seeds the sample's random view.
            pair, events = ds[i + (args.epoch or 0) * len(ds)]
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


def cmd_index(argv: list[str]) -> int:
    """``mpo data index``: build (or reuse) the length index of ``data.meta_path``; print its figures.

    Under ``torchrun``/``deepspeed`` the ranks split the work (``mpo.data.lengths``).
    """
    from mpo.cli_args import config_parser

    p = config_parser("mpo data index", "Per-pair lengths computed once, in parallel, and cached")
    p.add_argument("--rebuild", action="store_true", help="recompute even when a cached index matches")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    import os
    import time

    from mpo.config import ConfigError
    from mpo.data.lengths import format_figures, index_figures, launched_group, length_index
    from mpo.data.mmpr import DataError
    from mpo.data.pairs import PairDataset
    from mpo.model.loading import ModelLoadError

    started = time.perf_counter()
    try:
        cfg, tokenizer, vision = _load(args)
        with launched_group():
            pairs = PairDataset(cfg.data.meta_path, tokenizer, vision, cfg.data)
            figures = index_figures(length_index(pairs, rebuild=args.rebuild), cfg.data.max_length)
    except (ConfigError, DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        seconds = time.perf_counter() - started
        print(json.dumps({**figures, "seconds": seconds}) if args.json else format_figures(figures, seconds))
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
    from mpo.data.mmpr import DataError

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


SUBCOMMANDS = {"check": cmd_check, "inspect": cmd_inspect, "index": cmd_index, "convert": cmd_convert}


def cmd_data(argv: list[str]) -> int:
    from mpo.cli_args import dispatch

    return dispatch(argv, SUBCOMMANDS, __doc__)
