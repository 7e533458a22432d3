"""Runs that survive real clusters: all-skipped batches, signals, two writers, failing before the
weights load, corrupt checkpoints, and saying what happened."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import StopAfter, _train_logs  # tests/ is on sys.path under pytest
from tolerances import assert_same_training

from mpo.checkpoints import COMPLETE_MARKER, LOCK_NAME, CheckpointError, RunDirLock
from mpo.config import ConfigError
from mpo.run import build_trainer, run_training

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    sys.executable,
    str(ROOT / "train" / "train_mpo.py"),
    "--config",
    str(ROOT / "configs" / "demo.yaml"),
]


def _with_bad_lines(demo_data, tmp_path, bad_at: tuple[int, ...], n: int = 12) -> Path:
    """``n`` demo pairs where the lines at ``bad_at`` (0-based) name a missing image."""
    demo_meta = Path(demo_data["train"])
    spec = next(iter(json.loads(demo_meta.read_text()).values()))
    root = (demo_meta.parent / spec["root"]).resolve()
    lines = [json.loads(x) for x in (root / spec["annotation"]).read_text().splitlines()[:n]]
    for i in bad_at:
        lines[i]["image"] = "images/missing.png"
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    meta = tmp_path / "bad.json"
    meta.write_text(json.dumps({"bad": {"root": str(root), "annotation": str(tmp_path / "bad.jsonl")}}))
    return meta


# ---- 1. every pair of a micro-batch (or of a whole step) skipped -------------------------------------
def test_all_skipped_micro_batches_train_on_with_exact_normalisation(tiny_config, demo_data, tmp_path):
    """Batch 1: each bad line empties a whole micro-batch; with 4 accumulation steps, lines 0-3
    empty step 1 entirely. Batch 1 × 4 accumulation and batch 4 × 1 train the same global batches,
    so their per-step losses agree up to rounding (tests/tolerances.py) whatever was skipped. SGD:
    its update is the gradient itself, so a wrong normalisation at step 2 shows in step 3's loss,
    while Adam's first update is sign(gradient), which turns rounding of near-zero entries into
    whole learning-rate steps. The BCO term is off: δ is updated after every micro-batch (TRL's
    semantics, also the official run's), so with 4 micro-batches a step's later pairs see a δ
    that already holds its earlier pairs' rewards, which one micro-batch of 4 does not."""
    meta = _with_bad_lines(demo_data, tmp_path, bad_at=(0, 1, 2, 3, 5, 10))
    common = [
        f"data.meta_path={meta}", "data.eval_meta_path=null", "data.on_bad_sample=skip",
        "data.max_bad_fraction=0.6", "training.max_steps=3", "training.save_strategy=no",
        "training.train_sampling_strategy=sequential", "training.optim=sgd", "training.learning_rate=0.1",
        "loss.quality_weight=0",
    ]  # fmt: skip
    runs = {}
    for micro, accum in ((1, 4), (4, 1)):
        out = tmp_path / f"{micro}x{accum}"
        summary = run_training(
            tiny_config(*common, f"training.per_device_train_batch_size={micro}",
                        f"training.gradient_accumulation_steps={accum}", f"training.output_dir={out}")
        )  # fmt: skip
        assert summary["skipped_train_samples"] == {"missing_image": 6}
        runs[(micro, accum)] = _train_logs(out)
    a, b = runs[(1, 4)], runs[(4, 1)]
    assert sorted(a) == [1, 2, 3] and "loss/dpo" not in a[1]  # step 1 had no pair at all
    assert a[1]["loss"] == 0.0 and a[1]["bco/num_rewards"] == 0
    assert_same_training({s: a[s] for s in (2, 3)}, {s: b[s] for s in (2, 3)})


# ---- 2. graceful stop ------------------------------------------------------------------------------
def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip()), default=0)


STEPS = 20


