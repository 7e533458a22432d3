"""CPU training on the tiny model: step-0 loss, outputs, δ across resume, learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tolerances import assert_same_training  # tests/ is on sys.path under pytest
from transformers import TrainerCallback

from mpo.run import build_trainer, run_training


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_logs(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _records(run_dir) if "loss" in r and "train_runtime" not in r}


class StopAfter(TrainerCallback):
    """Ends training after ``step`` optimizer steps, as a crash would (the schedule stays the full run's)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_step0_loss_equals_0p832_plus_nll(tiny_config):
    """π = πref and δ = 0 before the first update: L = 0.8·ln2 + 0.2·2·ln2 + NLL(chosen)."""
    trainer, _ = build_trainer(tiny_config("loss.sft_normalization=token"))
    batch, events = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, (batch, events))
    # Independent NLL: the model's own full forward (its own vision pass, full logits) on chosen rows.
    b = batch["num_pairs"]
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"][:b],
            attention_mask=batch["attention_mask"][:b],
            pixel_values=batch["pixel_values"],  # each pair's tiles, once
        )
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:b, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
    expected = 0.8 * math.log(2) + 0.2 * 2 * math.log(2) + nll.item()
    assert trainer.reward_shift.value == 0.0  # π and πref are the same weights and arithmetic: rewards are 0
    # Chunked response-only NLL against full logits, float32: sums of ~100 terms of |log p| ≤ 7
    # differ by ≲ 100·ε relative; rel 1e-5 ≈ 84 ε.
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_run_writes_outputs_and_final_model_loads(tiny_config):
    cfg = tiny_config()
    summary = run_training(cfg)
    run_dir = Path(cfg.training["output_dir"])
    for name in ("config.yaml", "run_info.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    logs = _train_logs(run_dir)
    assert sorted(logs) == [1, 2, 3, 4]
    required = [
        "loss",
        "loss/dpo",
        "loss/bco",
        "loss/sft",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "bco/delta",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
    ]
    for key in required:
        assert all(key in r for r in logs.values()), key
    # Each logged loss is the weighted sum of its logged terms (one micro-batch per step here).
    for r in logs.values():
        # The logged loss is the float32 step loss; the terms are float64 means of float32 per-pair
        # terms: they agree to a few ε (rel 1e-6 ≈ 8 ε).
        assert r["loss"] == pytest.approx(0.8 * r["loss/dpo"] + 0.2 * r["loss/bco"] + r["loss/sft"], rel=1e-6)
    assert summary["global_step"] == 4 and "rewards/accuracies" in summary["eval"]
    ckpts = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    for c in ckpts:
        state = json.loads((run_dir / c / "mpo_state.json").read_text())["reward_shift"]
        assert state["count"] == 2 * 2 * int(c.split("-")[1])  # chosen+rejected rewards of 2 pairs per step

    from transformers import InternVLForConditionalGeneration

    final = InternVLForConditionalGeneration.from_pretrained(run_dir / "final")
    start = InternVLForConditionalGeneration.from_pretrained(cfg.model.path)
    diff = sum((a - b).abs().sum().item() for a, b in zip(final.parameters(), start.parameters()))
    assert diff > 0, "training changed no weight"
    assert (run_dir / "final" / "tokenizer.json").is_file()


def test_delta_and_losses_after_resume_equal_uninterrupted_run(tiny_config, tmp_path):
    full_cfg = tiny_config(f"training.output_dir={tmp_path / 'full'}")
    run_training(full_cfg)
    # Second run (same schedule) is stopped after step 2's checkpoint, then resumed to step 4.
    part_cfg = tiny_config(f"training.output_dir={tmp_path / 'part'}")
    trainer, _ = build_trainer(part_cfg)
    trainer.add_callback(StopAfter(2))
    trainer.train()
    assert trainer.state.global_step == 2
    resumed_cfg = tiny_config(
        f"training.output_dir={tmp_path / 'part'}", "training.resume_from_checkpoint=latest"
    )
    trainer, resume = build_trainer(resumed_cfg)
    assert resume.endswith("checkpoint-2")
    trainer.train(resume_from_checkpoint=resume)

    full = _train_logs(tmp_path / "full")
    part = _train_logs(tmp_path / "part")
    for step in (3, 4):  # the same machine, order and arithmetic: bit for bit
        assert part[step]["loss"] == full[step]["loss"], step
        assert part[step]["bco/delta"] == full[step]["bco/delta"], step
    assert trainer.reward_shift.value == full[4]["bco/delta"] != 0.0


@pytest.mark.slow
def test_training_raises_reward_accuracy_and_margins(tiny_config):
    cfg = tiny_config(
        # 96 steps of 8 pairs (12 epochs of the 64-pair fixture): ~10 s on 2 idle cores. Margins
        # first move clearly after ~40 steps (coloured-shape data, random tiny model).
        "training.max_steps=96",
        "training.per_device_train_batch_size=8",
        "training.learning_rate=3e-3",
        "training.save_strategy=no",
        "training.logging_steps=4",
    )
    run_training(cfg)
    logs = [r for _, r in sorted(_train_logs(Path(cfg.training["output_dir"])).items())]
    first, last = logs[:2], logs[-3:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies") + 0.2
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.05
    assert mean(last, "loss") < mean(first, "loss")


def test_missing_model_path_is_a_clear_error(tiny_config, tmp_path, capsys):
    from mpo.cli import cmd_train

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"model:\n  path: {tmp_path / 'nope'}\ndata:\n  meta_path: m.json\n")
    assert cmd_train(["--config", str(cfg_path)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cmd_train(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_shared_prompt_setting_trains_like_the_plain_forward(tiny_config, tmp_path):
    """model.shared_prompt=true changes how log-probs are computed, not what they are."""
    common = ["training.max_steps=3", "training.save_strategy=no", "data.eval_meta_path=null"]
    plain, _ = build_trainer(tiny_config(*common, f"training.output_dir={tmp_path / 'plain'}"))
    shared, _ = build_trainer(
        tiny_config(*common, "model.shared_prompt=true", f"training.output_dir={tmp_path / 'shared'}")
    )
    assert shared._logps is not plain._logps
    plain.train()
    shared.train()
    a, b = _train_logs(tmp_path / "plain"), _train_logs(tmp_path / "shared")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    # Same math, different kernels (one packed row vs two): float32 rounding only (tolerances.py).
    assert_same_training(b, a)
    assert a[3]["loss"] != a[1]["loss"]


def test_group_by_length_batches_have_less_padding(tiny_config, tmp_path):
    """data.group_by_length=true puts pairs of similar length together: less padding, same pairs."""
    from mpo.sampler import LengthGroupedPairSampler

    def epoch(grouped: bool):
        trainer, _ = build_trainer(
            tiny_config(
                f"data.group_by_length={str(grouped).lower()}",
                "training.per_device_train_batch_size=4",
                f"training.output_dir={tmp_path / str(grouped)}",
            )
        )
        assert isinstance(trainer._get_train_sampler().inner, LengthGroupedPairSampler) == grouped
        padded, real, n = 0, 0, 0
        for batch, _ in trainer.get_train_dataloader():
            padded += batch["attention_mask"].numel()
            real += int(batch["attention_mask"].sum())
            n += batch["num_pairs"]
        return padded, real, n

    plain_padded, plain_real, plain_n = epoch(False)
    grouped_padded, grouped_real, grouped_n = epoch(True)
    assert grouped_n == plain_n == 64 and grouped_real == plain_real  # every pair once
    assert grouped_padded < plain_padded


def one_sgd_step(tiny_config, tmp_path, name: str, *overrides: str):
    """(logged loss, weight update, micro-batches per epoch) of one SGD step (lr 1, no clipping) on
    4 text pairs whose chosen answers run from 1 to 20+ tokens; ``overrides`` say how the step is
    batched (also used by tests/test_packing.py)."""
    words = ["red", "The shape is a circle", "blue square on a white background with a dot", "yes " * 20]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "chosen": w, "rejected": "no"}) + "\n"
                            for i, w in enumerate(words)))  # fmt: skip
    trainer, _ = build_trainer(
        tiny_config(
            f"data.meta_path={data}",
            "data.eval_meta_path=null",
            "training.max_steps=1",
            "training.save_strategy=no",
            "training.optim=sgd",
            "training.learning_rate=1.0",
            "training.max_grad_norm=0",
            f"training.output_dir={tmp_path / name}",
            *overrides,
        )
    )
    batches = len(trainer.get_train_dataloader())
    start = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return loss, torch.cat([p.detach().flatten() for p in trainer.model.parameters()]) - start, batches


