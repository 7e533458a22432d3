"""The length index at MMPR scale: first build, reuse, time to the first training step, peak RSS.

Writes ``--pairs`` generated pairs (default 3,000,000, MMPR v1.1's size) into one JSONL file in a
temporary folder: 30 % text-only, 60 % one image, 10 % two to four images, drawn from a pool of
``--images`` real PNG/JPEG files whose sides run from 24 to 3000 px; four consecutive pairs share
a question and image (2 correct x 2 wrong answers, as MMPR's correctness-based pairs). The tokenizer and vision settings are the tiny
test model's (``mpo make-tiny``: 64 px tiles, a 600-token byte-level BPE, slower per character
than a real vocabulary). Then, each phase in a fresh process so its peak RSS is its own:

  build     ``mpo data index`` on a cold cache with ``--workers`` worker processes
  reuse     ``mpo data index`` again: the cached index is found and read
  start     a training start with ``data.group_by_length=true`` and the index cached:
            ``build_trainer`` + ``train()`` until the end of step 1 (tiny model, batch 2)
  scaling   the first ``--scaling-pairs`` pairs built with 0, 1, 2 workers (0: in-process)

and prints one JSON line. Peak RSS: ``ru_maxrss`` of the main process and of its largest worker
(forked workers also count the pages they share with the parent). The folder is removed at the end.

    python scripts/bench_lengths.py [--pairs 3000000] [--workers 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the shape is red green blue yellow purple orange white black circle square triangle "
    "background picture image colour left right top bottom small large there are one two three"
).split()


def write_images(folder: Path, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` real image files, sides 24..3000 px, PNG or JPEG; flat colours keep them small on disk."""
    from PIL import Image

    names = []
    for k in range(n):
        w, h = (int(x) for x in np.exp(rng.uniform(np.log(24), np.log(3000), size=2)))
        name = f"img_{k:05d}.{'png' if k % 3 else 'jpg'}"
        Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3))).save(folder / name)
        names.append(name)
    return names


