"""2-rank CPU DeepSpeed (gloo) through the `deepspeed` CLI: ZeRO-2/3 losses equal one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_faults import _with_bad_lines  # tests/ is on sys.path under pytest
from tolerances import assert_same_training

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _train_rows(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "train_runtime" not in r:
            out[r["step"]] = r
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TRAIN = [str(ROOT / "train" / "train_mpo.py"), "--config", str(ROOT / "configs" / "demo.yaml")]


def _deepspeed(stage: str) -> str:
    return f"training.deepspeed={ROOT / 'configs' / 'deepspeed' / f'{stage}.json'}"


def _train(args: list[str], ranks: int | None = None, env=None) -> None:
    """One training run: plain ``python`` (ranks None) or the ``deepspeed`` CLI with ``ranks``
    processes. The timeout turns a rank stuck in a collective into a failure, not a hung suite."""
    if ranks is None:
        cmd = [sys.executable, *TRAIN, *args]
    else:
        launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which(
            "deepspeed"
        )
        assert launcher, "the deepspeed CLI is not installed"
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), *TRAIN, *args]
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _assert_same_losses(got: Path, want: Path, steps: list[int]) -> None:
    """Per-step loss and δ equal up to float32 rounding (bounds in tests/tolerances.py)."""
    rows = _train_rows(want)
    assert sorted(rows) == steps
    assert_same_training(_train_rows(got), rows)


@pytest.fixture(scope="module")
def common(tiny_model_dir, demo_data):
    return [
        f"model.path={tiny_model_dir}",
        f"data.meta_path={demo_data['train']}",
        "data.eval_meta_path=null",
        "training.max_steps=3",
        "training.learning_rate=1e-3",
        "training.logging_steps=1",
        "training.save_steps=3",
        "training.eval_strategy=no",
        "training.disable_tqdm=true",
        "training.dataloader_num_workers=0",
    ]


@pytest.fixture(scope="module")
def single_process(common, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _train(
        [
            *common,
            "training.per_device_train_batch_size=4",
            "training.use_cpu=true",
            f"training.output_dir={out}",
        ]
    )
    return out


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_ranks_match_single_process(common, single_process, tmp_path, stage):
    out = tmp_path / stage
    _train(
        [*common, "training.per_device_train_batch_size=2", _deepspeed(stage), f"training.output_dir={out}"],
        2,
    )
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2
    _assert_same_losses(out, single_process, [1, 2, 3])
    # Only rank 0 writes: exactly one training line per step (and one train-end line), and the
    # sampled answers' repetition numbers at the start and the end (demo.yaml samples).
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r and "train_runtime" not in r] == [1, 2, 3]
    assert [r["step"] for r in lines if "samples/limit_share" in r] == [0, 3]
    assert len(lines) == 4 + 2
    from transformers import InternVLForConditionalGeneration

    from mpo.checkpoints import COMPLETE_MARKER
    from mpo.consolidate import consolidate

    assert (out / "checkpoint-3" / COMPLETE_MARKER).is_file()
    final = InternVLForConditionalGeneration.from_pretrained(out / "final").state_dict()
    reference = InternVLForConditionalGeneration.from_pretrained(single_process / "final").state_dict()
    merged = InternVLForConditionalGeneration.from_pretrained(
        consolidate(out / "checkpoint-3", tmp_path / "consolidated")
    ).state_dict()
    for name, tensor in final.items():
        # ZeRO shards consolidated after the fact equal the final (gathered) weights exactly ...
        assert torch.equal(merged[name], tensor), name
        # ... and equal single-process training up to rounding. Adam moves an entry by at most
        # lr·(1−β1)/√(1−β2) ≈ 3.16·lr per step whatever its gradient, and rounding can flip the sign
        # of a near-zero gradient, so two runs of 3 steps at lr 1e-3 differ by at most 2·3·3.16e-3.
        # (The per-step losses above are the tight check that the runs did the same updates.)
        assert torch.allclose(tensor, reference[name], rtol=0, atol=2 * 3 * 3.17e-3), name
    # The consolidated folder serves like final/: same chat template, processor and generation files.
    for name in ("chat_template.jinja", "preprocessor_config.json", "tokenizer.json"):
        assert (tmp_path / "consolidated" / name).read_text() == (out / "final" / name).read_text(), name
    gen = [
        json.loads((d / "generation_config.json").read_text())
        for d in (tmp_path / "consolidated", out / "final")
    ]
    for key in ("eos_token_id", "pad_token_id", "do_sample"):
        assert gen[0][key] == gen[1][key], key
    assert "checkpoint-3" in (tmp_path / "consolidated" / "README.md").read_text()


def test_lora_under_zero3_matches_plain_lora(common, tmp_path):
    """LoRA-MPO (reference = adapters off) in one ZeRO-3 process equals the same run without
    DeepSpeed: losses, the saved adapters, and a merged export that loads."""
    from safetensors.torch import load_file
    from transformers import InternVLForConditionalGeneration

    from mpo.model.cli import cmd_export

    lora = [
        *common,
        "training.per_device_train_batch_size=2",
        "training.learning_rate=1e-2",
        "model.reference=lora_disabled",
        "model.lora={target: both, r: 4, alpha: 8, dropout: 0.0}",
    ]
    plain, zero3 = tmp_path / "plain", tmp_path / "zero3"
    _train([*lora, f"training.output_dir={plain}"])
    _train([*lora, f"training.output_dir={zero3}", _deepspeed("zero3")], 1)
    _assert_same_losses(zero3, plain, [1, 2, 3])
    assert _train_rows(plain)[3]["loss"] != _train_rows(plain)[1]["loss"]
    ours, theirs = (
        load_file(zero3 / "final" / "adapter_model.safetensors"),
        load_file(plain / "final" / "adapter_model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs) and len(ours) > 0
    for name, tensor in theirs.items():
        # One process each: the same float32 gradients reach Adam (no cross-rank reduction), so the
        # adapters differ by rounding only, a few ulps of entries of magnitude ≤ 0.1 (≪ 1e-5).
        assert ours[name].shape == tensor.shape and torch.allclose(ours[name], tensor, rtol=0, atol=1e-5), (
            name
        )
    assert any(t.abs().max() > 0 for n, t in ours.items() if "lora_B" in n)  # the adapters trained
    assert cmd_export(["--merge-lora", str(zero3 / "final"), str(tmp_path / "merged")]) == 0
    merged = InternVLForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())


def _uneven_data(demo_data, tmp_path) -> Path:
    """8 pairs: 5 with images, 2 text-only with long answers, 1 bad (missing image)."""
    demo_meta = Path(demo_data["train"])
    spec = next(iter(json.loads(demo_meta.read_text()).values()))
    root = (demo_meta.parent / spec["root"]).resolve()
    lines = (root / spec["annotation"]).read_text().splitlines()[:5]
    long_answer = " ".join(["the", "answer", "is", "long"] * 6)
    lines += [
        json.dumps({"question": "Say something long.", "chosen": long_answer, "rejected": "No."}),
        json.dumps({"question": "And again?", "chosen": "Short.", "rejected": long_answer}),
        json.dumps({**json.loads(lines[0]), "image": "images/missing.png"}),
    ]
    (tmp_path / "uneven.jsonl").write_text("\n".join(lines) + "\n")
    meta = tmp_path / "uneven.json"
    meta.write_text(json.dumps({"uneven": {"root": str(root), "annotation": str(tmp_path / "uneven.jsonl")}}))
    return meta


def test_zero3_ranks_with_skipped_and_text_only_pairs_match_one_process(common, demo_data, tmp_path):
    """One pair per rank, so a skipped pair leaves a rank with nothing, a text-only pair meets an
    image pair, and responses need different numbers of LM-head chunks: ZeRO-3 ranks must still
    run the same modules (no hang) and give the single process's per-step losses."""
    meta = _uneven_data(demo_data, tmp_path)
    args = [
        *common,
        f"data.meta_path={meta}",
        "data.on_bad_sample=skip",
        "data.max_bad_fraction=0.5",
        "model.logprob_chunk_size=3",
        "training.max_steps=4",
        "training.save_strategy=no",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    _train([*args, "training.per_device_train_batch_size=2", f"training.output_dir={one}"])
    _train(
        [*args, "training.per_device_train_batch_size=1", _deepspeed("zero3"), f"training.output_dir={two}"],
        2,
    )
    _assert_same_losses(two, one, [1, 2, 3, 4])
    skips = json.loads((two / "data_skips.json").read_text())
    assert skips["skipped"] == {"missing_image": 1} and skips["seen"] == 8


def test_plain_python_launch_with_deepspeed_is_one_process(common, single_process, tmp_path):
    """`python train/train_mpo.py ... training.deepspeed=X` with no launcher trains as one process
    and matches the run without DeepSpeed."""
    out = tmp_path / "plain-ds"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    _train(
        [
            *common,
            "training.per_device_train_batch_size=4",
            _deepspeed("zero2"),
            f"training.output_dir={out}",
        ],
        env=env,
    )
    _assert_same_losses(out, single_process, [1, 2, 3])


def test_packed_batches_on_two_zero3_ranks_match_one_process(common, demo_data, tmp_path):
    """Packed batches under ZeRO-3 on 2 ranks: rank r takes packed batches r, r+2, ..., so a step
    holds batches 2i and 2i+1, as one process with 2 accumulation steps does. Ranks hold different
    numbers of pairs and trained tokens (lockstep LM-head calls), one batch may be all skipped. δ
    takes a micro-batch's rewards from every rank before the loss, so the two runs' δ paths differ
    within a step: the quality term is off here and the losses compare within tests/tolerances.py."""
    from tolerances import loss_bound

    meta = _uneven_data(demo_data, tmp_path)
    args = [
        *common, f"data.meta_path={meta}", "data.on_bad_sample=skip", "data.max_bad_fraction=0.5",
        "data.packing=true", "data.max_length=100", "data.max_tokens_per_batch=120", "loss.quality_weight=0",
        "model.logprob_chunk_size=3", "training.max_steps=2", "training.save_strategy=no",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _train([*args, "training.gradient_accumulation_steps=2", f"training.output_dir={one}"])
    _train([*args, _deepspeed("zero3"), f"training.output_dir={two}"], 2)
    want, got = _train_rows(one), _train_rows(two)
    assert sorted(got) == sorted(want) == [1, 2]
    for step in (1, 2):
        w = want[step]
        assert got[step]["bco/num_rewards"] == w["bco/num_rewards"]
        assert abs(got[step]["loss"] - w["loss"]) <= loss_bound(w, [w], 0.1, (0.8, 0.0, 1.0)), step


def test_all_skipped_micro_batches_and_steps_under_deepspeed(common, demo_data, tmp_path):
    """Per-device batch 1, the official setting: a skipped line empties a micro-batch. Two ZeRO-2
    ranks × 2 accumulation steps (rank r reads lines 4s+r and 4s+r+2 of step s): step 1 has both
    of rank 1's pairs skipped, step 2 every pair, step 4 one. They train on and match one process
    reading the same global batches (batch 1 × 4), up to rounding; ZeRO-1 in one process (where
    this used to fail with "loss must be a scalar tensor") matches it too. SGD and no BCO term, as
    in tests/test_faults.py: they make the comparison tight."""
    meta = _with_bad_lines(demo_data, tmp_path, bad_at=(1, 3, 4, 5, 6, 7, 12), n=16)
    args = [
        *common, f"data.meta_path={meta}", "data.on_bad_sample=skip", "data.max_bad_fraction=0.9",
        "training.max_steps=4", "training.save_strategy=no", "training.train_sampling_strategy=sequential",
        "training.optim=sgd", "training.learning_rate=0.1", "loss.quality_weight=0",
        "training.per_device_train_batch_size=1",
    ]  # fmt: skip
    one, two, zero1 = tmp_path / "one", tmp_path / "two", tmp_path / "zero1"
    _train([*args, "training.gradient_accumulation_steps=4", f"training.output_dir={one}"])
    _train(
        [*args, "training.gradient_accumulation_steps=2", _deepspeed("zero2"), f"training.output_dir={two}"],
        2,
    )
    _train(
        [
            *args,
            "training.gradient_accumulation_steps=4",
            _deepspeed("zero1"),
            f"training.output_dir={zero1}",
        ],
        1,
    )
    want = _train_rows(one)
    assert want[2]["loss"] == 0.0 and "loss/dpo" not in want[2]  # a step with no pair at all
    for got in (two, zero1):
        rows = _train_rows(got)
        assert rows[2]["loss"] == 0.0 and rows[2]["bco/num_rewards"] == want[1]["bco/num_rewards"]
        assert_same_training({s: rows[s] for s in (1, 3, 4)}, {s: want[s] for s in (1, 3, 4)})
        skips = json.loads((got / "data_skips.json").read_text())
        assert skips["skipped"] == {"missing_image": 7} and skips["seen"] == 16