@pytest.fixture(scope="module")
def signal_run(tiny_model_dir, demo_data, tmp_path_factory):
    """The arguments of a 20-step run and its uninterrupted result."""
    common = [
        f"model.path={tiny_model_dir}", f"data.meta_path={demo_data['train']}", "data.eval_meta_path=null",
        f"training.max_steps={STEPS}", "training.per_device_train_batch_size=2", "training.learning_rate=1e-3",
        "training.save_steps=1000", "training.eval_strategy=no", "training.sample_steps=0",
        "training.disable_tqdm=true", "training.dataloader_num_workers=2", "training.logging_steps=1",
    ]  # fmt: skip
    full = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run([*TRAIN, *common, f"training.output_dir={full}"], check=True, capture_output=True)
    return common, full


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_resume_equals_the_uninterrupted_run(signal_run, tmp_path, sig):
    common, full_dir = signal_run
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "stopped"
    proc = subprocess.Popen([*TRAIN, *common, f"training.output_dir={run}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while _steps_logged(run) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]
    stopped_at = _steps_logged(run)
    assert 4 <= stopped_at < STEPS
    ckpt = run / f"checkpoint-{stopped_at}"
    assert (ckpt / COMPLETE_MARKER).is_file() and not (run / "final").exists()
    assert f"stopped after step {stopped_at} with a complete checkpoint in {ckpt}" in err
    assert "Traceback" not in err and "resume_from_checkpoint=latest" in err
    done = subprocess.run([*TRAIN, *common, f"training.output_dir={run}", "training.resume_from_checkpoint=latest"],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resume: from {ckpt} (step {stopped_at})" in done.stdout
    full, resumed = _train_logs(full_dir), _train_logs(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(stopped_at + 1, STEPS + 1):  # the same machine and order: bit for bit
        assert resumed[step]["loss"] == full[step]["loss"], step
        assert resumed[step]["bco/delta"] == full[step]["bco/delta"], step
    # summary.json covers the whole run, not the resumed part only.
    whole = json.loads((full_dir / "summary.json").read_text())["train_loss"]
    assert json.loads((run / "summary.json").read_text())["train_loss"] == pytest.approx(whole, rel=1e-6)


def test_a_second_signal_aborts_but_a_forwarded_copy_does_not(monkeypatch):
    from mpo import preemption

    clock = [100.0]
    exits = []
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(preemption.os, "_exit", lambda code: exits.append(code))
    request = preemption.StopRequest()
    request._handle(signal.SIGINT, None)
    assert request.signum == signal.SIGINT and request.agreed(torch.device("cpu"))
    clock[0] += 0.5
    request._handle(signal.SIGTERM, None)  # the launcher forwarding Ctrl-C: the same request
    assert exits == []
    clock[0] += 5
    request._handle(signal.SIGTERM, None)  # a real second signal
    assert exits == [128 + signal.SIGTERM]
    assert not preemption.StopRequest().agreed(torch.device("cpu"))


# ---- 3. one run per output directory -----------------------------------------------------------------
HOLD = "import sys, time; from mpo.checkpoints import RunDirLock; RunDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tiny_config, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(f"training.output_dir={out}", "training.max_steps=2")
    run_training(cfg)
    before = sorted(p.name for p in out.rglob("*"))
    assert LOCK_NAME not in before  # released at the end of the run
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["training.overwrite_output_dir=true"], ["training.resume_from_checkpoint=latest"]):
            with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {holder.pid} on host"):
                build_trainer(tiny_config(f"training.output_dir={out}", "training.max_steps=4", *extra))
        assert sorted(p.name for p in out.rglob("*") if p.name != LOCK_NAME) == before  # nothing deleted
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and taken over.
    trainer, _ = build_trainer(
        tiny_config(f"training.output_dir={out}", "training.overwrite_output_dir=true")
    )
    assert trainer.run_lock.note and "is gone" in trainer.run_lock.note
    trainer.release_run_dir()
    assert not (out / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_named_with_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "since": "yesterday"}))
    with pytest.raises(
        ConfigError, match=r"held by a run on another host \(pid 4242 on host gpu-node-7.*delete"
    ):
        RunDirLock(tmp_path).acquire()


# ---- 4. failing before any weights load -------------------------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model fails the test: everything checked here must fail before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the problem was reported")

    monkeypatch.setattr("mpo.model.loading.load_model", refuse)


def test_config_problems_are_reported_at_once_without_a_traceback(
    tiny_model_dir, demo_data, tmp_path, capsys
):
    from mpo.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tiny_model_dir}\ndata:\n  meta_path: {demo_data['train']}\n")
    bad = ["training.learning_rate=-0.5", "training.per_device_train_batch_size=0",
           "training.gradient_accumulation_steps=0", "training.max_steps=0"]  # fmt: skip
    assert main(["train", "--config", str(cfg), *bad]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines) and "Traceback" not in err
    for part in ("learning_rate must be >= 0", "per_device_train_batch_size must be >= 1",
                 "gradient_accumulation_steps must be >= 1", "max_steps=0 trains nothing"):  # fmt: skip
        assert any(part in line for line in lines), part


