"""Our trainer against TRL 1.16's DPOTrainer running MPO, on CPU: pairs/s, tiles/s, tokens/s, peak
memory, and the share of the machine's own matmul peak each reaches.

    python scripts/benchmark.py                          # the full set (~10 min on 2 idle cores)
    python scripts/benchmark.py --splits 1b --rows trl,ours --rounds 3

Both trainers train the same model (random weights, saved once), the same pairs and pixels, with
the same optimizer settings and the MPO objective: TRL's ``loss_type=["sigmoid", "bco_pair",
"sft"]``, ``loss_weights=[0.8, 0.2, 1.0]`` (MPO paper §3.2); ours is built by ``mpo.run.build_trainer``
from a config, so it pays what a real run pays (logging every step, metrics file, data events).

Data: pairs over images of 1 to 7 tiles with answers of 5 to 800 tokens (log-uniform), the same for
every row. Two model shapes (``benchlib.SHAPES``): CPU-sized look-alikes with the vision:LLM split
of forward FLOPs of InternVL2.5-1B (1.35 : 1) and of InternVL2.5-8B (0.08 : 1).

Rows: ``trl`` (batch 1); ``trl_response_head`` (batch 1, TRL as it runs on CUDA: on CPU TRL 1.16
sends every position through the LM head, image tokens included, but on Triton devices only the
response positions; here its ``_use_triton`` is answered yes so the GPU behaviour is timed on CPU);
``ours`` (batch 1, reference model), ``ours_b3`` (batch 3, padded), ``ours_packed`` (pair-atomic
packing, ``data.max_tokens_per_batch``), ``ours_packed_cache`` (packing + reference cache).

Method: each measured run is a child forked from this process (imports done once), with its
peak-RSS mark reset at the start (``/proc/self/clear_refs``); rows alternate their order in each
round. A run warms up for one step, then times whole passes over the data, at least 10 steps:
from the second batch to a later epoch's first, which is the same batch (our packed batches put
the largest first in every epoch; the others run in data order), so every row times every pair
equally often. Figures are medians over rounds with min-max; ratios against TRL are taken within
a round. ``peak_share``: the model FLOPs of the plain computation (vision tower once per pair, LLM
over both full sequences, LM head on response tokens; 3x for training, +1x for a reference
forward) per second, over the best float32 matmul rate measured in the same run. Prints one JSON
line per row.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (scripts/ is not a package)

SPLITS = {"1b": "cpu_1b", "8b": "cpu_8b"}
ROWS = {
    "trl": {"trainer": "trl", "batch": 1},
    "trl_response_head": {"trainer": "trl", "batch": 1, "response_head": True},
    "ours": {"trainer": "ours", "batch": 1, "overrides": ["model.reference=copy"]},
    "ours_b3": {"trainer": "ours", "batch": 3, "overrides": ["model.reference=copy"]},
    "ours_packed": {"trainer": "ours", "batch": 1, "packed": True, "overrides": ["model.reference=copy"]},
    "ours_packed_cache": {
        "trainer": "ours",
        "batch": 1,
        "packed": True,
        "overrides": ["model.reference=cache"],
    },
}


def common_args(out: Path, batch: int) -> dict:
    """TrainingArguments shared by both trainers."""
    return dict(
        output_dir=str(out), per_device_train_batch_size=batch, learning_rate=1e-6, lr_scheduler_type="constant",
        weight_decay=0.05, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
        train_sampling_strategy="sequential",
    )  # fmt: skip


def build_ours(a, row: dict, work: Path, out: Path):
    from mpo.config import load_config
    from mpo.run import build_trainer

    args = common_args(out, row["batch"])
    overrides = [f"training.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in args.items()]
    overrides += [f"model.path={work / 'model'}", f"data.meta_path={work / 'data' / 'meta.json'}",
                  f"model.ref_cache={work / 'refcache'}", f"data.max_dynamic_patch={benchlib.MAX_DYNAMIC_PATCH}",
                  "data.max_length=4096", "training.max_steps=1", *row.get("overrides", [])]  # fmt: skip
    if row.get("packed"):
        overrides += ["data.packing=true", f"data.max_tokens_per_batch={a.max_tokens_per_batch}"]
    trainer, _ = build_trainer(load_config(None, overrides))
    return trainer, trainer.processing_class.pad_token_id


def build_trl(a, row: dict, work: Path, out: Path):
    from trl import DPOConfig, DPOTrainer

    from mpo.data.tiling import VisionSpec
    from mpo.model.loading import load_model, load_tokenizer

    if row.get("response_head"):
        import trl.trainer.utils

        trl.trainer.utils._use_triton = lambda device: True  # score response positions only, as on CUDA
    tok = load_tokenizer(str(work / "model"))
    model, ref = load_model(str(work / "model")), load_model(str(work / "model"))
    vision = VisionSpec.from_config(model.config)
    proc = benchlib.processor_class()(
        tok, vision.image_size, vision.tokens_per_tile, benchlib.MAX_DYNAMIC_PATCH
    )
    cfg = DPOConfig(**common_args(out, row["batch"]), max_steps=1, loss_type=["sigmoid", "bco_pair", "sft"],
                    loss_weights=[0.8, 0.2, 1.0], beta=0.1, max_length=None)  # fmt: skip
    dataset = benchlib.trl_dataset(work / "data" / "meta.json")
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=proc)
    return trainer, tok.pad_token_id


def measure(a, name: str, work: Path) -> dict:
    """One measured run (in a forked child): a warm-up step, then one timed pass over the data."""
    import torch

    clear_peak_rss()
    baseline = current_rss_mb()
    row = ROWS[name]
    out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    trainer, pad = (build_trl if row["trainer"] == "trl" else build_ours)(a, row, work, out)
    peak_flops = benchlib.matmul_peak_flops("cpu")
    seconds, steps, batches = benchlib.timed_pass(trainer, pad, "cpu", min_steps=a.min_steps)
    config = trainer.accelerator.unwrap_model(trainer.model).config
    result = benchlib.summarize(
        batches, seconds, steps, config, "model.reference=cache" not in row.get("overrides", [])
    )
    return {
        **result, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
        "peak_share": result["model_flops_per_s"] / peak_flops, "matmul_peak_gflops": peak_flops / 1e9,
        "load_avg_1m": os.getloadavg()[0], "threads": torch.get_num_threads(),
    }  # fmt: skip


def clear_peak_rss() -> None:
    """Reset this process's peak-RSS mark to its current RSS (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _child(conn, fn, args) -> None:
    os.dup2(2, 1)  # the trainers' progress lines go to stderr; stdout holds only the JSON lines
    conn.send(fn(*args))
    conn.close()


