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
    cmd = [
        sys.executable,
        str(ROOT / "train" / "train_mpo.py"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        *common,
        "training.per_device_train_batch_size=4",
        "training.use_cpu=true",
        f"training.output_dir={out}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return out


@pytest.mark.parametrize("stage,port", [("zero2", 29517), ("zero3", 29519)])
def test_two_ranks_match_single_process(common, single_process, tmp_path, stage, port):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed CLI is not installed"
    out = tmp_path / stage
    cmd = [
        launcher,
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(ROOT / "train" / "train_mpo.py"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        *common,
        "training.per_device_train_batch_size=2",
        f"training.deepspeed={ROOT / 'configs' / 'deepspeed' / f'{stage}.json'}",
        f"training.output_dir={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2
    dist = _losses(out)
    single = _losses(single_process)
    assert sorted(dist) == sorted(single) == [1, 2, 3]
    for step, (loss, delta) in single.items():
        assert dist[step][0] == pytest.approx(loss, rel=1e-4), (stage, step)
        assert dist[step][1] == pytest.approx(delta, rel=1e-4, abs=1e-7), (stage, step)
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

    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    lora = [
        *common,
        "training.per_device_train_batch_size=2",
        "training.learning_rate=1e-2",
        "model.reference=lora_disabled",
        "model.lora={target: both, r: 4, alpha: 8, dropout: 0.0}",
    ]
    script = [str(ROOT / "train" / "train_mpo.py"), "--config", str(ROOT / "configs" / "demo.yaml"), *lora]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    plain, zero3 = tmp_path / "plain", tmp_path / "zero3"
    subprocess.run(
        [sys.executable, *script, f"training.output_dir={plain}"], check=True, capture_output=True, env=env
    )
    proc = subprocess.run(
        [
            launcher,
            "--num_gpus",
            "1",
            "--master_port",
            "29523",
            *script,
            f"training.output_dir={zero3}",
            f"training.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _losses(plain), _losses(zero3)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step][0] == pytest.approx(a[step][0], rel=1e-5), step
    assert a[3][0] != a[1][0]
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
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
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
    script = [str(ROOT / "train" / "train_mpo.py"), "--config", str(ROOT / "configs" / "demo.yaml"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, *script, "training.per_device_train_batch_size=2", f"training.output_dir={one}"],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    proc = subprocess.run(
        [
            launcher,
            "--num_gpus",
            "2",
            "--master_port",
            "29527",
            *script,
            "training.per_device_train_batch_size=1",
            f"training.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}",
            f"training.output_dir={two}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,  # a rank waiting in a collective the other never reaches would hang here
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step][0] == pytest.approx(a[step][0], rel=1e-4), step
        assert b[step][1] == pytest.approx(a[step][1], rel=1e-4, abs=1e-7), step
    skips = json.loads((two / "data_skips.json").read_text())
    assert skips["skipped"] == {"missing_image": 1} and skips["seen"] == 8


def test_plain_python_launch_with_deepspeed_is_one_process(common, single_process, tmp_path):
    """`python train/train_mpo.py ... training.deepspeed=X` with no launcher trains as one process
    and matches the run without DeepSpeed."""
    out = tmp_path / "plain-ds"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train" / "train_mpo.py"),
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            *common,
            "training.per_device_train_batch_size=4",
            f"training.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}",
            f"training.output_dir={out}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, want = _losses(out), _losses(single_process)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step, (loss, delta) in want.items():
        assert got[step][0] == pytest.approx(loss, rel=1e-4) and got[step][1] == pytest.approx(
            delta, rel=1e-4, abs=1e-7
        )
