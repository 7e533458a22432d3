#!/usr/bin/env python
"""Fault injection matrix: interrupt real training runs, resume them, compare with uninterrupted ones.

    python scripts/faults.py [--out DIR] [--only SUBSTRING] [--seed N]

Rows:
- SIGKILL, SIGTERM and SIGINT at a random step (seeded) × no DeepSpeed / ZeRO-2 / ZeRO-3 × 1 and
  2 ranks (2 ranks need DeepSpeed). The signal goes to the whole process group, as a terminal's
  Ctrl-C or a scheduler does; then the run is resumed with ``resume_from_checkpoint=latest``.
- a full disk during a save (an ENOSPC injected into the optimizer-state write: a tmpfs cannot be
  mounted without privileges), then a resume;
- each corrupt-file case (truncated weights, empty optimizer state, garbage mpo_state.json, a
  missing file) in the newest checkpoint, then a resume with ``latest``.

Each row: the outcome (exit code and what the run said), the checkpoint the resume used, and
whether the resumed run's per-step loss and δ equal the uninterrupted run's (bit for bit: same
machine, same processes). Prints one JSON line per row and a markdown table at the end.
Runs the tiny demo model on CPU; about 20-30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEPS, SAVE_EVERY = 16, 4
SETUPS = [("none", 1), ("zero2", 1), ("zero2", 2), ("zero3", 1), ("zero3", 2)]
SIGNALS = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]


def command(model: Path, data: dict, out: Path, stage: str, ranks: int, *extra: str) -> list[str]:
    args = [
        "--config", str(ROOT / "configs" / "demo.yaml"), f"model.path={model}",
        f"data.meta_path={data['train']}", "data.eval_meta_path=null", f"training.output_dir={out}",
        f"training.max_steps={STEPS}", f"training.save_steps={SAVE_EVERY}", "training.eval_strategy=no",
        "training.sample_steps=0", "training.logging_steps=1", "training.disable_tqdm=true",
        f"training.per_device_train_batch_size={4 // ranks}", "training.learning_rate=1e-3", *extra,
    ]  # fmt: skip
    script = str(ROOT / "train" / "train_mpo.py")
    if stage == "none":
        return [sys.executable, script, *args, "training.use_cpu=true"]
    launcher = str(Path(sys.executable).parent / "deepspeed")
    ds = f"training.deepspeed={ROOT / 'configs' / 'deepspeed' / f'{stage}.json'}"
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args, ds]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps(out: Path) -> dict[int, tuple[float, float]]:
    path = out / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return {r["step"]: (r["loss"], r["bco/delta"]) for r in rows if "loss" in r and "train_runtime" not in r}


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


def compare(out: Path, baseline: dict) -> str:
    got = steps(out)
    if sorted(got) != sorted(baseline):
        return f"no: steps {sorted(got)[:3]}..{max(got, default=0)} logged"
    worst = max(max(abs(got[s][0] - baseline[s][0]), abs(got[s][1] - baseline[s][1])) for s in baseline)
    return "yes (bit for bit)" if worst == 0 else f"no: max difference {worst:.3g}"


def resumed_from(out: Path) -> str:
    info = out / "run_info.json"
    used = json.loads(info.read_text()).get("resumed_from") if info.is_file() else None
    return Path(used).name if used else "-"


def signal_case(cmd, env, out: Path, sig: int, at_step: int, baseline) -> dict:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and max(steps(out), default=0) < at_step:
        time.sleep(0.05)
    if proc.poll() is not None:
        _, err = proc.communicate()
        last = err.strip().splitlines()[-1][:120] if err.strip() else "-"
        return {
            "outcome": f"ended before the signal: exit {proc.returncode}",
            "checkpoint": "-",
            "equal": last,
        }
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=900)
    said = re.search(r"stopped after step (\d+)", err)
    outcome = (
        f"saved and stopped after step {said.group(1)} (exit {proc.returncode})"
        if said
        else f"exit {proc.returncode}"
    )
    done = run([*cmd, "training.resume_from_checkpoint=latest"], env)
    if done.returncode != 0:
        return {"outcome": outcome, "checkpoint": "-", "equal": f"resume failed: {done.stderr[-200:]}"}
    return {"outcome": outcome, "checkpoint": resumed_from(out), "equal": compare(out, baseline)}


CORRUPTIONS = {
    "truncated model.safetensors": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:1000]),
    "zero-byte optimizer.pt": lambda c: (c / "optimizer.pt").write_bytes(b""),
    "garbage mpo_state.json": lambda c: (c / "mpo_state.json").write_text("{garbage"),
    "missing scheduler.pt": lambda c: (c / "scheduler.pt").unlink(),
}  # fmt: skip


def corrupt_case(cmd, env, out: Path, name: str, baseline) -> dict:
    """A complete run, its newest checkpoint damaged, then ``latest``: the resume must pass over
    it to the one before and redo the last steps exactly as the uninterrupted run did."""
    first = run(cmd, env)
    assert first.returncode == 0, first.stderr[-2000:]
    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    CORRUPTIONS[name](newest)
    (out / "final").rename(out / "final-first")  # the redone steps write it again
    done = run([*cmd, "training.resume_from_checkpoint=latest"], env)
    passed = any("passing over" in ln for ln in done.stdout.splitlines())
    outcome = f"exit {done.returncode}" + (f": passed over {newest.name}" if passed else "")
    return {"outcome": outcome, "checkpoint": resumed_from(out), "equal": compare(out, baseline)}


def disk_full_case(model: Path, data: dict, out: Path, baseline) -> dict:
    """In-process: an ENOSPC injected into the step-8 optimizer write, then a resume."""
    import errno

    from mpo.checkpoints import CheckpointError
    from mpo.config import load_config
    from mpo.run import run_training
    from mpo.trainer import MPOTrainer

    cmd = command(model, data, out, "none", 1)
    cfg = load_config(cmd[3], cmd[4:])
    original = MPOTrainer._save_optimizer_and_scheduler

    def fail(self, output_dir):
        if self.state.global_step == 2 * SAVE_EVERY:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.pt"))
        return original(self, output_dir)

    MPOTrainer._save_optimizer_and_scheduler = fail
    try:
        run_training(cfg)
        outcome = "no error?"
    except CheckpointError as exc:
        outcome = "error: " + str(exc).split(" (")[0]
    finally:
        MPOTrainer._save_optimizer_and_scheduler = original
    done = run([*cmd, "training.resume_from_checkpoint=latest"], dict(os.environ))
    equal = compare(out, baseline) if done.returncode == 0 else f"resume failed: {done.stderr[-200:]}"
    return {"outcome": outcome[:90], "checkpoint": resumed_from(out), "equal": equal}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--only", default="", help="run the rows whose name contains this")
    p.add_argument("--seed", type=int, default=0, help="chooses the step each signal arrives at")
    a = p.parse_args()
    from mpo.demo import write_demo_data
    from mpo.model.tiny import save_tiny_internvl

    work = Path(a.out or tempfile.mkdtemp(prefix="mpo-faults-"))
    model, data = save_tiny_internvl(work / "model"), write_demo_data(work / "data", n_train=64, n_eval=8)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    rng = random.Random(a.seed)
    rows, baselines = [], {}
    for stage, ranks in SETUPS:
        setup = f"{stage if stage != 'none' else 'no DeepSpeed'}, {ranks} rank(s)"
        for sig in SIGNALS:
            name = f"{signal.Signals(sig).name} × {setup}"
            if a.only not in name:
                continue
            if (stage, ranks) not in baselines:
                base = work / f"base-{stage}-{ranks}"
                result = run(command(model, data, base, stage, ranks), env)
                assert result.returncode == 0, result.stderr[-2000:]
                baselines[(stage, ranks)] = steps(base)
            out = work / f"{stage}-{ranks}-{signal.Signals(sig).name}"
            at = rng.randint(SAVE_EVERY + 1, STEPS - 2)
            row = {
                "case": name,
                "at_step": at,
                **signal_case(
                    command(model, data, out, stage, ranks), env, out, sig, at, baselines[(stage, ranks)]
                ),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = baselines.get(("none", 1))
    if base is None and (not a.only or a.only in "disk full corrupt"):
        base_dir = work / "base-none-1"
        run(command(model, data, base_dir, "none", 1), env)
        base = steps(base_dir)
    if a.only in "disk full during a save":
        row = {"case": "disk full during a save", **disk_full_case(model, data, work / "diskfull", base)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for name in CORRUPTIONS:
        if a.only in name:
            out = work / f"corrupt-{name.split()[-1]}"
            row = {"case": name, **corrupt_case(command(model, data, out, "none", 1), env, out, name, base)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| case | outcome | checkpoint used | resumed run = uninterrupted |\n| --- | --- | --- | --- |")
    for r in rows:
        case = r["case"] + (f" (at step {r['at_step']})" if "at_step" in r else "")
        print(f"| {case} | {r['outcome']} | {r['checkpoint']} | {r['equal']} |")


if __name__ == "__main__":
    main()
