"""Build everything a training run needs from an ExperimentConfig, train, and write the outputs.

``build_trainer`` = ``prepare_run_dir`` (TrainingArguments, resume decision, output dir) +
``build_models`` (policy, freezing, LoRA, reference) + ``build_datasets`` (pairs, reference
cache) + the ``MPOTrainer``; ``run_training`` trains and writes the outputs.

Output directory layout (``training.output_dir``)::

    config.yaml           resolved configuration
    run_info.json         library versions, git commit, world size, dataset sizes
    metrics.jsonl         one JSON line per logging step (train and eval)
    data_skips.json       pairs read, skipped by reason, truncated (all workers and ranks, all resumes)
    checkpoint-N/         model, optimizer, scheduler, RNG, trainer_state.json, mpo_state.json (δ),
                          checkpoint_complete.json (written last; resume only picks complete ones)
    final/                HF-format model + tokenizer (InternVLForConditionalGeneration.from_pretrained)
    summary.json          final train/eval metrics and where the model is
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo.checkpoints import (
    COMPLETE_MARKER,
    RunDirLock,
    check_resume,
    list_checkpoints,
    prepare_output_dir,
    resolve_resume,
)
from mpo.config import ConfigError, ExperimentConfig, save_config
from mpo.distributed import is_main_process, launched_world_size, prepare_cpu_distributed, single_process_env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ["torch", "transformers", "deepspeed", "peft", "trl", "datasets", "accelerate"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "not installed"
    return out


def prepare_run_dir(cfg: ExperimentConfig):
    """TrainingArguments and the checkpoint to resume from (or None); the output dir made ready.

    Every refusal happens here, before any weights load and before any file changes: settings
    TrainingArguments rejects, an output dir that is not writable, meta files that cannot be read
    (all reported at once), another run holding the output dir, a resume that cannot be exact,
    a used output dir. Rank 0 holds the run-dir lock from here to the end of the run.
    """
    from transformers import TrainingArguments

    from mpo.observability import configure_loggers

    training = dict(cfg.training)
    resume_value = training.pop("resume_from_checkpoint", None)
    configure_loggers(training, cfg.extras, cfg.to_dict())
    if launched_world_size() > 1 and not training.get("deepspeed"):
        raise ConfigError(
            "several processes were launched but training.deepspeed is not set: multi-process training "
            "runs under DeepSpeed (e.g. training.deepspeed=configs/deepspeed/zero2.json)"
        )
    single_process_env(training)
    prepare_cpu_distributed(training)
    try:
        # Created before from_pretrained so that ZeRO-3 can partition the weights as they load.
        args = TrainingArguments(**training)
    except ValueError as exc:
        raise ConfigError(f"training: {exc}") from exc
    problems = preflight_problems(cfg, args.output_dir, args.should_save)
    if problems:
        raise ConfigError("cannot start:\n  - " + "\n  - ".join(problems))
    lock = RunDirLock(args.output_dir).acquire() if args.should_save else None
    try:
        resume = _choose_resume(resume_value, cfg, args)
        prepare_output_dir(args.output_dir, resume, cfg.extras.overwrite_output_dir, args.should_save)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if lock is not None and lock.note:
        print(lock.note, flush=True)
    return args, resume, lock


def preflight_problems(cfg: ExperimentConfig, output_dir: str, main: bool) -> list[str]:
    """Problems found without loading anything heavy: the output dir and the data's meta files."""
    from mpo.data.mmpr import DataError, read_meta

    problems = []
    if main:
        out = Path(output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            problems.append(f"training.output_dir {out} is not writable ({exc.strerror or exc})")
    for key, meta in (
        ("data.meta_path", cfg.data.meta_path),
        ("data.eval_meta_path", cfg.data.eval_meta_path),
    ):
        if meta:
            try:
                read_meta(meta)
            except DataError as exc:
                problems.append(f"{key}: {exc}")
    return problems


def _choose_resume(resume_value: Any, cfg: ExperimentConfig, args) -> str | None:
    """Resolve ``training.resume_from_checkpoint`` on rank 0 (verifying checkpoint files once, not
    on every rank), share the decision, and say it on rank 0."""
    import torch.distributed as dist

    decision: list[Any] = [None, [], None]
    if args.process_index == 0:
        try:
            resume, skipped = resolve_resume(resume_value, args.output_dir)
            decision = [resume, skipped, None]
        except ConfigError as exc:
            decision = [None, [], str(exc)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    resume, skipped, error = decision
    if error:
        raise ConfigError(error)
    if resume is None and resume_value in (True, "latest") and list_checkpoints(Path(args.output_dir)):
        # Asked to resume, and there are checkpoints, but none is usable: never start over
        # silently (overwrite_output_dir would delete them).
        why = (
            "; ".join(skipped)
            if skipped
            else f"none is complete (no {COMPLETE_MARKER}: their saves were interrupted)"
        )
        raise ConfigError(
            f"training.resume_from_checkpoint=latest: {args.output_dir} has checkpoints but none can be resumed "
            f"from: {why}. To start over, set training.resume_from_checkpoint=null and "
            "training.overwrite_output_dir=true"
        )
    if resume is not None:
        check_resume(resume, cfg, args)
    if args.process_index == 0:
        for problem in skipped:
            print(f"resume: passing over a newer checkpoint: {problem}", flush=True)
        if resume is not None:
            state = json.loads((Path(resume) / "trainer_state.json").read_text())
            print(f"resume: from {resume} (step {state.get('global_step')})", flush=True)
        elif resume_value in (True, "latest"):
            print(f"resume: no checkpoint in {args.output_dir} yet, starting fresh", flush=True)
    return resume


@dataclass
class Models:
    policy: Any  # InternVLForConditionalGeneration, or its peft wrapper
    reference: Any | None  # a frozen copy (reference=copy), else None


def build_models(cfg: ExperimentConfig, seed: int) -> Models:
    """Policy (drop path, frozen parts and LoRA applied) and, for ``reference=copy``, the reference."""
    from mpo.model.drop_path import apply_vision_drop_path
    from mpo.model.freeze import apply_freezing
    from mpo.model.loading import load_model

    m = cfg.model
    policy = load_model(m.path, m.torch_dtype, m.attn_implementation)
    apply_vision_drop_path(policy, m.vision_drop_path_rate)  # the policy only: the reference has none
    apply_freezing(policy, m)
    if m.lora:
        from transformers import set_seed

        from mpo.model.lora import apply_lora

        # LoRA's A matrices are drawn here, before the Trainer seeds anything: seed now, so the
        # same config gives the same adapters with or without DeepSpeed (whose set-up draws too).
        set_seed(seed)
        policy = apply_lora(policy, m.lora)
    reference = None
    if m.reference == "copy":
        reference = load_model(m.ref_path or m.path, m.torch_dtype, m.attn_implementation)
    return Models(policy, reference)


@dataclass
class Datasets:
    train_pairs: Any  # PairDataset: the data as read (lengths, counts, meta path)
    eval_pairs: Any | None
    train: Any  # what the Trainer reads: train_pairs, or it with cached reference log-probs
    eval: Any | None


PREFLIGHT_PAIRS = 8  # pairs encoded before any weights load, so bad data fails in seconds


def build_datasets(cfg: ExperimentConfig, tokenizer, vision) -> Datasets:
    """The training and held-out pairs (and the reference cache around them); a few pairs of each
    are encoded at once under the run's bad-sample policy, before any weights load."""
    from mpo.data.pairs import PairDataset

    d = cfg.data
    train_pairs = PairDataset(d.meta_path, tokenizer, vision, d, train=True)
    eval_pairs = PairDataset(d.eval_meta_path, tokenizer, vision, d) if d.eval_meta_path else None
    for ds in (train_pairs, eval_pairs):
        if ds is not None and len(ds):
            for i in sorted(
                {int(k * len(ds) / PREFLIGHT_PAIRS) for k in range(min(len(ds), PREFLIGHT_PAIRS))}
            ):
                ds[i]
    train, evaluation = train_pairs, eval_pairs
    if cfg.model.reference == "cache":
        # Reference log-probs come with each item; no reference model is loaded at all.
        from mpo.refcache import open_ref_cache

        ref_source = cfg.model.ref_path or cfg.model.path
        train = open_ref_cache(cfg.model.ref_cache, train_pairs, ref_source, cfg.model.torch_dtype)
        if eval_pairs is not None:
            evaluation = open_ref_cache(cfg.model.ref_cache, eval_pairs, ref_source, cfg.model.torch_dtype)
    return Datasets(train_pairs, eval_pairs, train, evaluation)


def build_trainer(cfg: ExperimentConfig, stop=None):
    """The ``MPOTrainer`` for ``cfg`` and the checkpoint it resumes from: ``(trainer, resume)``.

    Order: every check that needs no weights first (config, output dir, meta files, run-dir
    lock, resume choice, tokenizer and a few encoded pairs), then the models.

    Args:
        stop: a ``mpo.preemption.StopRequest`` whose signal stops training after a checkpoint.
    """
    from mpo.data.collate import PackedPairCollator, PairCollator
    from mpo.loss import MPOLoss
    from mpo.model.loading import check_model_path, load_tokenizer, load_vision_spec
    from mpo.observability import attach_observability
    from mpo.trainer import MPOTrainer

    check_model_path(cfg.model.path)
    args, resume, lock = prepare_run_dir(cfg)
    try:
        tokenizer = load_tokenizer(cfg.model.path)
        data = build_datasets(cfg, tokenizer, load_vision_spec(cfg.model.path))
        models = build_models(cfg, args.seed)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    lengths = None
    if cfg.data.packing:
        from mpo.sampler import packed_lengths

        lengths = lambda: packed_lengths(data.train_pairs)  # noqa: E731
    elif cfg.data.group_by_length:
        from mpo.sampler import pair_lengths

        lengths = lambda: pair_lengths(data.train_pairs)  # noqa: E731
    pad = tokenizer.pad_token_id
    trainer = MPOTrainer(
        model=models.policy,
        args=args,
        loss_fn=MPOLoss(cfg.loss),
        ref_model=models.reference,
        reference=cfg.model.reference,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=PackedPairCollator(pad) if cfg.data.packing else PairCollator(pad),
        processing_class=tokenizer,
        logprob_chunk_size=cfg.model.logprob_chunk_size,
        shared_prompt=cfg.model.shared_prompt or cfg.data.packing,
        train_lengths=lengths,
        max_bad_fraction=cfg.data.max_bad_fraction,
        max_tokens_per_batch=cfg.data.max_tokens_per_batch if cfg.data.packing else None,
        run_lock=lock,
    )
    if stop is not None:
        from mpo.preemption import GracefulStopCallback

        trainer.add_callback(GracefulStopCallback(stop))
    attach_observability(trainer, cfg)
    return trainer, resume


def run_training(cfg: ExperimentConfig, stop=None) -> dict[str, Any]:
    """Train per ``cfg``; returns the summary also written to ``summary.json``.

    Raises ``mpo.preemption.TrainingStopped`` when ``stop``'s signal ended training early (after
    a complete checkpoint was written).
    """
    trainer, resume = build_trainer(cfg, stop)
    try:
        return _train_and_write(trainer, cfg, resume, stop)
    finally:
        trainer.release_run_dir()


def _train_and_write(trainer, cfg: ExperimentConfig, resume: str | None, stop) -> dict[str, Any]:
    from mpo.data.events import skip_report, write_skip_report

    out_dir = Path(trainer.args.output_dir)
    main = trainer.args.should_save
    train, held_out = trainer.train_dataset, trainer.eval_dataset  # PairDataset or RefCachedDataset
    if main:
        from mpo.observability import startup_summary

        print(startup_summary(trainer, cfg), flush=True)
        save_config(cfg, out_dir)
        info = {
            "versions": _versions(),
            "git_commit": _git_commit(),
            "world_size": trainer.args.world_size,
            "train_pairs": train.source.counts(),
            "eval_pairs": held_out.source.counts() if held_out is not None else {},
            "resumed_from": resume,
        }
        (out_dir / "run_info.json").write_text(json.dumps(info, indent=1))
    if stop is not None and stop.signum is not None:
        from mpo.preemption import TrainingStopped

        raise TrainingStopped(
            f"{stop.name} before training started: nothing was trained or saved", stop.signum
        )
    # Read now: the checkpoint may be rotated away by the time training ends.
    start_step = (
        int(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]) if resume else 0
    )
    result = trainer.train(resume_from_checkpoint=resume)
    train_events = trainer.total_data_events("train")  # every rank, every worker, across resumes
    if main:
        report = skip_report(train.meta_path, len(train), cfg.data.max_bad_fraction, train_events)
        write_skip_report(out_dir, "data_skips.json", report)
    if stop is not None and stop.signum is not None:
        _stopped(trainer, stop)
    final_dir = out_dir / "final"
    trainer.save_model(str(final_dir))
    summary: dict[str, Any] = {
        "global_step": trainer.state.global_step,
        "train_loss": whole_run_loss(
            trainer.state.log_history, result.training_loss, start_step, trainer.state.global_step
        ),
        "bco_delta": trainer.loss_fn.delta,
        "final_model": str(final_dir),
        "skipped_train_samples": dict(train_events.skipped),
        "truncated_train_responses": dict(train_events.truncated),
    }
    if held_out is not None:
        # The Trainer may have just evaluated at the last step (eval_steps dividing max_steps).
        last = [
            h
            for h in trainer.state.log_history
            if "eval_loss" in h and h.get("step") == trainer.state.global_step
        ]
        metrics = last[-1] if last else trainer.evaluate()
        summary["eval"] = {k[5:]: v for k, v in metrics.items() if k.startswith("eval_")}
        eval_events = trainer.total_data_events("eval")
        if main:
            report = skip_report(held_out.meta_path, len(held_out), cfg.data.max_bad_fraction, eval_events)
            write_skip_report(out_dir, "data_skips_eval.json", report)
    if main:
        from mpo.model.export import write_export_metadata

        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        write_export_metadata(
            final_dir,
            cfg,
            summary,
            tokenizer=trainer.processing_class,
            config=trainer.accelerator.unwrap_model(trainer.model).config,
        )
    from mpo.observability import finish_loggers

    finish_loggers()
    return summary


def _stopped(trainer, stop) -> None:
    """Say where the stop's checkpoint is and how to resume; raise TrainingStopped."""
    from mpo.observability import finish_loggers
    from mpo.preemption import TrainingStopped

    step = trainer.state.global_step
    ckpt = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    finish_loggers()
    raise TrainingStopped(
        f"{stop.name}: stopped after step {step} with a complete checkpoint in {ckpt}. Resume with the same "
        "command plus training.resume_from_checkpoint=latest (same number of processes)",
        stop.signum,
    )


def whole_run_loss(log_history: list[dict], session_loss: float, start: int, global_step: int) -> float:
    """The mean training loss over every step of the run, resumes included.

    The Trainer's ``training_loss`` averages the steps of this session (from step ``start``)
    only; the steps before come from the restored log history (each logged ``loss`` is the mean
    of the steps since the previous log).
    """
    if start == 0:
        return session_loss
    total, steps, previous = 0.0, 0, 0
    for h in log_history:
        step = h.get("step", 0)
        if "loss" in h and "train_runtime" not in h and step <= start:
            total += h["loss"] * (step - previous)
            steps += step - previous
            previous = step
    if steps != start:  # the first part's logs do not cover its steps (logging_steps > 1 at the end)
        return session_loss
    return (total + session_loss * (global_step - start)) / max(global_step, 1)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"steps: {summary['global_step']}   train loss: {summary['train_loss']:.4f}   bco delta: {summary['bco_delta']:.4f}"
    ]
    ev = summary.get("eval")
    if ev:
        lines.append(
            "held-out: preference accuracy {acc:.3f}   reward margin {m:.3f}   loss {l:.4f}".format(
                acc=ev.get("rewards/accuracies", float("nan")),
                m=ev.get("rewards/margins", float("nan")),
                l=ev.get("loss", float("nan")),
            )
        )
    lines.append(f"final model: {summary['final_model']}")
    return "\n".join(lines)


def main_process() -> bool:
    return is_main_process() and os.environ.get("LOCAL_RANK", "0") == "0"
