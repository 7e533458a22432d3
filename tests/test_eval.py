"""Benchmarks in VLMEvalKit's TSV layout: the reader (against pandas, as VLMEvalKit reads them),
answer extraction on hand-written cases, scoring, batched generation equal to one-at-a-time,
sharding across ranks, ``mpo eval``, and benchmark metrics during a tiny training run."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from mpo.cli import main
from mpo.data.mmpr import DataError
from mpo.eval import (
    Question,
    accuracy,
    build_prompt,
    extract_choice,
    extract_number,
    read_benchmark,
    score,
)

ROOT = Path(__file__).resolve().parents[1]


def png_b64(color, size=(64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


RED, BLUE = png_b64((250, 0, 0)), png_b64((0, 0, 250), (128, 64))


def write_tsv(path, rows: list[dict]) -> Path:
    """As VLMEvalKit writes its files: pandas, tab-separated, NaN as empty cells."""
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


ROWS = [
    {
        "index": 10,
        "question": "What color is the shape?",
        "hint": "Look closely.\nThe\tshape is centred.",  # a newline and a tab inside a quoted cell
        "A": "red",
        "B": "blue",
        "C": "green",
        "D": "yellow",
        "answer": "A",
        "category": "shape color",
        "image": RED,
    },
    {
        "index": 11,
        "question": "What color is the background?",
        "A": "white",
        "B": "black",
        "C": "gray",
        "answer": "c",  # lower case in the file; letters are compared upper-cased
        "category": "background color",
        "image": "10",  # VLMEvalKit: the index of the row that holds the image
    },
    {"index": 12, "question": "How many shapes?", "answer": "1", "category": "counting", "image": BLUE},
]


def test_reader_matches_pandas_and_resolves_image_references(tmp_path):
    path = write_tsv(tmp_path / "bench.tsv", ROWS)
    bench = read_benchmark(path)
    df = pd.read_csv(path, sep="\t")  # VLMEvalKit's own reading
    assert bench.name == "bench" and len(bench.questions) == len(df) == 3
    for q, (_, row) in zip(bench.questions, df.iterrows()):
        assert q.question == row["question"] and q.index == str(row["index"])
        want = {c: row[c] for c in "ABCD" if c in row and not pd.isna(row[c])}
        assert q.options == want
        assert q.hint == (None if pd.isna(row.get("hint")) else row["hint"])
    a, b, c = bench.questions
    assert a.hint == "Look closely.\nThe\tshape is centred." and a.multiple_choice and a.answer == "A"
    assert b.options == {"A": "white", "B": "black", "C": "gray"} and b.answer == "C"
    assert b.images == [RED] and c.images == [BLUE] and not c.multiple_choice and c.answer == "1"
    assert [q.line for q in bench.questions] == [2, 4, 5]  # the hint's quoted newline spans a line
    # A rank keeps only its shard's images; the questions themselves are all there.
    shard = read_benchmark(path, keep_images=lambda i: i % 2 == 1)
    assert [q.images for q in shard.questions] == [None, [RED], None]
    assert len(read_benchmark(path, limit=2).questions) == 2


def test_image_paths_resolve_against_the_tsv_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    rows = [{"index": 0, "question": "q", "answer": "x", "image_path": "imgs/a.png"}]
    rows.append({"index": 1, "question": "q", "answer": "x", "image_path": "['imgs/a.png', 'imgs/a.png']"})
    q0, q1 = read_benchmark(write_tsv(tmp_path / "p.tsv", rows)).questions
    assert q0.images == [str(tmp_path / "imgs" / "a.png")] and q0.image_kind == "path"
    assert q1.images == [str(tmp_path / "imgs" / "a.png")] * 2


@pytest.mark.parametrize(
    "rows,message",
    [
        (
            [{"index": 0, "question": "q", "A": "x"}],
            r"b.tsv:1: missing column\(s\) answer: .* found columns: index, question, A",
        ),
        (
            [{"index": 0, "question": "q", "A": "x", "B": "y", "answer": "C"}],
            "b.tsv:2: column 'answer' is 'C', not one of the options A, B",
        ),
        (
            [{"index": 0, "question": "q", "answer": "x", "image": "!" * 100}],
            "b.tsv:2: column 'image'\\[0\\]: not base64",
        ),
        (
            [{"index": 0, "question": "q", "answer": "x", "image": "7"}],
            "b.tsv:2: column 'image' refers to index '7', which holds no image",
        ),
        ([{"index": 0, "question": "q", "answer": None}], "b.tsv:2: column 'answer' is empty"),
    ],
)
def test_reader_errors_name_file_line_and_column(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        read_benchmark(write_tsv(tmp_path / "b.tsv", rows))


def test_prompt_layout_follows_internvl_mmbench():
    q = Question("0", "Which?", {"A": "red", "B": "blue"}, "A", hint="Hint text")
    assert build_prompt(q) == (
        "Hint text\nWhich?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    )
    assert build_prompt(Question("1", "How many?", {}, "3")) == (
        "How many?\nAnswer the question using a single word or phrase."
    )
    assert build_prompt(Question("1", "How many?", {}, "3"), open_prompt="") == "How many?"


OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "dark red"}
CHOICES = [
    ("B", "B"),
    ("b", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("[c]", "C"),
    (" C) ", "C"),
    ("B. blue", "B"),
    ("(C) green", "C"),
    ("c. green", "C"),
    ("The answer is B", "B"),
    ("The answer is B because the shape is blue.", "B"),
    ("Answer: (c)", "C"),
    ("the answer is b.", "B"),
    ("The correct option is D.", "D"),
    ("I think (C) is right.", "C"),
    ("It is D", "D"),
    ("The shape is blue.", "B"),  # the option's text instead of its letter
    ("GREEN", "C"),
    ("A green square.", "C"),  # "A" is the article here
    ("dark red", "D"),  # "red" inside the longer "dark red" counts as D
    ("It is dark red, not blue.", None),  # two options named
    ("the answer is a cat", None),  # lower-case "a" is the article
    ("E", None),  # not an option
    ("", None),
    ("\n\n", None),
    ("I cannot tell.", None),
    ("red or blue", None),
]


@pytest.mark.parametrize("prediction,letter", CHOICES, ids=[repr(c[0]) for c in CHOICES])
def test_extract_choice(prediction, letter):
    assert extract_choice(prediction, OPTIONS) == letter


@pytest.mark.parametrize(
    "text,number",
    [
        ("42", 42.0),
        ("There are 3 shapes.", 3.0),
        ("1,234", 1234.0),
        ("It costs $1,234.50 in total", 1234.5),
        ("-3.5", -3.5),
        ("\u22122 degrees", -2.0),
        ("12 cm", 12.0),
        ("first 2, then 7", 7.0),  # the last number
        (".5", 0.5),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize(
    "answer,prediction,correct",
    [
        ("1", "There is 1 shape.", True),
        ("1", "There are 2 shapes.", False),
        ("1,000", "1000", True),
        ("-4", "The result is -4.", True),
        ("12 cm", "12", True),
        ("0.5", "0.50", True),
        ("1", "none", False),
        ("green", "Green.", True),
        ("green", "The shape is green.", True),  # ends with the answer
        ("yes", "Yes, it is.", True),  # begins with it
        ("no", "Not sure.", False),
        ("green", "not green but red", False),
        ("traffic light", "A traffic light.", True),  # articles dropped
        ("['cat', 'kitten']", "A kitten.", True),  # several accepted answers
        ("cat", "", False),
    ],
)
def test_short_answer_scoring(answer, prediction, correct):
    assert score(Question("0", "q", {}, answer), prediction).correct is correct


def test_accuracy_overall_and_per_category():
    qs = [Question(str(i), "q", {"A": "x", "B": "y"}, "A", category=c) for i, c in enumerate("aab")]
    qs.append(Question("3", "q", {"A": "x", "B": "y"}, "B", category="b/c d"))
    scored = [score(q, p) for q, p in zip(qs, ["A", "B", "x", "nothing"])]
    got = accuracy(qs, scored)
    assert got == {
        "accuracy": 2 / 4,
        "answered": 3 / 4,
        "accuracy/a": 1 / 2,
        "accuracy/b": 1.0,
        "accuracy/b_c_d": 0.0,
    }


# ---- with a model --------------------------------------------------------------------------------
@pytest.fixture
def bench_file(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows.append({"index": 13, "question": "Say hi.", "answer": "hi", "category": "text"})  # no image
    rows.append({**ROWS[0], "index": 14, "image": BLUE, "answer": "B"})
    return write_tsv(tmp_path / "mini.tsv", rows)


def _runner(model_dir, batch_size, max_new_tokens=6):
    from mpo.data.template import TemplateEncoder
    from mpo.data.tiling import VisionSpec
    from mpo.eval_model import BenchmarkRunner, EvalSettings
    from mpo.model.loading import load_model, load_tokenizer

    model = load_model(str(model_dir), "float32", "sdpa")
    tok = load_tokenizer(str(model_dir))
    settings = EvalSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, max_dynamic_patch=4)
    runner = BenchmarkRunner(tok, VisionSpec.from_config(model.config), TemplateEncoder(tok), settings)
    return runner, model


def test_batched_answers_equal_one_at_a_time_and_a_plain_greedy_decode(tiny_model_dir, bench_file):
    """Left-padded batches give each question the answer it gets alone; alone, the answer is the
    argmax of a full forward per token (no cache); the mode is restored."""
    one, model = _runner(tiny_model_dir, 1)
    many, _ = _runner(tiny_model_dir, 3)
    bench = read_benchmark(bench_file)
    model.train()
    alone = one.answer(model, bench)
    assert model.training
    assert many.answer(model, bench) == alone
    prompt, tiles = one.encode(bench, bench.questions[0])
    ids = torch.tensor([prompt])
    model.eval()
    with torch.no_grad():
        for _ in range(6):
            nxt = (
                model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=tiles)
                .logits[0, -1]
                .argmax()
            )
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == one.encoder.eos_id:
                break
    new = ids[0, len(prompt) :].tolist()
    assert alone[0].num_tokens == len(new)
    assert alone[0].text == one.tokenizer.decode(
        [t for t in new if t != one.encoder.eos_id], skip_special_tokens=True
    )
    assert alone[0].hit_limit == (one.encoder.eos_id not in new)


def test_ranks_answer_their_shard_in_the_same_number_of_calls(tiny_model_dir, bench_file, monkeypatch):
    """Two simulated ranks (answers gathered by hand): each answers questions i % 2 == rank, under
    synced generation both make the same number of generate calls (rank 1, one question short,
    adds a stand-in), and the merged answers are those of one process."""
    import mpo.eval_model as em

    runner, model = _runner(tiny_model_dir, 2)
    whole = runner.answer(model, read_benchmark(bench_file))
    locals_, calls = {}, {}
    real = runner.generate
    for rank in (0, 1):
        bench = read_benchmark(bench_file, keep_images=lambda i, r=rank: i % 2 == r)
        monkeypatch.setattr(
            em, "gather_answers", lambda local, total, world, r=rank: locals_.setdefault(r, local)
        )
        counted = []
        monkeypatch.setattr(
            runner,
            "generate",
            lambda m, prompts, synced, c=counted, g=real: (
                c.append(len(prompts)) or g(m, prompts, False)
            ),  # no process group here
        )
        runner.answer(model, bench, rank, 2, synced=True)
        calls[rank] = counted
    assert [i for i, _ in locals_[0]] == [0, 2, 4] and [i for i, _ in locals_[1]] == [1, 3]
    assert len(calls[0]) == len(calls[1]) == 2  # ceil(ceil(5 / 2) / 2)
    assert calls[1][-1] == 1  # the stand-in
    merged = dict(locals_[0] + locals_[1])
    assert [merged[i] for i in range(5)] == whole


def test_mpo_eval_cli(tiny_model_dir, bench_file, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    args = ["eval", "--model", str(tiny_model_dir), "--benchmark", str(bench_file), "--max-new-tokens", "4"]
    assert main([*args, "--batch-size", "2", "--max-dynamic-patch", "4", "--out", str(out), "--json"]) == 0
    (res,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert res["benchmark"] == "mini" and res["questions"] == 5
    assert 0 <= res["accuracy"] <= 1 and "accuracy/shape_color" in res and "limit_share" in res
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == ["10", "11", "12", "13", "14"]
    # The logged score is the one re-computed from the logged answer.
    bench = read_benchmark(bench_file)
    for q, r in zip(bench.questions, rows):
        assert r["correct"] == score(q, r["prediction"]).correct and r["num_tokens"] <= 4
    assert sum(r["correct"] for r in rows) / 5 == res["accuracy"]
    assert main(["eval", "--model", str(tiny_model_dir), "--benchmark", str(tmp_path / "nope.tsv")]) == 2
    assert "nope.tsv: benchmark file not found" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER = """
