"""The checkpoint-folder policy: which folders are checkpoints, which are complete, which to
resume from, which to rotate away, and what a resume may change.

A checkpoint is ``<output_dir>/checkpoint-N/`` written by ``MPOTrainer._save_checkpoint``: the
Trainer's files (weights or ZeRO shards, optimizer, scheduler, RNG, ``trainer_state.json``), our
``mpo_state.json`` (δ, data events, world size, ZeRO stage) and, written last after every file was
flushed to disk, ``checkpoint_complete.json`` with the size and sha256 of every file. A folder
without that marker is an interrupted save: it is never resumed from and never counted as the
newest. A checkpoint whose files no longer match the marker (truncated, emptied, overwritten) is
refused naming the file; ``resume_from_checkpoint=latest`` then falls back to the newest one that
verifies and says so.

The run directory is held by one run at a time: ``RunDirLock`` (a lock file naming host and pid).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mpo.config import ConfigError, ExperimentConfig
from mpo.distributed import deepspeed_stage
from mpo.files import sha256_file, write_atomic

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


# ---- integrity ---------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (disk full) or read back (corrupt)."""


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint but its completion marker, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)


def file_digests(folder: Path, threads: int = 8) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of every checkpoint file (hashed in threads:
    hashlib releases the GIL, so large files hash in parallel)."""
    files = checkpoint_files(folder)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = list(pool.map(sha256_file, files))
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)
    }


def write_complete_marker(folder: Path, step: int) -> None:
    """Written last, after every file is on disk: the checkpoint is complete and these are its files."""
    marker = {"step": step, "time": time.time(), "files": file_digests(folder)}
    write_atomic(folder / COMPLETE_MARKER, json.dumps(marker))


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder (naming the file), or None when it verifies.

    Checked: the completion marker exists and parses; every file it lists exists with its size
    and sha256; our JSON state files parse. Markers written before sizes and digests were
    recorded only get the existence and JSON checks.
    """
    folder = Path(folder)
    marker_path = folder / COMPLETE_MARKER
    if not marker_path.is_file():
        return f"{folder} is incomplete (no {COMPLETE_MARKER}): its save was interrupted"
    try:
        marker = json.loads(marker_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{marker_path} is not valid JSON ({exc})"
    for rel, want in (marker.get("files") or {}).items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing (listed in {COMPLETE_MARKER})"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} is {size} bytes, {want['bytes']} when it was saved (truncated or overwritten)"
        if sha256_file(path) != want["sha256"]:
            return f"{path} does not match the checksum recorded when it was saved (corrupted)"
    for name in (MPO_STATE_NAME, "trainer_state.json"):
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"{path} is not valid JSON ({exc})"
    return None


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write was the disk filling up: ENOSPC, or torch.save's zip writer
    failing ("unexpected pos ...", which is how a full disk shows there) with little space left."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    if "No space left on device" in text:
        return True
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        return False
    return "unexpected pos" in text or free < 64 * 1024**2


def resolve_resume(value: Any, output_dir: str) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from and what was passed over on the way.

    ``latest``: the newest complete checkpoint that verifies; newer ones that do not are
    reported (``skipped``) and left in place. A path: it must verify, else ConfigError naming the
    file and what is wrong. None/False: a fresh run.
    """
    if value in (None, False, ""):
        return None, []
    if value in (True, "latest"):
        skipped = []
        for _step, path, done in reversed(list_checkpoints(Path(output_dir))):
            if not done:
                continue
            problem = checkpoint_problem(path)
            if problem is None:
                return str(path), skipped
            skipped.append(problem)
        return None, skipped
    path = Path(str(value))
    if not path.is_dir():
        raise ConfigError(f"training.resume_from_checkpoint: no such folder: {path}")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"training.resume_from_checkpoint: {problem}")
    return str(path), []


# ---- one run per output directory ----------------------------------------------------------------
LOCK_NAME = ".mpo-run.lock"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: /proc/<pid>/stat field 22), to tell a live run
    from a new process that reused its pid; None where /proc is unavailable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return start is None or _process_start(pid) in (None, start)


class RunDirLock:
    """Holds ``<output_dir>/.mpo-run.lock`` for the life of a run (rank 0), so a second run into
    the same folder is refused, also one with ``overwrite_output_dir=true``, before it changes any
    file. A lock left by a run that died on this host (its pid is gone, or reused) is stale and
    taken over, with a note; a lock held from another host cannot be checked from here and is
    named in the error with how to remove it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False
        self.note: str | None = None  # what happened to a stale lock, for the start-up log

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        for _attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ConfigError(f"training.output_dir {self.path.parent}: could not take {self.path}")

    def _refuse_or_clear(self) -> None:
        try:
            other = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            other = {}
        host, pid = other.get("host"), other.get("pid")
        where = f"pid {pid} on host {host}, since {other.get('since', '?')}"
        if host == socket.gethostname() and pid == os.getpid():
            self.path.unlink(missing_ok=True)  # ours: this process built a trainer here before
            return
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid, other.get("start")):
            self.note = f"took over {self.path}: the run that held it ({where}) is gone"
            self.path.unlink(missing_ok=True)
            return
        if host == socket.gethostname() or not host:
            raise ConfigError(
                f"training.output_dir {self.path.parent} is in use by another run ({where}): wait for it, "
                "or choose another training.output_dir"
            )
        raise ConfigError(
            f"training.output_dir {self.path.parent} is held by a run on another host ({where}), which "
            f"cannot be checked from here: if that run is gone, delete {self.path}"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


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
