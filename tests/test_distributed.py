"""2-rank CPU DeepSpeed (gloo) through the `deepspeed` CLI: ZeRO-2/3 losses equal one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "train_runtime" not in r:
            out[r["step"]] = (r["loss"], r["bco/delta"])
    return out


TRAIN = [str(ROOT / "train" / "train_mpo.py"), "--config", str(ROOT / "configs" / "demo.yaml")]


def _deepspeed(stage: str) -> str:
    return f"training.deepspeed={ROOT / 'configs' / 'deepspeed' / f'{stage}.json'}"


def _train(args: list[str], ranks: int | None = None, port: int | None = None, env=None) -> None:
    """One training run: plain ``python`` (ranks None) or the ``deepspeed`` CLI with ``ranks``
    processes. The timeout turns a rank stuck in a collective into a failure, not a hung suite."""
    if ranks is None:
        cmd = [sys.executable, *TRAIN, *args]
    else:
        launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which(
            "deepspeed"
        )
        assert launcher, "the deepspeed CLI is not installed"
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(port), *TRAIN, *args]
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _assert_same_losses(got: Path, want: Path, steps: list[int], rel: float = 1e-4) -> None:
    a, b = _losses(want), _losses(got)
    assert sorted(a) == sorted(b) == steps
    for step, (loss, delta) in a.items():
        assert b[step][0] == pytest.approx(loss, rel=rel), step
        assert b[step][1] == pytest.approx(delta, rel=rel, abs=1e-7), step


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


@pytest.mark.parametrize("stage,port", [("zero2", 29517), ("zero3", 29519)])
def test_two_ranks_match_single_process(common, single_process, tmp_path, stage, port):
    out = tmp_path / stage
    _train(
        [*common, "training.per_device_train_batch_size=2", _deepspeed(stage), f"training.output_dir={out}"],
        2,
        port,
    )
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2
    _assert_same_losses(out, single_process, [1, 2, 3])
    # Only rank 0 writes: one line per step, one final model.
    assert len([ln for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]) >= 3
    from transformers import InternVLForConditionalGeneration

    from mpo.consolidate import consolidate
    from mpo.trainer import COMPLETE_MARKER

    assert (out / "checkpoint-3" / COMPLETE_MARKER).is_file()
    final = InternVLForConditionalGeneration.from_pretrained(out / "final").state_dict()
    reference = InternVLForConditionalGeneration.from_pretrained(single_process / "final").state_dict()
    merged = InternVLForConditionalGeneration.from_pretrained(
        consolidate(out / "checkpoint-3", tmp_path / "consolidated")
    ).state_dict()
    for name, tensor in final.items():
        # ZeRO shards consolidated after the fact equal the final (gathered) weights exactly ...
        assert torch.equal(merged[name], tensor), name
        # ... and equal single-process training up to reduction-order noise (3 Adam steps of lr 1e-3).
        assert torch.allclose(tensor, reference[name], atol=3e-3), name
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
    _train([*lora, f"training.output_dir={zero3}", _deepspeed("zero3")], 1, 29523)
    _assert_same_losses(zero3, plain, [1, 2, 3], rel=1e-5)
    assert _losses(plain)[3][0] != _losses(plain)[1][0]
    ours, theirs = (
        load_file(zero3 / "final" / "adapter_model.safetensors"),
        load_file(plain / "final" / "adapter_model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs) and len(ours) > 0
    for name, tensor in theirs.items():
        assert ours[name].shape == tensor.shape and torch.allclose(ours[name], tensor, atol=1e-5), name
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
        29527,
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
