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

    Every refusal (a resume that cannot be exact, a used output dir) happens here, before any
    weights load and before any file changes.
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
    # Created before from_pretrained so that ZeRO-3 can partition the weights as they load.
    args = TrainingArguments(**training)
    resume = resolve_resume(resume_value, args.output_dir)
    if resume is not None:
        check_resume(resume, cfg, args)
    elif resume_value in (True, "latest") and list_checkpoints(Path(args.output_dir)):
        # Asked to resume, and there are checkpoints, but none finished saving: never start over
        # silently (overwrite_output_dir would delete them).
        raise ConfigError(
            f"training.resume_from_checkpoint=latest: {args.output_dir} has checkpoints but none is complete "
            f"(no {COMPLETE_MARKER}: their saves were interrupted). To start over, set "
            "training.resume_from_checkpoint=null and training.overwrite_output_dir=true"
        )
    prepare_output_dir(args.output_dir, resume, cfg.extras.overwrite_output_dir, args.should_save)
    return args, resume


@dataclass
class Models:
    tokenizer: Any
    policy: Any  # InternVLForConditionalGeneration, or its peft wrapper
    reference: Any | None  # a frozen copy (reference=copy), else None


def build_models(cfg: ExperimentConfig, seed: int) -> Models:
    """Tokenizer, policy (frozen parts and LoRA applied) and, for ``reference=copy``, the reference."""
    from mpo.model.drop_path import apply_vision_drop_path
    from mpo.model.freeze import apply_freezing
    from mpo.model.loading import load_model, load_tokenizer

    m = cfg.model
    tokenizer = load_tokenizer(m.path)
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
    return Models(tokenizer, policy, reference)


@dataclass
class Datasets:
    train_pairs: Any  # PairDataset: the data as read (lengths, counts, meta path)
    eval_pairs: Any | None
    train: Any  # what the Trainer reads: train_pairs, or it with cached reference log-probs
    eval: Any | None


def build_datasets(cfg: ExperimentConfig, tokenizer, model_config) -> Datasets:
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec

    vision = VisionSpec.from_config(model_config)
    d = cfg.data
    train_pairs = PairDataset(d.meta_path, tokenizer, vision, d, train=True)
    eval_pairs = PairDataset(d.eval_meta_path, tokenizer, vision, d) if d.eval_meta_path else None
    train, evaluation = train_pairs, eval_pairs
    if cfg.model.reference == "cache":
        # Reference log-probs come with each item; no reference model is loaded at all.
        from mpo.refcache import open_ref_cache

        ref_source = cfg.model.ref_path or cfg.model.path
        train = open_ref_cache(cfg.model.ref_cache, train_pairs, ref_source, cfg.model.torch_dtype)
        if eval_pairs is not None:
            evaluation = open_ref_cache(cfg.model.ref_cache, eval_pairs, ref_source, cfg.model.torch_dtype)
    return Datasets(train_pairs, eval_pairs, train, evaluation)


def build_trainer(cfg: ExperimentConfig):
    """The ``MPOTrainer`` for ``cfg`` and the checkpoint it resumes from: ``(trainer, resume)``."""
    from mpo.data.collate import PairCollator
    from mpo.loss import MPOLoss
    from mpo.model.loading import check_model_path
    from mpo.observability import attach_observability
    from mpo.trainer import MPOTrainer

    check_model_path(cfg.model.path)
    args, resume = prepare_run_dir(cfg)
    models = build_models(cfg, args.seed)
    data = build_datasets(cfg, models.tokenizer, models.policy.config)
    lengths = None
    if cfg.data.group_by_length:
        from mpo.sampler import pair_lengths

        lengths = lambda: pair_lengths(data.train_pairs)  # noqa: E731
    trainer = MPOTrainer(
        model=models.policy,
        args=args,
        loss_fn=MPOLoss(cfg.loss),
        ref_model=models.reference,
        reference=cfg.model.reference,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=PairCollator(models.tokenizer.pad_token_id),
        processing_class=models.tokenizer,
        logprob_chunk_size=cfg.model.logprob_chunk_size,
        shared_prompt=cfg.model.shared_prompt,
        train_lengths=lengths,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    attach_observability(trainer, cfg)
    return trainer, resume


def run_training(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train per ``cfg``; returns the summary also written to ``summary.json``."""
    from mpo.data.events import skip_report, write_skip_report

    trainer, resume = build_trainer(cfg)
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
    result = trainer.train(resume_from_checkpoint=resume)
    train_events = trainer.total_data_events("train")  # every rank, every worker, across resumes
    if main:
        report = skip_report(train.meta_path, len(train), cfg.data.max_bad_fraction, train_events)
        write_skip_report(out_dir, "data_skips.json", report)
    final_dir = out_dir / "final"
    trainer.save_model(str(final_dir))
    summary: dict[str, Any] = {
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
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
