"""Video measurements: the issue's 90-frame clip trains at max_length 8192, and `mpo data check` on a
10-minute 1080p clip stays small.

    python scripts/video_check.py issue [--work DIR]   # 3 s, 90-frame clip, 448 px tiles, max_length 8192:
                                                      # frames chosen (`mpo data inspect`), then 2 training steps
    python scripts/video_check.py long [--work DIR]    # 10 min of 1080p at 30 fps (18,000 frames): peak RSS and
                                                      # wall time of `mpo data check` and `mpo data inspect`

Each measured command is a fresh subprocess; its peak RSS is its own (``os.wait4`` rusage). The
model is the tiny InternVL with InternVL2.5's vision geometry (448 px tiles, 14 px patches, 256
tokens per tile), so frame budgets and tile sizes are the real ones. Clips are written with PyAV
into ``--work`` (default: a temporary folder, deleted at the end). The 1080p clip is mostly static
(a gradient with the frame number drawn as stripes), x264 ultrafast with its default 250-frame GOP.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measured(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd``; its exit code, wall seconds, peak RSS (MiB, its own: ``os.wait4``) and output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "stdout": stdout,
        "stderr": stderr[-2000:],
    }


def write_model(work: Path) -> Path:
    # Libraries imported here log to stdout (DeepSpeed's accelerator notice): keep stdout one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        from mpo.model.tiny import save_tiny_internvl

        return save_tiny_internvl(
            work / "model-448",
            vision={"image_size": 448, "patch_size": 14},
            text={"max_position_embeddings": 8192},
        )


def write_config(work: Path, model: Path, video: str, **training) -> Path:
    import yaml

    (work / "v.jsonl").write_text(
        json.dumps(
            {
                "video": video,
                "question": "<video>\nWhat happens?",
                "chosen": "The clip gets brighter.",
                "rejected": "Nothing happens.",
            }
        )
        + "\n"
    )
    cfg = {
        "model": {"path": str(model)},
        "data": {"meta_path": str(work / "v.jsonl"), "max_length": 8192},
        "training": {"output_dir": str(work / "run"), "use_cpu": True, "report_to": "none", **training},
    }
    path = work / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def issue_clip(work: Path) -> dict:
    """A 3 s, 90-frame clip at 640x360 (the issue's case): frames chosen, then two MPO steps."""
    import av

    with av.open(str(work / "v.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for k in range(90):
            arr = np.full((360, 640, 3), 40 + 2 * k, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    cfg = write_config(
        work,
        write_model(work),
        "v.mp4",
        max_steps=2,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    inspect = measured(
        [sys.executable, "-m", "mpo.cli", "data", "inspect", "--config", str(cfg), "--index", "0", "--json"],
        ROOT,
    )
    shown = json.loads(inspect["stdout"])
    train = measured([sys.executable, "train/train_mpo.py", "--config", str(cfg)], ROOT)
    metrics = (
        [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        if train["rc"] == 0
        else []
    )
    skips = json.loads((work / "run" / "data_skips.json").read_text()) if train["rc"] == 0 else None
    return {
        "case": "issue: 90 frames, 3 s, 448 px tiles, max_length 8192",
        "inspect": {k: shown["video"][k] for k in ("frames", "frames_in_clip", "fit", "sampling")}
        | {"chosen_tokens": shown["chosen"]["num_tokens"], "image_tokens": shown["num_image_tokens"]},
        "inspect_seconds": inspect["seconds"],
        "train_rc": train["rc"],
        "train_seconds": train["seconds"],
        "train_peak_rss_mib": train["peak_rss_mib"],
        "train_losses": [round(m["loss"], 4) for m in metrics if "loss" in m and "train_runtime" not in m],
        "skipped": None if skips is None else skips["skipped"],
        "train_stderr_tail": None if train["rc"] == 0 else train["stderr"],
    }


def long_clip(work: Path, minutes: float) -> dict:
    """A long mostly static 1080p clip; `mpo data check` and `mpo data inspect` on it."""
    import av

    frames = int(minutes * 60 * 30)
    path = work / f"long_{frames}.mp4"
    start = time.perf_counter()
    if not path.is_file():  # a kept --work folder reuses it
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=30, options={"preset": "ultrafast", "crf": "35"})
            stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
            yuv = np.full((1080 * 3 // 2, 1920), 128, np.uint8)  # planar Y then U, V: no RGB conversion
            yuv[:1080] = np.linspace(16, 235, 1920, dtype=np.uint8)[None]
            for k in range(frames):
                bits = (k >> np.arange(16)) & 1
                yuv[:64, : 16 * 64] = np.repeat(bits * 219 + 16, 64).astype(np.uint8)[None, :]
                for packet in stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    encode_s = time.perf_counter() - start
    cfg = write_config(work, write_model(work), path.name)
    check = measured([sys.executable, "-m", "mpo.cli", "data", "check", "--config", str(cfg), "--json"], ROOT)
    inspect = measured(
        [sys.executable, "-m", "mpo.cli", "data", "inspect", "--config", str(cfg), "--index", "0", "--json"],
        ROOT,
    )
    res = json.loads(check["stdout"]) if check["rc"] == 0 else {}
    shown = json.loads(inspect["stdout"])["video"] if inspect["rc"] == 0 else {}
    return {
        "case": f"{minutes:g} min 1080p30 ({frames} frames, {path.stat().st_size / 2**20:.1f} MiB), 448 px tiles, max_length 8192",
        "encode_seconds": round(encode_s, 1),
        "check_rc": check["rc"],
        "check_seconds": check["seconds"],
        "check_peak_rss_mib": check["peak_rss_mib"],
        "check_video_frames": res.get("video_frames"),
        "inspect_rc": inspect["rc"],
        "inspect_seconds": inspect["seconds"],
        "inspect_peak_rss_mib": inspect["peak_rss_mib"],
        "inspect_frames": {k: shown.get(k) for k in ("frames", "frames_in_clip")},
        "stderr_tail": (check["stderr"] if check["rc"] else inspect["stderr"])
        if check["rc"] or inspect["rc"]
        else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["issue", "long"])
    p.add_argument(
        "--work", default=None, help="keep clips, model and run here (default: a temporary folder)"
    )
    p.add_argument("--minutes", type=float, default=10.0, help="length of the long clip")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mpo-video-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        out = issue_clip(work) if args.what == "issue" else long_clip(work, args.minutes)
        out["load_avg_1m"] = round(os.getloadavg()[0], 2)
        print(json.dumps(out))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