def write_pairs(path: Path, n: int, images: list[str], rng: np.random.Generator) -> None:
    """``n`` MMPR-style lines, four per question and image: 2 correct x 2 wrong answers (MMPR's
    correctness-based pairs), each answer 1..6 short sentences."""
    sentences = [
        " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))).capitalize() + "." for _ in range(512)
    ]
    groups = (n + 3) // 4
    kinds = rng.choice(3, size=groups, p=[0.3, 0.6, 0.1])
    counts = rng.integers(1, 7, size=(groups, 4))
    picks = rng.integers(0, len(sentences), size=(groups, 4))
    with open(path, "w") as f:
        for i in range(n):
            g = i // 4
            answers = [
                " ".join(sentences[(picks[g, a] + k) % 512] for k in range(counts[g, a])) for a in range(4)
            ]
            row = {"question": f"Question {g}: what is shown, and which colour is it?"}
            row["chosen"], row["rejected"] = answers[i % 2], answers[2 + (i // 2) % 2]
            if kinds[g] == 1:
                row["image"] = images[g % len(images)]
            elif kinds[g] == 2:
                m = 2 + g % 3
                row["image"] = [images[(g + 7 * k) % len(images)] for k in range(m)]
                row["question"] = "<image>\n" * m + row["question"]
            f.write(json.dumps(row) + "\n")


def write_config(work: Path, model: Path, jsonl: Path, cache: Path, workers: int) -> Path:
    import yaml

    cfg = {
        "model": {"path": str(model)},
        "data": {
            "meta_path": str(jsonl),
            "max_dynamic_patch": 12,
            "length_cache_dir": str(cache),
            "length_workers": workers,
            "group_by_length": True,
        },
    }
    path = work / f"cfg-{jsonl.stem}-{workers}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def peak_rss_mb() -> dict[str, float]:
    return {
        "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished workers: a check on wall time under load."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---- phases (each in its own process) ------------------------------------------------------------


def phase_index(config: str) -> dict:
    """``mpo data index``, timed from process start (imports included)."""
    start = time.perf_counter()
    import contextlib
    import io

    from mpo.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["data", "index", "--config", config, "--json"])
    fig = json.loads(out.getvalue())
    (d,) = fig["datasets"].values()
    return {
        "rc": rc,
        "seconds": time.perf_counter() - start,
        "built": d["built"],
        "build_seconds": d["build_seconds"],
        "pairs": fig["pairs"],
        "pair_tokens": fig["pair_tokens"],
        "tiles": fig["tiles"],
        "cpu_seconds": cpu_seconds(),
        "peak_rss_mb": peak_rss_mb(),
    }


def phase_start(config: str, out_dir: str) -> dict:
    """Seconds from process start to the end of training step 1, with the index cached."""
    start = time.perf_counter()
    marks: dict[str, float] = {}
    from transformers import TrainerCallback

    import mpo.sampler
    from mpo.config import load_config
    from mpo.run import build_trainer

    marks["imports"] = time.perf_counter() - start
    real = mpo.sampler.pair_lengths

    def timed(pairs):
        t = time.perf_counter()
        out = real(pairs)
        marks["pair_lengths"] = time.perf_counter() - t
        return out

    mpo.sampler.pair_lengths = timed

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.setdefault("first_step_end", time.perf_counter() - start)

    overrides = [
        f"training.output_dir={out_dir}",
        "training.max_steps=1",
        "training.per_device_train_batch_size=2",
        "training.use_cpu=true",
        "training.save_strategy=no",
        "training.report_to=none",
        "training.disable_tqdm=true",
        "training.dataloader_num_workers=0",
    ]
    trainer, _ = build_trainer(load_config(config, overrides))
    marks["build_trainer"] = time.perf_counter() - start
    trainer.add_callback(FirstStep())
    trainer.train()
    return {
        "seconds_to_first_step": marks["first_step_end"],
        "marks": marks,
        "cpu_seconds": cpu_seconds(),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_phase(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, __file__, "--phase", *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def header_us(folder: Path, images: list[str]) -> float:
    """Microseconds to read one image header with PIL (files in the page cache)."""
    from PIL import Image

    t = time.perf_counter()
    for name in images * 3:
        with Image.open(folder / name) as im:
            im.size  # noqa: B018
    return (time.perf_counter() - t) / (3 * len(images)) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3_000_000)
    p.add_argument("--images", type=int, default=1000, help="image files in the pool")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the first build")
    p.add_argument(
        "--scaling-pairs", type=int, default=200_000, help="pairs of the 0/1/2-worker builds (0: skip)"
    )
    p.add_argument("--work", default=None, help="folder for data, model and cache (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the folder")
    p.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        name, *rest = a.phase
        print(json.dumps(phase_index(*rest) if name == "index" else phase_start(*rest)))
        return

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-lengths-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rng = np.random.default_rng(0)
        sys.path.insert(0, str(ROOT))
        from mpo.model.tiny import save_tiny_internvl

        model = Path(save_tiny_internvl(work / "model"))
        (work / "data").mkdir(exist_ok=True)
        t = time.perf_counter()
        images = write_images(work / "data", a.images, rng)
        jsonl = work / "data" / "pairs.jsonl"
        write_pairs(jsonl, a.pairs, images, rng)
        result: dict = {
            "pairs": a.pairs,
            "jsonl_bytes": jsonl.stat().st_size,
            "images": a.images,
            "generate_seconds": time.perf_counter() - t,
            "header_us": header_us(work / "data", images),
            "cpus": os.cpu_count(),
        }
        cache = work / "cache"
        cfg = write_config(work, model, jsonl, cache, a.workers)
        result["build"] = run_phase("index", str(cfg))
        result["reuse"] = run_phase("index", str(cfg))
        result["start"] = run_phase("start", str(cfg), str(work / "run"))
        if a.scaling_pairs:
            part = work / "data" / "first.jsonl"
            with open(jsonl) as src, open(part, "w") as dst:
                for _ in range(min(a.scaling_pairs, a.pairs)):
                    dst.write(src.readline())
            result["scaling"] = {}
            for w in (0, 1, 2):
                shutil.rmtree(work / f"cache-{w}", ignore_errors=True)
                run = run_phase("index", str(write_config(work, model, part, work / f"cache-{w}", w)))
                result["scaling"][w] = {
                    "build_seconds": run["build_seconds"],
                    "cpu_seconds": run.get("cpu_seconds"),
                    "pairs_per_s": min(a.scaling_pairs, a.pairs) / run["build_seconds"],
                    "peak_rss_mb": run["peak_rss_mb"],
                }
        result["load_avg_1m"] = os.getloadavg()[0]
        print("BENCH " + json.dumps(result), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
