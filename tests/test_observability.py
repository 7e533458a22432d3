"""Loggers (wandb offline, tensorboard), the progress lines, the start-up summary, sample generations."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mpo.config import ConfigError
from mpo.data.template import IGNORE_INDEX
from mpo.observability import (
    MPOProgressCallback,
    SampleGenerationCallback,
    attach_observability,
    configure_loggers,
    finish_loggers,
    prompt_from_item,
    startup_summary,
    tiles_per_pair,
    wandb_mode,
)
from mpo.run import build_trainer
from mpo.stats import percentiles


def _build(cfg):
    trainer, _ = build_trainer(cfg)  # configures the loggers and attaches the callbacks itself
    return trainer


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- pure pieces -----------------------------------------------------------------------------
def test_wandb_mode_offline_without_key():
    assert wandb_mode({}) == "offline"
    assert wandb_mode({"WANDB_API_KEY": "x"}) == "online"
    assert wandb_mode({"WANDB_API_KEY": "x", "WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode({"WANDB_MODE": "online"}) == "online"


def test_configure_loggers_sets_mode_and_run_name(monkeypatch, tiny_config):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_config("training.report_to=wandb")
    configure_loggers(cfg.training, cfg.extras, cfg.to_dict())
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    assert cfg.training["run_name"] == Path(cfg.training["output_dir"]).name
    cfg.extras.run_tags = ["ok", 3]
    with pytest.raises(ConfigError, match="run_tags"):
        configure_loggers(cfg.training, cfg.extras, cfg.to_dict())


def test_percentiles_are_nearest_rank():
    xs = [5, 1, 13, 2, 2, 7, 1, 1, 4]
    got = percentiles(xs, (10, 50, 90, 100))
    assert list(got) == ["p10", "p50", "p90", "max"]
    for q, v in zip((10, 50, 90, 100), got.values()):
        assert v == np.percentile(xs, q, method="inverted_cdf")
    # A histogram (value -> count) gives the same as the values it counts.
    assert percentiles(Counter(xs), (10, 50, 90, 100)) == got and percentiles([]) == {}


def test_prompt_is_chosen_ids_up_to_first_trained_label():
    item = {
        "chosen_input_ids": torch.tensor([11, 12, 13, 14, 15, 16]),
        "chosen_labels": torch.tensor([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 14, 15, 16]),
    }
    assert prompt_from_item(item).tolist() == [11, 12, 13]
    item["chosen_labels"] = torch.full((6,), IGNORE_INDEX)
    with pytest.raises(ValueError, match="no trained response token"):
        prompt_from_item(item)


def test_startup_summary(tiny_config):
    cfg = tiny_config()
    trainer = _build(cfg)
    line = startup_summary(trainer, cfg, sample_items=16)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    tiles = [int(sum(trainer.train_dataset[i][0]["num_tiles"])) for i in range(0, 64, 4)]
    assert tiles_per_pair(trainer.train_dataset, 16) == tiles
    p = {q: int(np.percentile(tiles, q, method="inverted_cdf")) for q in (50, 90, 100)}
    counts = trainer.train_dataset.source.counts()
    assert len(counts) == 1 and sum(counts.values()) == 64
    (name,) = counts
    assert "\n" not in line
    for part in (
        f"model {cfg.model.path}",
        f"/{n_params / 1e3:.2f}K params",
        f"train 64 pairs ({name} 64)",
        "eval 16 pairs",
        f"tiles/pair p50 {p[50]} p90 {p[90]} max {p[100]} (of 16)",
        "world 1",
        "batch 2x1x1=2 pairs/step",
        "no DeepSpeed",
        "reference copy",
    ):
        assert part in line, (part, line)
    # attaching again (build_trainer already did) changes nothing
    before = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    attach_observability(trainer, cfg)
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks] == before
    assert before.count("MPOProgressCallback") == 1 and "PrinterCallback" not in before


def test_generation_is_greedy_and_restores_mode(tiny_config):
    cfg = tiny_config(
        "training.sample_steps=1", "training.sample_num_prompts=2", "training.sample_max_new_tokens=5"
    )
    trainer = _build(cfg)
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SampleGenerationCallback))
    cb.prompts = cb._collect_prompts()
    assert [p["line"] for p in cb.prompts] == [1, 2] and cb.prompts[0]["split"] == "eval"
    model, tok = trainer.model, trainer.processing_class
    for mode in (True, False):
        model.train(mode)
        answers = cb.generate(model)
        assert model.training is mode
    # Independent greedy decode: argmax of a full forward pass per new token (no cache).
    p = cb.prompts[0]
    ids = p["input_ids"].unsqueeze(0)
    with torch.no_grad():
        for _ in range(5):
            logits = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p["pixel_values"]
            ).logits
            nxt = logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == tok.eos_token_id:
                break
    new = ids[0, p["input_ids"].shape[0] :].tolist()
    assert answers[0].text == tok.decode(new, skip_special_tokens=True)
    # Ran out of tokens exactly when the 5 new tokens hold no end-of-turn token.
    assert answers[0].hit_limit == (len(new) == 5 and cb.end_of_turn not in new)


# ---- real tiny runs --------------------------------------------------------------------------
@pytest.mark.slow
def test_wandb_offline_run_has_logged_keys_and_config(tiny_config, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = tiny_config(
        "training.report_to=wandb",
        "training.max_steps=2",
        "training.save_steps=100",
        "training.run_tags=[unit-test,tiny]",
    )
    trainer = _build(cfg)
    import wandb

    try:
        trainer.train()
    finally:
        finish_loggers()
        wandb.teardown()  # stops wandb's service process, which writes the run file asynchronously
    out = Path(trainer.args.output_dir)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "the offline run must live inside the output dir"
    (history,) = runs[0].glob("run-*.wandb")
    data = history.read_bytes()
    # Trainer's WandbCallback logs train keys as train/<key>; our config goes under "mpo".
    for key in (
        b"train/loss/dpo",
        b"train/rewards/accuracies",
        b"train/bco/delta",
        b"logprob_chunk_size",
        b"unit-test",
    ):
        assert key in data, key
    assert trainer.args.run_name == "run"


@pytest.mark.slow
def test_tensorboard_events_samples_and_progress(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(
        "training.report_to=tensorboard",
        "training.save_steps=100",
        "training.sample_steps=2",
        "training.sample_num_prompts=2",
        "training.sample_max_new_tokens=4",
    )
    trainer = _build(cfg)
    trainer.train()
    out = Path(trainer.args.output_dir)
    event_files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert event_files
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    logged = {r["step"]: r["loss/dpo"] for r in _metrics(out) if "loss/dpo" in r}
    tb = {e.step: e.value for e in acc.Scalars("train/loss/dpo")}
    assert sorted(tb) == sorted(logged) == [1, 2, 3, 4]
    for step, v in logged.items():
        assert tb[step] == pytest.approx(v, rel=1e-6)  # TensorBoard stores float32: ε/2 ≈ 6e-8 relative
    assert "samples/prompt_0/text_summary" in acc.Tags()["tensors"]

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt_id"]) for s in samples] == [(0, 0), (0, 1), (2, 0), (2, 1), (4, 0), (4, 1)]
    assert all(s["split"] == "eval" and isinstance(s["generated"], str) for s in samples)
    assert trainer.model.training, "sampling must leave the model in train mode"

    progress = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MPOProgressCallback))
    train_lines = [line for line in progress.lines if line.startswith("step ")]
    first = next(r for r in _metrics(out) if r["step"] == 1 and "loss" in r)
    assert len(train_lines) == 4
    assert train_lines[0].startswith(f"step 1/4 | loss {first['loss']:.4g} (dpo {first['loss/dpo']:.4g}")