def test_meta_output_dir_and_data_problems_fail_before_weights(
    tiny_config, demo_data, tmp_path, no_weights, capsys
):
    from mpo.cli import main

    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"d": {"root": 5, "annotation": "x.jsonl"}}))
    (tmp_path / "x.jsonl").write_text("{}\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tiny_config().model.path}\ndata:\n  meta_path: {meta}\n")
    assert main(["train", "--config", str(cfg), f"training.output_dir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "training.output_dir" in err and "is not writable" in err  # both problems, one report
    assert "field 'root' must be a string, got 5 (int)" in err
    # A bad first line under on_bad_sample=error: found while a few pairs are encoded, pre-weights.
    bad = _with_bad_lines(demo_data, tmp_path, bad_at=(0,))
    with pytest.raises(Exception, match=r"bad.jsonl:1: field 'image': image not found"):
        build_trainer(tiny_config(f"data.meta_path={bad}", "data.on_bad_sample=error"))


def test_a_mistyped_hub_id_fails_in_seconds_offline(tmp_path, capsys, monkeypatch):
    from mpo.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  path: OpenGVLab/InternVL2_5-1B-MPO-typo\ndata:\n  meta_path: m.jsonl\n")
    start = time.monotonic()
    assert main(["train", "--config", str(cfg)]) == 2
    assert time.monotonic() - start < 30  # not the minute of retries (a generous bound: no timing claim)
    assert "not in the local Hugging Face cache (HF_HUB_OFFLINE is set)" in capsys.readouterr().err


# ---- 5. corrupt checkpoints ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:1000]),
         r"model.safetensors is 1000 bytes, \d+ when it was saved"),
        (lambda c: (c / "optimizer.pt").write_bytes(b""), r"optimizer.pt is 0 bytes"),
        (lambda c: (c / "mpo_state.json").write_text("{not json"), r"mpo_state.json is \d+ bytes|mpo_state.json does not match"),
        (lambda c: (c / "scheduler.pt").write_bytes(b"x" * (c / "scheduler.pt").stat().st_size),
         r"scheduler.pt does not match the checksum"),
    ],
    ids=["truncated-weights", "empty-optimizer", "garbage-state", "same-size-garbage"],
)  # fmt: skip
def test_corrupt_checkpoints_are_named_and_latest_falls_back(tiny_config, tmp_path, capsys, damage, message):
    cfg = tiny_config("training.max_steps=4")
    run_dir = Path(cfg.training["output_dir"])
    run_training(cfg)
    damage(run_dir / "checkpoint-4")
    with pytest.raises(ConfigError, match=message):
        build_trainer(
            tiny_config("training.max_steps=6", f"training.resume_from_checkpoint={run_dir / 'checkpoint-4'}")
        )
    trainer, resume = build_trainer(
        tiny_config("training.max_steps=6", "training.resume_from_checkpoint=latest")
    )
    out = capsys.readouterr().out
    assert resume.endswith("checkpoint-2") and "passing over a newer checkpoint" in out
    assert f"resume: from {run_dir / 'checkpoint-2'} (step 2)" in out
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == 6


