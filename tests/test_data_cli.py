"""``mpo data check`` and ``mpo data inspect``, and memory that stays flat as lines grow."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from mpo.cli import main
from mpo.stats import percentiles

GOOD = [
    {"image": "img/a.png", "question": "Colour?", "chosen": "Red.", "rejected": "Blue.", "answer_gt": "red"},
    {
        "image": ["img/a.png", "img/wide.png"],
        "question": "<image> vs <image>",
        "chosen": "Same.",
        "rejected": "No.",
    },
    {"question": "2+2?", "chosen": "4", "rejected": "5"},
]


def write_config(tmp_path, model_dir, train_rows, eval_rows=None, **data):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (250, 0, 0)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (128, 64), (0, 0, 250)).save(tmp_path / "img" / "wide.png")
    (tmp_path / "train.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in train_rows)
    )
    meta = {"train": {"root": ".", "annotation": "train.jsonl", "repeat_time": 2, "max_dynamic_patch": 4}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = {"model": {"path": str(model_dir)}, "data": {"meta_path": str(tmp_path / "meta.json"), **data}}
    if eval_rows is not None:
        (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
        cfg["data"]["eval_meta_path"] = str(tmp_path / "eval.jsonl")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_percentiles_nearest_rank():
    rng = np.random.default_rng(0)
    values = rng.integers(1, 500, 1001)
    from collections import Counter

    got = percentiles(Counter(values.tolist()))
    for q in (50, 90, 99):
        assert got[f"p{q}"] == int(np.percentile(values, q, method="inverted_cdf"))
    assert got["max"] == values.max()


def test_check_counts_and_policy(tmp_path, tiny_model_dir, tokenizer, capsys):
    rows = GOOD + ["{broken", {"question": "q", "chosen": "same", "rejected": "same"}]
    cfg = write_config(tmp_path, tiny_model_dir, rows, eval_rows=GOOD[2:])
    rc, out, _ = run(capsys, ["data", "check", "--config", str(cfg), "--json", "--out", str(tmp_path / "o")])
    train, ev = (json.loads(line) for line in out.strip().splitlines())
    assert (
        rc == 1
        and train["ok"] is False
        and "training with data.on_bad_sample=error stops" in train["problem"]
    )
    assert ev["ok"] is True and ev["datasets"]["eval"]["valid_lines"] == 1
    s = train["datasets"]["train"]
    # a.png: 1 tile; the two-image line: a.png 1 tile + wide.png (2x1 + thumbnail at 4 // 2) 3 tiles.
    assert s == {
        "valid_lines": 3,
        "images": 3,
        "tiles": 5,
        "lines": 5,
        "skipped": 2,
        "pairs_after_repeat": 10,
    }
    assert train["skipped"] == {"invalid_json": 1, "chosen_equals_rejected": 1} and train["pairs"] == 10
    # Token lengths: compare with the dataset's own encodings of the three good lines.
    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec

    ds = PairDataset(tmp_path / "train.jsonl", tokenizer, VisionSpec(64, 4), DataConfig(max_dynamic_patch=4))
    lengths = sorted(len(ds[i][0][k]) for i in range(3) for k in ("chosen_input_ids", "rejected_input_ids"))
    assert train["token_lengths"]["max"] == lengths[-1] and train["token_lengths"]["p50"] == lengths[2]
    report = json.loads((tmp_path / "o" / "data_skips.json").read_text())
    assert (
        report["skipped"] == train["skipped"]
        and "train.jsonl:4: not valid JSON" in report["examples"]["invalid_json"][0]
    )
    # The same data passes under skip with a tolerant limit, and fails with a strict one.
    rc, out, _ = run(
        capsys,
        [
            "data",
            "check",
            "--config",
            str(cfg),
            "--json",
            "data.on_bad_sample=skip",
            "data.max_bad_fraction=0.4",
        ],
    )
    assert rc == 0 and json.loads(out.splitlines()[0])["ok"] is True
    rc, out, _ = run(
        capsys,
        ["data", "check", "--config", str(cfg), "data.on_bad_sample=skip", "data.max_bad_fraction=0.3"],
    )
    assert rc == 1 and "2 of 5 samples are bad (40.00%)" in out


def test_inspect_prints_the_pair_as_the_model_sees_it(tmp_path, tiny_model_dir, tokenizer, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, GOOD)
    rc, out, _ = run(capsys, ["data", "inspect", "--config", str(cfg), "--index", "1", "--json"])
    assert rc == 0
    got = json.loads(out)
    assert list(got) == [
        "dataset",
        "line",
        "num_tiles",
        "num_image_tokens",
        "pixel_stats",
        "chosen",
        "rejected",
    ]
    assert got["dataset"] == "train" and got["line"] == 2 and got["num_tiles"] == [1, 3]
    assert got["num_image_tokens"] == 4 * 4  # 4 tiles x 4 tokens per 64px tile of the tiny model
    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec

    pair, _ = PairDataset(tmp_path / "meta.json", tokenizer, VisionSpec(64, 4), DataConfig())[1]
    pv = pair["pixel_values"].double()
    assert got["pixel_stats"]["shape"] == [4, 3, 64, 64]
    # float64 sums of the same float32 pixels: equal up to summation order (≪ 1e-12 relative).
    assert got["pixel_stats"]["sum"] == pytest.approx(float(pv.sum()), rel=1e-12)
    assert got["pixel_stats"]["mean"] == pytest.approx(float(pv.mean()), rel=1e-12)
    assert (
        got["chosen"]["trained_text"] == "Same.<|im_end|>"
        and got["rejected"]["trained_text"] == "No.<|im_end|>"
    )
    assert got["chosen"]["text"].endswith("</img><|im_end|>\n<|im_start|>assistant\nSame.<|im_end|>\n")
    assert got["chosen"]["text"].count("<IMG_CONTEXT>") == 16
    assert got["chosen"]["num_tokens"] == len(pair["chosen_input_ids"])
    rc, out, _ = run(
        capsys,
        ["data", "inspect", "--config", str(cfg), "--index", "all", "--json", "data.system_message=Hi"],
    )
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert rc == 0 and [x["line"] for x in lines] == [1, 2, 3, 1, 2, 3]  # repeat_time 2
    assert lines[2]["pixel_stats"] is None and lines[2]["chosen"]["text"].startswith(
        "<|im_start|>system\nHi<|im_end|>"
    )
    rc, _, err = run(capsys, ["data", "inspect", "--config", str(cfg), "--index", "99", "--json"])
    assert rc == 2 and "out of range" in err


CHILD = """
import contextlib, io, json, sys
import mpo.data.cli, mpo.data.pairs, transformers  # imports are the same for any size: not measured
from mpo.cli import main
from mpo.model.loading import load_tokenizer
load_tokenizer(sys.argv[3])

