"""The checkpoint-folder policy: which folders are checkpoints, which are complete, which to
resume from, which to rotate away, and what a resume may change.

A checkpoint is ``<output_dir>/checkpoint-N/`` written by ``MPOTrainer._save_checkpoint``: the
Trainer's files (weights or ZeRO shards, optimizer, scheduler, RNG, ``trainer_state.json``), our
``mpo_state.json`` (δ, data events, world size, ZeRO stage) and, written last after every file was
flushed to disk, ``checkpoint_complete.json``. A folder without that marker is an interrupted save:
it is never resumed from and never counted as the newest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mpo.config import ConfigError, ExperimentConfig
from mpo.distributed import deepspeed_stage

MPO_STATE_NAME = "mpo_state.json"
COMPLETE_MARKER = "checkpoint_complete.json"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every ``checkpoint-N`` folder, oldest first."""
    found = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit():
                found.append((int(p.name[11:]), p, (p / COMPLETE_MARKER).is_file()))
    return sorted(found)


def rotate_complete_checkpoints(run_dir: Path, limit: int | None) -> list[Path]:
    """Keep the newest ``limit`` complete checkpoints; drop older ones and stale incomplete ones.

    Never deletes the newest complete checkpoint, and never an incomplete folder newer than it
    (it may be a save still in progress on another process). Returns the deleted folders.
    """
    if not limit:
        return []
    ckpts = list_checkpoints(run_dir)
    complete = [c for c in ckpts if c[2]]
    if not complete:
        return []
    newest = complete[-1][0]
    keep = {c[0] for c in complete[-max(limit, 1) :]}
    deleted = []
    for step, path, _done in ckpts:
        if step in keep or step > newest:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Newest ``checkpoint-N`` folder of ``output_dir`` that carries the completion marker."""
    complete = [path for _, path, done in list_checkpoints(Path(output_dir)) if done]
    return str(complete[-1]) if complete else None


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders) to disk: the completion marker must
    not reach the disk before the weights and optimizer state do (a power cut, not just a kill)."""
    for path in sorted(folder.rglob("*")) + [folder]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems refuse fsync on folders
        finally:
            os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename, so a crash or a full disk never leaves a half-written file under ``path``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def setup_mismatch(checkpoint, state: dict, args) -> str | None:
    """Why ``checkpoint`` (its ``mpo_state.json`` as ``state``) cannot resume exactly under
    ``args``'s processes and ZeRO stage, or None. The data position (batches to skip per rank)
    and the stored optimizer partitions both depend on them."""
    saved_world = state.get("world_size", 1)
    if saved_world != args.world_size:
        return (
            f"{checkpoint} was written by {saved_world} process(es) but this run has {args.world_size}: "
            "relaunch with the original number."
        )
    stage = deepspeed_stage(args.deepspeed)
    if "zero_stage" in state and state["zero_stage"] != stage:
        name = lambda s: "no DeepSpeed" if s is None else f"ZeRO-{s}"  # noqa: E731
        return (
            f"{checkpoint} was written under {name(state['zero_stage'])} but this run uses {name(stage)}: "
            "its optimizer state is stored for that setup."
        )
    return None


def resolve_resume(value: Any, output_dir: str) -> str | None:
    """``latest`` -> newest complete checkpoint (None when there is none); a path must be complete."""
    if value in (None, False, ""):
        return None
    if value in (True, "latest"):
        return latest_complete_checkpoint(output_dir)
    path = Path(str(value))
    if not path.is_dir():
        raise ConfigError(f"training.resume_from_checkpoint: no such folder: {path}")
    if not (path / COMPLETE_MARKER).is_file():
        raise ConfigError(
            f"training.resume_from_checkpoint: {path} is incomplete (no {COMPLETE_MARKER}); a save was interrupted"
        )
    return str(path)


# Files and folders a run writes into its output_dir (what overwrite_output_dir deletes).
RUN_OUTPUTS = (
    "config.yaml",
    "run_info.json",
    "metrics.jsonl",
    "samples.jsonl",
    "summary.json",
    "data_skips.json",
    "data_skips_eval.json",
    "final",
    "report",
    "tensorboard",
)
STEP_LOGS = ("metrics.jsonl", "samples.jsonl")  # one JSON line per event, each with its "step"


def _checkpoints(out: Path) -> list[Path]:
    return [path for _, path, _ in list_checkpoints(out)]


