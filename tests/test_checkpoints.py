"""Checkpoints never lose work: interrupted saves are skipped on resume; rotation keeps the newest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpo.checkpoints import (
    COMPLETE_MARKER,
    latest_complete_checkpoint,
    resolve_resume,
    rotate_complete_checkpoints,
    write_complete_marker,
)
from mpo.run import build_trainer, run_training
from mpo.trainer import MPOTrainer

ROOT = Path(__file__).resolve().parents[1]


def _fake_ckpt(run: Path, step: int, complete: bool) -> Path:
    p = run / f"checkpoint-{step}"
    p.mkdir(parents=True)
    if complete:
        (p / COMPLETE_MARKER).write_text("{}")
    return p


def test_rotation_keeps_newest_complete_and_in_progress(tmp_path):
    for step, done in ((2, True), (4, True), (6, False), (8, True), (10, False)):
        _fake_ckpt(tmp_path, step, done)
    deleted = rotate_complete_checkpoints(tmp_path, 1)
    left = sorted(p.name for p in tmp_path.iterdir())
    # 8 is the newest complete; 10 may still be being written; 2, 4 and the stale 6 go.
    assert left == ["checkpoint-10", "checkpoint-8"]
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert latest_complete_checkpoint(tmp_path).endswith("checkpoint-8")


def test_resume_refuses_incomplete_checkpoint(tmp_path):
    p = _fake_ckpt(tmp_path, 3, complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume(str(p), str(tmp_path))
    assert resolve_resume("latest", str(tmp_path)) == (None, [])


class SaveCrash(RuntimeError):
    pass


def test_interrupted_save_resumes_from_previous_complete(tiny_config, monkeypatch):
    cfg = tiny_config("training.max_steps=6")
    run_dir = Path(cfg.training["output_dir"])
    original = MPOTrainer._save_optimizer_and_scheduler

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise SaveCrash("power cut while writing the optimizer state")
        return original(self, output_dir)

    monkeypatch.setattr(MPOTrainer, "_save_optimizer_and_scheduler", crash_at_step_4)
    with pytest.raises(SaveCrash):
        run_training(cfg)
    assert (run_dir / "checkpoint-4").is_dir() and not (run_dir / "checkpoint-4" / COMPLETE_MARKER).exists()
    monkeypatch.setattr(MPOTrainer, "_save_optimizer_and_scheduler", original)

    resumed = tiny_config("training.max_steps=6", "training.resume_from_checkpoint=latest")
    trainer, resume = build_trainer(resumed)
    assert resume.endswith("checkpoint-2")
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == 6
    assert (run_dir / "checkpoint-6" / COMPLETE_MARKER).is_file()


def _losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "train_runtime" not in r:
            out[r["step"]] = (r["loss"], r["bco/delta"])  # a re-run step overwrites the killed run's
    return out


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_uninterrupted(tiny_model_dir, demo_data, tmp_path):
    common = [
        f"model.path={tiny_model_dir}",
        f"data.meta_path={demo_data['train']}",
        "data.eval_meta_path=null",
        "training.max_steps=24",
        "training.per_device_train_batch_size=2",
        "training.learning_rate=1e-3",
        "training.logging_steps=1",
        "training.save_steps=4",
        "training.use_cpu=true",
        "training.disable_tqdm=true",
        "training.eval_strategy=no",
    ]
    cmd = [
        sys.executable,
        str(ROOT / "train" / "train_mpo.py"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(
        cmd + common + [f"training.output_dir={tmp_path / 'full'}"], check=True, env=env, capture_output=True
    )

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(
        cmd + common + [f"training.output_dir={crashed}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (crashed / "checkpoint-8" / COMPLETE_MARKER).exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(_losses(crashed))
    assert killed_at < 24

    subprocess.run(
        cmd + common + [f"training.output_dir={crashed}", "training.resume_from_checkpoint=latest"],
        check=True,
        env=env,
        capture_output=True,
    )
    full, resumed = _losses(tmp_path / "full"), _losses(crashed)
    # The resume point: the newest checkpoint that was complete when the run was killed.
    start = int(Path(json.loads((crashed / "run_info.json").read_text())["resumed_from"]).name.split("-")[1])
    assert 8 <= start <= killed_at and start % 4 == 0
    assert sorted(resumed) == list(range(1, 25))
    # The killed run's steps after the resume point were set aside and logged again.
    aside = crashed / f"metrics.jsonl.before-resume-{start}"
    redone = {json.loads(x)["step"] for x in aside.read_text().splitlines()} if aside.exists() else set()
    assert redone == set(range(start + 1, killed_at + 1))
    for step in range(9, 25):
        assert resumed[step] == full[step], step  # same machine and processes: bit for bit


def test_fresh_run_into_a_used_output_dir(tiny_config):
    """One run per output_dir: refused without overwrite_output_dir; with it, only run outputs go."""
    from mpo.config import ConfigError

    cfg = tiny_config("training.max_steps=2")
    run_dir = Path(cfg.training["output_dir"])
    run_training(cfg)
    assert (run_dir / "checkpoint-2").is_dir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a run .*overwrite_output_dir=true"):
        build_trainer(tiny_config("training.max_steps=2"))
    run_training(tiny_config("training.max_steps=1", "training.overwrite_output_dir=true"))
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(steps) == {1} and not (run_dir / "checkpoint-2").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_resume_moves_the_redone_steps_out_of_the_logs(tiny_config):
    """After a resume from step 2, metrics.jsonl is one history: the killed run's steps 3-4 are
    kept aside in metrics.jsonl.before-resume-2 and logged again by the resumed run."""
    from mpo.checkpoints import prepare_output_dir

    cfg = tiny_config("training.max_steps=4")
    run_dir = Path(cfg.training["output_dir"])
    run_training(cfg)
    before = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    prepare_output_dir(str(run_dir), str(run_dir / "checkpoint-2"), overwrite=False, is_main=True)
    kept = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    aside = [json.loads(x) for x in (run_dir / "metrics.jsonl.before-resume-2").read_text().splitlines()]
    assert kept == [r for r in before if r["step"] <= 2] and kept
    assert aside == [r for r in before if r["step"] > 2] and aside


def test_resumes_that_cannot_be_exact_are_refused_before_anything_changes(tiny_config):
    from mpo.config import ConfigError

    cfg = tiny_config("training.max_steps=4")
    run_dir = Path(cfg.training["output_dir"])
    run_training(cfg)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    def refused(match: str, *overrides: str) -> None:
        with pytest.raises(ConfigError, match=match):
            build_trainer(tiny_config("training.resume_from_checkpoint=latest", *overrides))
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before

    # A finished run relaunched (a requeued job): nothing to do, and nothing is trained.
    refused(r"checkpoint-4 is at step 4 of 4: the run is already complete", "training.max_steps=4")
    # A setting the checkpoint's optimizer / data position / δ depend on.
    refused(r"training.learning_rate: 0.001 -> 0.002", "training.max_steps=6", "training.learning_rate=2e-3")
    refused(r"loss.beta: 0.1 -> 0.2", "training.max_steps=6", "loss.beta=0.2")
    state_path = run_dir / "checkpoint-4" / "mpo_state.json"
    state = json.loads(state_path.read_text())
    ckpt = run_dir / "checkpoint-4"

    def rewrite(**changes) -> None:
        """As if the checkpoint had been written so (the marker's checksums match its files)."""
        state_path.write_text(json.dumps({**state, **changes}))
        write_complete_marker(ckpt, 4)

    rewrite(world_size=2)
    refused(r"written by 2 process\(es\) but this run has 1", "training.max_steps=6")
    rewrite(zero_stage=2)
    refused(r"written under ZeRO-2 but this run uses no DeepSpeed", "training.max_steps=6")
    rewrite()
    (ckpt / "optimizer.pt").rename(run_dir / "optimizer.pt.aside")
    write_complete_marker(ckpt, 4)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    refused(r"holds no optimizer state", "training.max_steps=6")
    (run_dir / "optimizer.pt.aside").rename(ckpt / "optimizer.pt")
    write_complete_marker(ckpt, 4)

    # Settings that do not touch the optimizer, data order or loss may change.
    trainer, resume = build_trainer(
        tiny_config(
            "training.resume_from_checkpoint=latest", "training.max_steps=6", "training.logging_steps=2"
        )
    )
    assert resume.endswith("checkpoint-4")
    assert (run_dir / "config.yaml.before-resume-4").is_file()


def test_latest_with_only_interrupted_checkpoints_never_starts_over(tiny_config):
    from mpo.config import ConfigError

    cfg = tiny_config("training.max_steps=2", "training.overwrite_output_dir=true")
    run_dir = Path(cfg.training["output_dir"])
    run_training(cfg)
    (run_dir / "checkpoint-2" / COMPLETE_MARKER).unlink()  # as if its save had been interrupted
    with pytest.raises(ConfigError, match="has checkpoints but none can be resumed from: none is complete"):
        build_trainer(
            tiny_config("training.resume_from_checkpoint=latest", "training.overwrite_output_dir=true")
        )
    assert (run_dir / "checkpoint-2").is_dir() and (run_dir / "metrics.jsonl").is_file()


def test_load_best_model_at_end_is_refused(tiny_config):
    from mpo.config import ConfigError

    with pytest.raises(ConfigError, match="load_best_model_at_end is not supported"):
        tiny_config("training.load_best_model_at_end=true")