def _one_sgd_step(tiny_config, tmp_path, normalization: str, micro: int, accum: int):
    """``one_sgd_step`` with ``accum`` micro-batches of ``micro`` pairs: (loss, weight update)."""
    loss, delta, _ = one_sgd_step(
        tiny_config, tmp_path, f"{normalization}{micro}x{accum}", f"loss.sft_normalization={normalization}",
        f"training.per_device_train_batch_size={micro}", f"training.gradient_accumulation_steps={accum}",
    )  # fmt: skip
    return loss, delta


# float32: each gradient entry sums ≤ 4 pairs × ~60 token terms computed with other padding and
# grouping, so its rounding is ≲ 240·ε ≈ 3e-5 of the largest entry; 1e-4 of the largest update
# (and of the loss) leaves room and is 100× below what the two normalisations differ by.
SPLIT_RTOL = 1e-4


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_one_step_does_not_depend_on_how_it_is_split(tiny_config, tmp_path, normalization):
    """1 micro-batch of 4, 2 of 2 or 4 of 1: the same logged loss and the same weights after the
    step. Any split has micro-batches with unequal token counts, so a mean of per-micro-batch
    means would differ."""
    loss, delta = _one_sgd_step(tiny_config, tmp_path, normalization, 4, 1)
    scale = delta.abs().max().item()
    assert scale > 1e-3  # the step moved the weights
    for micro, accum in ((2, 2), (1, 4)):
        other_loss, other_delta = _one_sgd_step(tiny_config, tmp_path, normalization, micro, accum)
        assert other_loss == pytest.approx(loss, rel=SPLIT_RTOL), (micro, accum)
        assert (other_delta - delta).abs().max().item() <= SPLIT_RTOL * scale, (micro, accum)