import json, os, sys
import torch.distributed as dist
from tests.test_eval import _runner
from mpo.eval import read_benchmark
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo")
runner, model = _runner(sys.argv[1], 2)
bench = read_benchmark(sys.argv[2], keep_images=lambda i: i % world == rank)
answers = runner.answer(model, bench, rank, world, synced=True)
print(json.dumps([a.__dict__ for a in answers]))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_gather_every_answer(tiny_model_dir, bench_file):
    """Two real processes with ``synced_gpus`` generation and ``all_gather_object``: both end with
    every answer, equal to one process's."""
    import subprocess

    runner, model = _runner(tiny_model_dir, 2)
    want = [a.__dict__ for a in runner.answer(model, read_benchmark(bench_file))]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    env["PYTHONPATH"] = str(ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tiny_model_dir), str(bench_file)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == want


@pytest.mark.slow
def test_benchmark_metrics_during_training_and_in_the_report(tiny_config, bench_file):
    """A tiny run with a benchmark at steps 0, 2 and 4: metrics.jsonl, benchmarks.jsonl, the
    repetition numbers of the sampled answers, and the report's plots and findings."""
    from mpo.report import write_report
    from mpo.run import run_training

    cfg = tiny_config(
        f"training.eval_benchmarks=[{bench_file}]",
        "training.eval_benchmark_steps=2",
        "training.eval_benchmark_max_new_tokens=4",
        "training.eval_benchmark_batch_size=2",
        "training.sample_steps=2",
        "training.sample_num_prompts=2",
        "training.sample_max_new_tokens=4",
        "training.save_steps=100",
        "training.eval_strategy=no",
    )
    run_training(cfg)
    out = Path(cfg.training["output_dir"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Answering changes nothing in training, and every step keeps its own log (logging_steps=1):
    # the same losses and δ, bit for bit, as a run without benchmarks or samples.
    plain = tiny_config(
        "training.save_steps=100", "training.eval_strategy=no", f"training.output_dir={out}-plain"
    )
    run_training(plain)
    plain_rows = [json.loads(x) for x in Path(f"{out}-plain/metrics.jsonl").read_text().splitlines()]

    def train_logs(rs):
        return [
            (r["step"], r["loss"], r["bco/delta"]) for r in rs if "loss" in r and "train_runtime" not in r
        ]

    assert [s for s, _, _ in train_logs(rows)] == [1, 2, 3, 4] and train_logs(rows) == train_logs(plain_rows)
    bench_rows = [r for r in rows if "bench/mini/accuracy" in r]
    assert [r["step"] for r in bench_rows] == [0, 2, 4]
    for r in bench_rows:
        assert 0 <= r["bench/mini/accuracy"] <= 1 and "bench/mini/accuracy/counting" in r
        assert {"bench/mini/limit_share", "bench/mini/longest_run"} <= set(r)
    assert [r["step"] for r in rows if "samples/limit_share" in r] == [0, 2, 4]
    answers = [json.loads(x) for x in (out / "benchmarks.jsonl").read_text().splitlines()]
    assert len(answers) == 3 * 5 and {a["step"] for a in answers} == {0, 2, 4}
    last = [a for a in answers if a["step"] == 4]
    assert math.isclose(sum(a["correct"] for a in last) / 5, bench_rows[-1]["bench/mini/accuracy"])
    rep = write_report(out)
    assert "bench_mini" in rep.plots and "repetition" in rep.plots
    assert any(f.check == "benchmarks" for f in rep.findings)


@pytest.mark.slow
def test_zero3_ranks_answer_the_benchmark_like_one_process(tiny_model_dir, demo_data, bench_file, tmp_path):
    """Under the deepspeed launcher with ZeRO-3 (parameters sharded: every rank must join every
    forward), two ranks answer their halves of the benchmark (one text-only question, so one
    rank needs a stand-in image) and log exactly the answers of one process at step 0."""
    from test_distributed import _deepspeed, _train  # tests/ is on sys.path under pytest

    common = [
        f"model.path={tiny_model_dir}",
        f"data.meta_path={demo_data['train']}",
        "data.eval_meta_path=null",
        "training.max_steps=1",
        "training.save_steps=100",
        "training.eval_strategy=no",
        "training.sample_steps=0",
        "training.disable_tqdm=true",
        "training.dataloader_num_workers=0",
        f"training.eval_benchmarks=[{bench_file}]",
        "training.eval_benchmark_batch_size=1",  # no padding: the same arithmetic per question
        "training.eval_benchmark_max_new_tokens=4",
    ]
    one, two = tmp_path / "one", tmp_path / "zero3"
    _train(
        [
            *common,
            "training.per_device_train_batch_size=2",
            "training.use_cpu=true",
            f"training.output_dir={one}",
        ]
    )
    _train(
        [
            *common,
            "training.per_device_train_batch_size=1",
            _deepspeed("zero3"),
            f"training.output_dir={two}",
        ],
        ranks=2,
    )

    def step0(run):
        rows = [json.loads(x) for x in (run / "benchmarks.jsonl").read_text().splitlines()]
        return [(r["index"], r["prediction"], r["num_tokens"]) for r in rows if r["step"] == 0]

    assert len(step0(one)) == 5 and step0(two) == step0(one)
    metrics = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "bench/mini/accuracy" in r] == [0, 1]
