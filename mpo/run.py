"""Build everything a training run needs from an ExperimentConfig, train, and write the outputs.

Output directory layout (``training.output_dir``)::

    config.yaml           resolved configuration
    run_info.json         library versions, git commit, world size, dataset sizes
    metrics.jsonl         one JSON line per logging step (train and eval)
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
from pathlib import Path
from typing import Any

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


def resolve_resume(value: Any, output_dir: str) -> str | None:
    """``latest`` -> newest complete checkpoint (None when there is none); a path must be complete."""
    from mpo.trainer import COMPLETE_MARKER, latest_complete_checkpoint

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
    from mpo.trainer import list_checkpoints

    return [path for _, path, _ in list_checkpoints(out)]


def prepare_output_dir(out_dir: str, resume: str | None, overwrite: bool, is_main: bool) -> None:
    """Keep one run per output_dir, with one consistent history.

    A fresh run into a folder that holds another run's metrics or checkpoints is refused unless
    ``overwrite`` (then that run's outputs are deleted). A resume from step N moves the logged
    lines of steps after N (the interrupted run's, about to be redone) to ``<file>.before-resume-N``.
    """
    import shutil

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

    from mpo.trainer import MPO_STATE_NAME, setup_mismatch

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
        changed = sorted(
            k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE
        )
        if changed:
            diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
            raise ConfigError(
                f"resuming {ckpt} with changed settings that an exact resume cannot honour ({diffs}). "
                "Resume with the run's own config.yaml. " + restart
            )


def build_trainer(cfg: ExperimentConfig):
    """TrainingArguments, models, datasets and the MPOTrainer for ``cfg``; returns (trainer, resume)."""
    from transformers import TrainingArguments

    from mpo.data.collate import PairCollator
    from mpo.data.events import RecordingDataset
    from mpo.data.pairs import PairDataset, VisionSpec
    from mpo.loss import LossWeights
    from mpo.model.loading import check_model_path, load_model, load_tokenizer
    from mpo.trainer import COMPLETE_MARKER, MPOTrainer

    check_model_path(cfg.model.path)
    training = dict(cfg.training)
    resume_value = training.pop("resume_from_checkpoint", None)
    from mpo.observability import attach_observability, configure_loggers

    configure_loggers(training, cfg.extras, cfg.to_dict())
    if launched_world_size() > 1 and not training.get("deepspeed"):
        raise ConfigError(
            "several processes were launched but training.deepspeed is not set: multi-process training "
            "runs under DeepSpeed (e.g. training.deepspeed=configs/deepspeed/zero2.json)"
        )
    single_process_env(training)
    prepare_cpu_distributed(training)
    # Created before from_pretrained so that ZeRO-3 can partition the weights as they load.
    args = TrainingArguments(**training)
    resume = resolve_resume(resume_value, args.output_dir)
    if resume is not None:
        check_resume(resume, cfg, args)
    elif resume_value in (True, "latest") and _checkpoints(Path(args.output_dir)):
        # Asked to resume, and there are checkpoints, but none finished saving: never start over
        # silently (overwrite_output_dir would delete them).
        raise ConfigError(
            f"training.resume_from_checkpoint=latest: {args.output_dir} has checkpoints but none is complete "
            f"(no {COMPLETE_MARKER}: their saves were interrupted). To start over, set "
            "training.resume_from_checkpoint=null and training.overwrite_output_dir=true"
        )
    prepare_output_dir(args.output_dir, resume, cfg.extras.overwrite_output_dir, args.should_save)

    tokenizer = load_tokenizer(cfg.model.path)
    model = load_model(cfg.model.path, cfg.model.torch_dtype, cfg.model.attn_implementation)
    from mpo.model.freeze import apply_freezing

    apply_freezing(model, cfg.model)
    if cfg.model.lora:
        from transformers import set_seed

        from mpo.model.lora import apply_lora

        # LoRA's A matrices are drawn at random here, before the Trainer seeds anything: seed now,
        # so the same config gives the same adapters with or without DeepSpeed (whose set-up
        # draws from the RNG too).
        set_seed(args.seed)
        model = apply_lora(model, cfg.model.lora)
    ref_model = None
    if cfg.model.reference == "copy":
        ref_model = load_model(
            cfg.model.ref_path or cfg.model.path, cfg.model.torch_dtype, cfg.model.attn_implementation
        )
    vision = VisionSpec.from_model_config(model.config)
    train_ds = PairDataset(cfg.data.meta_path, tokenizer, vision, cfg.data)
    eval_ds = (
        PairDataset(cfg.data.eval_meta_path, tokenizer, vision, cfg.data) if cfg.data.eval_meta_path else None
    )
    if cfg.model.reference == "cache":
        # Reference log-probs come with each batch; no reference model is loaded at all.
        from mpo.refcache import open_ref_cache

        ref_source = cfg.model.ref_path or cfg.model.path
        train_ds = open_ref_cache(cfg.model.ref_cache, train_ds, ref_source, cfg.model.torch_dtype)
        if eval_ds is not None:
            eval_ds = open_ref_cache(cfg.model.ref_cache, eval_ds, ref_source, cfg.model.torch_dtype)
    # Items carry their skip/truncation events to the trainer, from whichever worker read them.
    train_ds = RecordingDataset(train_ds)
    eval_ds = RecordingDataset(eval_ds) if eval_ds is not None else None
    trainer = MPOTrainer(
        model=model,
        args=args,
        ref_model=ref_model,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PairCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        loss_weights=LossWeights.from_config(cfg.loss),
        reference=cfg.model.reference,
        logprob_chunk_size=cfg.model.logprob_chunk_size,
        group_by_length=cfg.data.group_by_length,
        shared_prompt=cfg.model.shared_prompt,
    )
    attach_observability(trainer, cfg)
    return trainer, resume


def run_training(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train per ``cfg``; returns the summary also written to ``summary.json``."""
    trainer, resume = build_trainer(cfg)
    out_dir = Path(trainer.args.output_dir)
    main = trainer.args.should_save
    if main:
        from mpo.observability import startup_summary

        print(startup_summary(trainer, cfg), flush=True)
        save_config(cfg, out_dir)
        info = {
            "versions": _versions(),
            "git_commit": _git_commit(),
            "world_size": trainer.args.world_size,
            "train_pairs": trainer.train_dataset.source.counts(),
            "eval_pairs": trainer.eval_dataset.source.counts() if trainer.eval_dataset is not None else {},
            "resumed_from": resume,
        }
        (out_dir / "run_info.json").write_text(json.dumps(info, indent=1))
    result = trainer.train(resume_from_checkpoint=resume)
    train_events = trainer.total_data_events("train")  # every rank, every worker, across resumes
    if main:
        trainer.train_dataset.write_skip_report(out_dir, events=train_events)
    final_dir = out_dir / "final"
    trainer.save_model(str(final_dir))
    summary: dict[str, Any] = {
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "bco_delta": trainer.reward_shift.value,
        "final_model": str(final_dir),
        "skipped_train_samples": dict(train_events.skipped),
        "truncated_train_responses": dict(train_events.truncated),
    }
    if trainer.eval_dataset is not None:
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
            trainer.eval_dataset.write_skip_report(out_dir, name="data_skips_eval.json", events=eval_events)
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