def test_sft_normalisations_give_different_steps(tiny_config, tmp_path):
    """The control for the test above: its tolerance does tell the two normalisations apart."""
    _, seq = _one_sgd_step(tiny_config, tmp_path, "sequence", 4, 1)
    _, tok = _one_sgd_step(tiny_config, tmp_path, "token", 4, 1)
    assert (seq - tok).abs().max().item() > 100 * SPLIT_RTOL * seq.abs().max().item()


def test_bf16_without_deepspeed_runs_the_forward_in_bf16(tiny_config):
    """transformers autocasts ``model.forward``; our loss calls submodules, so it autocasts itself."""
    trainer, _ = build_trainer(tiny_config("training.bf16=true"))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    seen = []
    layer = trainer.model.model.language_model.layers[0].mlp
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, inputs)
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.isfinite(loss)


def test_training_order_is_seeded_and_carries_the_epoch(tiny_config, tmp_path):
    """The sampler's order depends on the seed and the epoch only (not on how much of the global
    RNG something else used: ranks and resumes must agree), and each index carries its epoch."""
    first, _ = build_trainer(tiny_config(f"training.output_dir={tmp_path / 'a'}"))
    sampler = first._get_train_sampler()
    sampler.set_epoch(0)
    order0 = list(sampler)
    torch.rand(1000)  # another consumer of the global RNG
    second, _ = build_trainer(tiny_config(f"training.output_dir={tmp_path / 'b'}"))
    again = second._get_train_sampler()
    again.set_epoch(0)
    assert list(again) == order0 and sorted(order0) == list(range(64))
    sampler.set_epoch(1)
    order1 = list(sampler)
    assert sorted(order1) == list(range(64, 128)) and [i - 64 for i in order1] != order0