def test_a_full_disk_during_a_save_says_so_and_the_partial_checkpoint_is_never_used(tiny_config, monkeypatch):
    from mpo.trainer import MPOTrainer

    cfg = tiny_config("training.max_steps=6")
    run_dir = Path(cfg.training["output_dir"])
    original = MPOTrainer._save_optimizer_and_scheduler

    def disk_full_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.pt"))
        return original(self, output_dir)

    monkeypatch.setattr(MPOTrainer, "_save_optimizer_and_scheduler", disk_full_at_step_4)
    with pytest.raises(
        CheckpointError, match=rf"No space left on device while writing {run_dir / 'checkpoint-4'}"
    ):
        run_training(cfg)
    monkeypatch.setattr(MPOTrainer, "_save_optimizer_and_scheduler", original)
    assert not (run_dir / "checkpoint-4" / COMPLETE_MARKER).exists()
    _, resume = build_trainer(tiny_config("training.max_steps=6", "training.resume_from_checkpoint=latest"))
    assert resume.endswith("checkpoint-2")


# ---- 6. saying what happened -------------------------------------------------------------------------
def test_latest_without_a_checkpoint_says_it_starts_fresh(tiny_config, capsys):
    build_trainer(tiny_config("training.resume_from_checkpoint=latest"))
    assert "resume: no checkpoint in" in capsys.readouterr().out


def test_summary_loss_after_a_resume_covers_the_whole_run(tiny_config, tmp_path):
    """Also when the checkpoint resumed from is rotated away before the run ends (limit 1)."""
    whole = run_training(tiny_config("training.max_steps=6", f"training.output_dir={tmp_path / 'a'}"))
    common = ["training.max_steps=6", "training.save_total_limit=1", f"training.output_dir={tmp_path / 'b'}"]
    part, _ = build_trainer(tiny_config(*common))
    part.add_callback(StopAfter(2))
    part.train()
    resumed = run_training(tiny_config(*common, "training.resume_from_checkpoint=latest"))
    assert not (tmp_path / "b" / "checkpoint-2").exists()  # rotated away during the resumed run
    logs = _train_logs(tmp_path / "a")
    assert whole["train_loss"] == pytest.approx(sum(logs[s]["loss"] for s in range(1, 7)) / 6, rel=1e-6)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)


def test_data_check_needs_no_consistent_training_section(tiny_model_dir, demo_data, tmp_path, capsys):
    from mpo.cli import main

    cfg = tmp_path / "c.yaml"  # eval every 10 steps, but no held-out data: training would refuse it
    cfg.write_text(
        f"model:\n  path: {tiny_model_dir}\ndata:\n  meta_path: {demo_data['train']}\n"
        "training:\n  eval_strategy: steps\n  eval_steps: 10\n"
    )
    assert main(["data", "check", "--config", str(cfg)]) == 0
    assert "OK" in capsys.readouterr().out


def test_symlinks_out_of_the_root_are_refused_unless_allowed(tmp_path, tokenizer):
    from PIL import Image

    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec

    outside, root = tmp_path / "outside", tmp_path / "root"
    outside.mkdir()
    root.mkdir()
    Image.new("RGB", (28, 28)).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "d.jsonl").write_text(
        json.dumps({"image": "link.png", "question": "q", "chosen": "a", "rejected": "b"}) + "\n"
    )
    vision = VisionSpec(28, 2)
    with pytest.raises(
        Exception, match=r"d.jsonl:1: field 'image': path 'link.png' is a symlink to .*secret.png, outside"
    ):
        PairDataset(root / "d.jsonl", tokenizer, vision, DataConfig())[0]
    pair, _ = PairDataset(root / "d.jsonl", tokenizer, vision, DataConfig(follow_symlinks_outside_root=True))[
        0
    ]
    assert pair["num_tiles"] == [1]


def test_a_null_field_is_a_type_error_not_a_missing_one(tmp_path, tokenizer):
    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec

    (tmp_path / "d.jsonl").write_text(json.dumps({"question": None, "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(Exception, match=r"d.jsonl:1: field 'question' must be a string, got null"):
        PairDataset(tmp_path / "d.jsonl", tokenizer, VisionSpec(28, 2), DataConfig())[0]