def prepare_output_dir(out_dir: str, resume: str | None, overwrite: bool, is_main: bool) -> None:
    """Keep one run per output_dir, with one consistent history.

    A fresh run into a folder that holds another run's metrics or checkpoints is refused unless
    ``overwrite`` (then that run's outputs are deleted). A resume from step N moves the logged
    lines of steps after N (the interrupted run's, about to be redone) to ``<file>.before-resume-N``.
    """
    out = Path(out_dir)
    if resume is None:
        previous = [p.name for p in _checkpoints(out)] + [
            n for n in ("metrics.jsonl", "final") if (out / n).exists()
        ]
        if not previous:
            return
        if not overwrite:
            raise ConfigError(
                f"training.output_dir {out} already holds a run ({', '.join(previous[:4])}): resume it with "
                "training.resume_from_checkpoint=latest, pick another training.output_dir, or set "
                "training.overwrite_output_dir=true to delete its outputs and start over"
            )
        if is_main:
            for path in _checkpoints(out) + [out / n for n in RUN_OUTPUTS]:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        return
    state = json.loads((Path(resume) / "trainer_state.json").read_text())
    step = int(state["global_step"])
    if not is_main:
        return
    if (out / "config.yaml").is_file():  # the resumed run writes its own (check_resume allowed the changes)
        shutil.copy2(out / "config.yaml", out / f"config.yaml.before-resume-{step}")
    for name in STEP_LOGS:
        path = out / name
        if not path.is_file():
            continue
        keep, later = [], []
        for line in path.read_text().splitlines(keepends=True):
            try:
                record_step = json.loads(line).get("step", 0)
            except (json.JSONDecodeError, AttributeError):
                record_step = 0  # kept as it is: mpo report reports malformed lines
            (later if isinstance(record_step, int) and record_step > step else keep).append(line)
        if later:
            with open(out / f"{name}.before-resume-{step}", "a") as f:
                f.writelines(later)
            path.write_text("".join(keep))


# Settings a resume may change: they do not touch the data order, the optimizer or the loss.
RESUME_MAY_CHANGE = {
    "data.eval_meta_path",
    "model.ref_cache",
    "model.logprob_chunk_size",
    "training.deepspeed",  # its ZeRO stage is checked on its own
    "training.gradient_checkpointing",
    "training.max_steps",
    "training.num_train_epochs",
    "training.resume_from_checkpoint",
    "training.overwrite_output_dir",
    "training.report_to",
    "training.run_name",
    "training.run_tags",
    "training.disable_tqdm",
    "training.logging_steps",
    "training.logging_first_step",
    "training.save_steps",
    "training.save_strategy",
    "training.save_total_limit",
    "training.eval_steps",
    "training.eval_strategy",
    "training.per_device_eval_batch_size",
    "training.dataloader_num_workers",
    "training.dataloader_pin_memory",
    "training.dataloader_persistent_workers",
    "training.dataloader_prefetch_factor",
    "training.sample_steps",
    "training.sample_num_prompts",
    "training.sample_max_new_tokens",
}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("lora", "deepspeed"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume(resume: str, cfg: ExperimentConfig, args) -> None:
    """Refuse, before anything is written, a resume that could not continue the run exactly."""
    import yaml

    ckpt = Path(resume)
    restart = (
        "To go on with other settings, start a new run from its weights: `mpo consolidate "
        f"{ckpt} OUT`, then model.path=OUT (optimizer state and δ start fresh)."
    )
    state_path = ckpt / MPO_STATE_NAME
    if not state_path.is_file():
        raise ConfigError(
            f"training.resume_from_checkpoint: {ckpt} has no {MPO_STATE_NAME}; not an internvl-mpo checkpoint"
        )
    problem = setup_mismatch(ckpt, json.loads(state_path.read_text()), args)
    if problem:
        raise ConfigError(problem + " " + restart)
    has_optimizer = (ckpt / "optimizer.pt").is_file() or any(ckpt.glob("global_step*"))
    if not has_optimizer:
        raise ConfigError(
            f"{ckpt} holds no optimizer state (training.save_only_model=true?), so it cannot resume exactly. "
            + restart
        )
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    step = int(trainer_state.get("global_step", 0))
    target = (
        args.max_steps if args.max_steps and args.max_steps > 0 else int(trainer_state.get("max_steps") or 0)
    )
    if target and step >= target:
        raise ConfigError(
            f"{ckpt} is at step {step} of {target}: the run is already complete "
            "(its model is in final/, or `mpo consolidate` the checkpoint). Raise training.max_steps to train on."
        )
    saved = ckpt.parent / "config.yaml"
    if saved.is_file():
        before, now = _flat(yaml.safe_load(saved.read_text()) or {}), _flat(cfg.to_dict())
        # A key the saved config lacks (written by an older version) had its default then.
        defaults = _flat(ExperimentConfig().to_dict())
        before = {**{k: defaults[k] for k in now if k in defaults and k not in before}, **before}
        changed = sorted(
            k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE
        )
        if changed:
            diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
            raise ConfigError(
                f"resuming {ckpt} with changed settings that an exact resume cannot honour ({diffs}). "
                "Resume with the run's own config.yaml. " + restart
            )