def hwm_kib():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
base = hwm_kib()
buf = io.StringIO()
if sys.argv[1] == "check":
    with contextlib.redirect_stdout(buf):
        rc = main(["data", "check", "--config", sys.argv[2], "--json"])
else:  # control: what InternVL's loader keeps, every line as a Python object
    rc, rows = 0, [json.loads(x) for x in open(sys.argv[2])]
print(buf.getvalue().strip() or "{}")
print("RC", rc)
print("GROWTH", hwm_kib() - base)
"""


def _peak_growth(mode: str, path, model_dir) -> tuple[int, dict]:
    """Peak RSS growth (KiB) of ``mode`` in a fresh process, measured from after the imports."""
    res = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path), str(model_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == "RC 0", res.stdout + res.stderr
    return int(lines[-1].split()[1]), json.loads(lines[0])


@pytest.mark.slow
def test_check_100k_lines_memory_flat(tmp_path, tiny_model_dir):
    """Peak RSS growth of `mpo data check` at 20k and 100k lines must stay under 50 B/line; the
    same measurement on a list of parsed lines (InternVL's loader) shows the growth it catches."""
    Image.new("RGB", (64, 32), (10, 200, 30)).save(tmp_path / "shared.png")
    peaks, control = {}, {}
    for n in (20_000, 100_000):
        folder = tmp_path / str(n)
        folder.mkdir()
        with open(folder / "d.jsonl", "w") as f:
            for i in range(n):
                row = {
                    "question": f"Question number {i} about the picture?",
                    "chosen": f"Answer {i}.",
                    "rejected": f"Wrong {i}.",
                }
                if i % 100 == 0:
                    row["image"] = "shared.png"
                    row["question"] = f"<image>\nQuestion {i}?"
                f.write(json.dumps(row) + "\n")
        (folder / "meta.json").write_text(json.dumps({"big": {"root": "..", "annotation": "d.jsonl"}}))
        cfg = folder / "cfg.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {"model": {"path": str(tiny_model_dir)}, "data": {"meta_path": str(folder / "meta.json")}}
            )
        )
        peaks[n], summary = _peak_growth("check", cfg, tiny_model_dir)
        assert summary["ok"] and summary["datasets"]["big"]["valid_lines"] == n
        assert summary["datasets"]["big"]["images"] == n // 100
        control[n], _ = _peak_growth("list", folder / "d.jsonl", tiny_model_dir)
    per_line = (peaks[100_000] - peaks[20_000]) * 1024 / 80_000
    control_per_line = (control[100_000] - control[20_000]) * 1024 / 80_000
    print(
        f"check peak growth KiB {peaks} -> {per_line:.1f} B/line; list of lines {control} -> {control_per_line:.1f} B/line"
    )
    assert control_per_line > 200  # the measurement sees per-line memory when there is some
    assert per_line < 50, peaks


def test_unreachable_hub_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """A hub id with no network and no local copy: one `error:` line, not a traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = write_config(tmp_path, "nobody-here/no-such-model", GOOD)
    rc, _, err = run(capsys, ["data", "check", "--config", str(cfg)])
    assert rc == 2
    assert err.startswith(
        "error: model.path nobody-here/no-such-model: no such local folder, and not in the local"
    )
    assert "HF_HUB_OFFLINE is set" in err
    assert "Traceback" not in err


def test_check_fails_when_no_pair_is_usable(tmp_path, tiny_model_dir, capsys):
    """Every pair skipped (here: prompts over max_length) is not a dataset that passes."""
    cfg = write_config(tmp_path, tiny_model_dir, GOOD, max_length=16, on_bad_sample="skip")
    rc, out, _ = run(capsys, ["data", "check", "--config", str(cfg), "--json"])
    res = json.loads(out.splitlines()[0])
    assert rc == 1 and not res["ok"] and res["problem"].startswith("no usable pairs")