def isolated(fn, *args) -> dict:
    """``fn(*args)`` in a forked child (own memory high-water mark, no import cost); its result."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args))
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = None
    proc.join()
    if proc.exitcode != 0 or result is None:
        raise SystemExit(
            f"benchmark child {getattr(fn, '__name__', fn)}{args[1:2]} failed (exit {proc.exitcode})"
        )
    return result


def setup(a, split: str, work: Path) -> None:
    """Model, data and (for the cache rows) the reference cache, in a child (no torch threads here)."""
    from mpo.config import load_config
    from mpo.refcache import precompute_ref

    benchlib.build_model_dir(work / "model", SPLITS[split])
    meta = benchlib.write_pairs(work / "data", a.pairs, [1, 3, 4, 5, 6, 7], (5, 800))
    if any(ROWS[r]["overrides"] == ["model.reference=cache"] for r in a.rows if "overrides" in ROWS[r]):
        cfg = load_config(None, [f"model.path={work / 'model'}", f"data.meta_path={meta}", "data.max_length=4096",
                                 f"model.ref_cache={work / 'refcache'}", f"data.max_dynamic_patch={benchlib.MAX_DYNAMIC_PATCH}"])  # fmt: skip
        precompute_ref(cfg, batch_size=1)
    return {}


def spread(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}  # fmt: skip


def report(split: str, runs: dict[str, list[dict]], a) -> list[dict]:
    """One JSON-ready dict per row, plus the TRL LM-head line and the packing line."""
    out = []
    for name, rs in runs.items():
        row = {
            "split": split,
            "row": name,
            "batch": "packed" if ROWS[name].get("packed") else ROWS[name]["batch"],
        }
        for key in ("pairs_per_s", "tiles_per_s", "tokens_per_s", "peak_share"):
            row[key] = spread([r[key] for r in rs], 4)
        row |= {"peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs)), "baseline_rss_mb": round(rs[0]["baseline_rss_mb"]),
                "padding_share": round(rs[0]["padding_share"], 3), "pairs_per_step": round(rs[0]["pairs_per_step"], 2),
                "timed_steps": rs[0]["steps"], "rounds": len(rs)}  # fmt: skip
        if "trl" in runs and name != "trl":
            row["vs_trl"] = ratios(rs, runs["trl"])
        out.append(row)
    if {"trl", "trl_response_head"} <= runs.keys():
        line = {"split": split, "row": "trl_cpu_lm_head_handicap",
                "trl_response_head_over_trl": ratios(runs["trl_response_head"], runs["trl"])}  # fmt: skip
        if "ours" in runs:
            line["ours_over_trl_response_head"] = ratios(runs["ours"], runs["trl_response_head"])
        out.append(line)
    for unpacked in ("ours", "ours_b3"):
        if {unpacked, "ours_packed"} <= runs.keys():
            out.append({"split": split, "row": f"ours_packed_vs_{unpacked}", **ratios(runs["ours_packed"], runs[unpacked]),
                        "padding_share_before": round(runs[unpacked][0]["padding_share"], 3),
                        "padding_share_after": round(runs["ours_packed"][0]["padding_share"], 3)})  # fmt: skip
    return out


def ratios(num: list[dict], den: list[dict]) -> dict:
    """Per-round ratios of pairs/s and of peak RSS (whole and above the shared baseline)."""

    def above(r):
        return r["peak_rss_mb"] - r["baseline_rss_mb"]

    return {
        "pairs_per_s": spread([n["pairs_per_s"] / d["pairs_per_s"] for n, d in zip(num, den)]),
        "peak_rss": spread([n["peak_rss_mb"] / d["peak_rss_mb"] for n, d in zip(num, den)]),
        "peak_rss_above_baseline": spread([above(n) / above(d) for n, d in zip(num, den)]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", default="1b,8b", help="model shapes: 1b, 8b")
    p.add_argument("--rows", default="trl,trl_response_head,ours,ours_b3,ours_packed,ours_packed_cache")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=16, help="pairs in the data (whole passes are timed)")
    p.add_argument("--min-steps", type=int, default=10, help="timed steps per run, at least (whole passes)")
    p.add_argument("--max-tokens-per-batch", type=int, default=4096, help="the packed rows' token budget")
    p.add_argument("--work-dir", default=None)
    a = p.parse_args(argv)
    a.rows = a.rows.split(",")
    unknown = set(a.rows) - ROWS.keys() | set(a.splits.split(",")) - SPLITS.keys()
    if unknown:
        p.error(
            f"unknown rows/splits {sorted(unknown)}; rows: {', '.join(ROWS)}; splits: {', '.join(SPLITS)}"
        )
    os.environ.update(TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    import torch  # noqa: F401  (imported once here: the forked children share it)
    import trl  # noqa: F401

    root = Path(a.work_dir or tempfile.mkdtemp(prefix="mpo-bench-"))
    start = time.perf_counter()
    for split in a.splits.split(","):
        work = root / split
        work.mkdir(parents=True, exist_ok=True)
        isolated(setup, a, split, work)
        runs: dict[str, list[dict]] = {r: [] for r in a.rows}
        for r in range(a.rounds):
            for name in a.rows if r % 2 == 0 else a.rows[::-1]:
                runs[name].append(isolated(measure, a, name, work))
                print(f"  {split} round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
        for line in report(split, runs, a):
            print(json.dumps(line), flush=True)
    print(f"total {time.perf_counter() - start:.0f}s in {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
