"""The GPU check: the real InternVL2.5-1B architecture on one CUDA GPU, ours against TRL 1.16.

    scripts/gpu_check.sh                 # = python scripts/gpu_check.py; one JSON line, < 8 min

The model is InternVL2.5-1B's architecture (InternViT-300M + Qwen2.5-0.5B, 151,674-row vocabulary)
with random weights built in code (no hub; ``benchlib.SHAPES["internvl2_5_1b"]``), trained in bf16
with gradient checkpointing on pairs of 1-7 tiles and answers of 5-800 tokens. Rows, each its own
process so its peak GPU memory is its own:

- ``trl``: TRL's DPOTrainer with the MPO loss list (``["sigmoid", "bco_pair", "sft"]``, weights 0.8/0.2/1.0);
- ``ours``: the plain path, batch 1, reference model; ``ours_shared``: the shared prompt, batch 1;
- ``ours_packed``: packed pairs (``data.max_tokens_per_batch``), reference model;
- ``ours_packed_cache``: packed pairs, reference cache (computed once before the rows);
- ``ours_zero3``: packed pairs + reference cache under DeepSpeed ZeRO-3 through the ``deepspeed``
  launcher, one process (the cached float64 reference log-probs meet DeepSpeed's bf16 cast).

Each row warms up for one epoch (the first shapes compile) and times the next. The line holds, per
row, pairs/s, tokens/s, peak GPU memory and MFU (model FLOPs as in ``benchlib.summarize`` over the
device's dense bf16 peak from ``PEAK_BF16_TFLOPS``), and each row's speedup over ``trl``. A row
that fails is reported with its error; the others still run. Without CUDA it stops at once with
an error line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (scripts/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks from NVIDIA's datasheets, matched in order against the device name.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0)]  # fmt: skip
CACHE = "model.reference=cache"
ROWS = {
    "trl": [],
    "ours": ["model.reference=copy"],
    "ours_shared": ["model.reference=copy", "model.shared_prompt=true"],
    "ours_packed": ["model.reference=copy", "data.packing=true"],
    "ours_packed_cache": [CACHE, "data.packing=true"],
    "ours_zero3": [CACHE, "data.packing=true", f"training.deepspeed={ROOT / 'configs/deepspeed/zero3.json'}"],
}
PAIRS, MAX_LENGTH, BUDGET = 32, 4096, 8192
TOTAL_S, ROW_TIMEOUT_S = 470, 150  # the whole check stays under 8 minutes


def peak_tflops(name: str) -> float | None:
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def training_args(out: Path) -> dict:
    return dict(
        output_dir=str(out), per_device_train_batch_size=1, learning_rate=1e-6, lr_scheduler_type="constant",
        weight_decay=0.05, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, bf16=True,
        gradient_checkpointing=True, dataloader_num_workers=2, seed=0, train_sampling_strategy="sequential",
    )  # fmt: skip


def ours_config(work: Path, out: Path, extra: list[str]):
    from mpo.config import load_config

    training = [
        f"training.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in training_args(out).items()
    ]
    return load_config(None, [
        *training, "training.max_steps=1", f"model.path={work / 'model'}", f"data.meta_path={work / 'data/meta.json'}",
        f"model.ref_cache={work / 'refcache'}", f"data.max_dynamic_patch={benchlib.MAX_DYNAMIC_PATCH}",
        f"data.max_length={MAX_LENGTH}", f"data.max_tokens_per_batch={BUDGET}", *extra,
    ])  # fmt: skip


def build_trl(work: Path, out: Path):
    from trl import DPOConfig, DPOTrainer

    from mpo.data.tiling import VisionSpec
    from mpo.model.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(work / "model"))
    model, ref = load_model(str(work / "model")), load_model(str(work / "model"))
    vision = VisionSpec.from_config(model.config)
    proc = benchlib.processor_class()(
        tok, vision.image_size, vision.tokens_per_tile, benchlib.MAX_DYNAMIC_PATCH
    )
    cfg = DPOConfig(**training_args(out), max_steps=1, loss_type=["sigmoid", "bco_pair", "sft"],
                    loss_weights=[0.8, 0.2, 1.0], beta=0.1, max_length=None)  # fmt: skip
    data = benchlib.trl_dataset(work / "data/meta.json")
    return DPOTrainer(
        model=model, ref_model=ref, args=cfg, train_dataset=data, processing_class=proc
    ), tok.pad_token_id


def child(row: str, work: Path) -> None:
    """One row: build, warm up an epoch, time an epoch; prints ``GPUCHECK {json}``."""
    import torch

    from mpo.run import build_trainer

    out = Path(tempfile.mkdtemp(prefix=f"{row}-", dir=work))
    torch.cuda.reset_peak_memory_stats()
    if row == "trl":
        trainer, pad = build_trl(work, out)
    else:
        trainer, _ = build_trainer(ours_config(work, out, ROWS[row]))
        pad = trainer.processing_class.pad_token_id
    seconds, steps, batches = benchlib.timed_pass(trainer, pad, "cuda", warmup_epoch=True)
    config = trainer.accelerator.unwrap_model(trainer.model).config
    result = benchlib.summarize(batches, seconds, steps, config, reference_forward=CACHE not in ROWS[row])
    result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["attn_implementation"] = config.get_text_config()._attn_implementation
    if int(os.environ.get("RANK", "0")) == 0:
        print("GPUCHECK " + json.dumps(result), flush=True)


def setup(work: Path) -> None:
    """Model (random weights), data and the reference cache, on this GPU (run as a child, so the
    orchestrating process holds no GPU memory)."""
    from mpo.refcache import precompute_ref

    benchlib.build_model_dir(work / "model", "internvl2_5_1b")
    benchlib.write_pairs(work / "data", PAIRS, [1, 3, 4, 5, 6, 7], (5, 800))
    precompute_ref(ours_config(work, work / "precompute", [CACHE]), batch_size=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(row: str, work: Path, timeout: float) -> dict:
    """``row`` in its own process (``setup`` too); its ``GPUCHECK`` result, or an error."""
    if timeout < 30:
        return {"error": "not run: the check's 8-minute budget was spent"}
    cmd = [sys.executable, __file__, "--child", row, "--work", str(work)]
    if row == "ours_zero3":
        launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which(
            "deepspeed"
        )
        if launcher is None:
            return {"error": "the deepspeed launcher is not installed"}
        cmd = [launcher, "--num_gpus", "1", "--master_port", str(_free_port()), *cmd[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("GPUCHECK ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(line[len("GPUCHECK ") :])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument(
        "--work", default=None, help="folder for the model, data and runs (default: a temp folder)"
    )
    p.add_argument("--child", choices=[*ROWS, "setup"], help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher's
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            json.dumps(
                {"error": "no CUDA device: scripts/gpu_check.sh needs one NVIDIA GPU (torch sees none)"}
            )
        )
        return 2
    if a.child == "setup":
        setup(Path(a.work))
        print("GPUCHECK {}", flush=True)
        return 0
    if a.child:
        child(a.child, Path(a.work))
        return 0
    start = time.perf_counter()
    work = Path(a.work or tempfile.mkdtemp(prefix="mpo-gpu-check-"))
    device = torch.cuda.get_device_name(0)
    prepared = run_row("setup", work, min(TOTAL_S, 180))
    rows = {}
    for r in a.rows.split(","):
        left = TOTAL_S - (time.perf_counter() - start)
        rows[r] = prepared if "error" in prepared else run_row(r, work, min(ROW_TIMEOUT_S, left))
    tflops = peak_tflops(device)
    for r in rows.values():
        if "error" not in r and tflops:
            r["mfu"] = r["model_flops_per_s"] / (tflops * 1e12)
    if "pairs_per_s" in rows.get("trl", {}):
        for name, r in rows.items():
            if name != "trl" and "pairs_per_s" in r:
                r["speedup_vs_trl"] = r["pairs_per_s"] / rows["trl"]["pairs_per_s"]
                r["gpu_memory_vs_trl"] = r["peak_gpu_mb"] / rows["trl"]["peak_gpu_mb"]
    keep = ("pairs_per_s", "tokens_per_s", "peak_gpu_mb", "mfu", "speedup_vs_trl", "gpu_memory_vs_trl",
            "padding_share", "pairs_per_step", "steps", "attn_implementation", "error")  # fmt: skip
    line = {
        "device": device, "peak_bf16_tflops": tflops, "torch": torch.__version__, "model": "internvl2_5_1b (random)",
        "pairs": PAIRS, "max_tokens_per_batch": BUDGET,
        "rows": {n: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k in keep} for n, r in rows.items()},
        "seconds": round(time.perf_counter() - start),
    }  # fmt: skip
    print(json.dumps(line))
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
