"""``mpo pairs``: answer judging on hand-written cases, pairs by correctness (and that ``mpo data check``
takes them), prompts-file errors, shard resume, deterministic sampling (resumed = uninterrupted =
two ranks), the sampling prompt equal to training's, and DropoutNTP continuing without the image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mpo.cli import main
from mpo.construct.build import pick_pairs
from mpo.construct.judge import AnswerJudge, parse_options
from mpo.construct.prompts import read_prompts
from mpo.construct.store import MANIFEST, drop_torn_tail, read_shards, shard_path
from mpo.data.mmpr import DataError

ROOT = Path(__file__).resolve().parents[1]
MC = "Which colour is the shape?\nA. red\nB. blue\nC. dark green\nD. green"

# (question, answer_gt, answer, what is read, right?)
JUDGE_CASES = [
    # option letters, in the phrasings models use
    (MC, "B", "B", "B", True),
    (MC, "B", "(b)", "B", True),
    (MC, "B", "B.", "B", True),
    (MC, "B", "The answer is B.", "B", True),
    (MC, "B", "Answer: (B)", "B", True),
    (MC, "B", "B. blue", "B", True),
    (MC, "B", "I think the correct option is B, since it is cold.", "B", True),
    (MC, "B", "**B**", "B", True),
    (MC, "B", "Final answer: blue", "B", True),  # the option named by its text
    (MC, "B", "The shape is blue.", "B", True),
    (MC, "B", "The answer is C", "C", False),
    (MC, "B", "A red circle.", "A", False),  # "A" the article: read as the option text "red"
    (MC, "D", "green", "D", True),
    (MC, "C", "It is dark green.", "C", True),  # "green" inside "dark green" is the longer option
    (MC, "blue", "B", "B", True),  # answer_gt given as the option's text
    (MC, "B", "It could be A or B.", None, False),  # two letters: no answer
    (MC, "B", "I cannot tell.", None, False),
    (MC, "B", "", None, False),
    # numbers: separators, units, signs, a cue before the reasoning
    ("How many apples?", "1234", "There are 1,234 apples.", "1234", True),
    ("How long?", "12", "12 cm", "12", True),
    ("How long?", "12 cm", "It is 12 centimetres.", "12", True),
    ("Cost?", "1234.5", "$1,234.50", "1234.5", True),
    ("Temperature?", "-3.5", "It is −3.5 °C", "-3.5", True),  # U+2212 minus
    ("Temperature?", "-5", "The answer is -5 degrees.", "-5", True),
    ("Temperature?", "-5", "The answer is 5", "5", False),  # the sign matters
    ("N?", "12", "The answer is 12 because 3 times 4 is 12, not 4.", "12", True),
    ("N?", "7", "First 3, then 4 more. Final answer: 7", "7", True),
    ("N?", "7", "First 3, then 4 more, so 7.", "7", True),  # no cue: the last number
    ("N?", "0.5", "It is .5", "0.5", True),
    ("N?", "3", "I don't know.", None, False),
    ("pi?", "3.1416", "about 3.14", "3.14", False),  # exact by default
    # short text
    ("What color is the shape?", "red", "The shape is red.", "shape is red", True),
    ("What color is the shape?", "red", "RED", "red", True),
    ("What color is the shape?", "red", "It is not red, it is blue.", "it is not red it is blue", False),
    ("What color is the shape?", "red", "Answer: red", "red", True),
    ("What color is the shape?", "red", "", None, False),
]


@pytest.mark.parametrize("question,gt,answer,read,right", JUDGE_CASES)
def test_judge_reads_the_final_answer(question, gt, answer, read, right):
    got = AnswerJudge().judge(question, gt, answer)
    assert (got.extracted, got.correct) == (read, right)


def test_judge_number_tolerance():
    # |3.14 - 3.1416| / 3.1416 = 5.1e-4: inside rel_tol 1e-3, outside 1e-4.
    assert AnswerJudge(rel_tol=1e-3).judge("pi?", "3.1416", "3.14").correct
    assert not AnswerJudge(rel_tol=1e-4).judge("pi?", "3.1416", "3.14").correct
    assert AnswerJudge(abs_tol=0.5).judge("N?", "10", "10.4 m").correct


def test_parse_options():
    assert parse_options(MC) == {"A": "red", "B": "blue", "C": "dark green", "D": "green"}
    assert parse_options("Pick:\n(A) cat\n(B) dog") == {"A": "cat", "B": "dog"}
    assert parse_options("Step B. then C.") == {}  # not a list starting at A
    assert parse_options("A. only one") == {}


def test_pick_pairs_uses_answers_evenly_and_caps():
    pairs = pick_pairs(["c0", "c1"], ["w0", "w1", "w2"], cap=6)
    assert pairs[:3] == [("c0", "w0"), ("c1", "w1"), ("c0", "w2")]  # every wrong answer before repeats
    assert len(set(pairs)) == 6  # then the rest of the 2 x 3 combinations, none twice
    assert pick_pairs(["c0", "c1"], ["w0", "w1", "w2"], cap=2) == [("c0", "w0"), ("c1", "w1")]


# ---- hand-written samples folders ------------------------------------------------------------
def write_images(root: Path) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (250, 0, 0)).save(root / "img" / "red.png")
    Image.new("RGB", (128, 64), (0, 0, 250)).save(root / "img" / "blue.png")


def write_samples(folder: Path, root: Path, prompts: list[tuple[dict, list[str]]], **manifest) -> Path:
    """A folder as `mpo pairs sample` writes it, with the given answers."""
    folder.mkdir(parents=True)
    base = {"prompts": str(root / "prompts.jsonl"), "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    base |= {"max_new_tokens": 16, "batch_size": 2, "seed": 0}
    (folder / MANIFEST).write_text(json.dumps(base | manifest))
    rows = []
    for i, (record, answers) in enumerate(prompts):
        row = {"key": f"shapes/line{i + 1}", "index": i, "dataset": "shapes", "line": i + 1, "chunk": i // 2}
        row |= {"root": str(root), "max_dynamic_patch": 4, "record": record}
        row["samples"] = [{"text": a, "num_tokens": 5, "hit_limit": False} for a in answers]
        rows.append(json.dumps(row))
    # Written in another order than the prompts': build sorts by prompt.
    shard_path(folder, 1).write_text("".join(r + "\n" for r in rows[1::2]))
    shard_path(folder, 0).write_text("".join(r + "\n" for r in rows[0::2]))
    return folder


RED = {"image": "img/red.png", "question": "<image>\nWhat color is the shape?", "answer_gt": "red"}
BLUE = {"image": "img/blue.png", "question": "What color is the shape?", "answer_gt": "blue", "id": "b"}
SAMPLES = [
    (RED, ["The shape is red.", "The shape is blue.", "The shape is red. ", "Red", " ", "It is green."]),
    (BLUE, ["The shape is blue.", "blue"]),  # all right
    ({**RED, "answer_gt": "green"}, ["The shape is red.", "It is blue."]),  # all wrong
    ({"question": "Describe the image.", "image": "img/red.png"}, ["A red square."]),  # no answer_gt
    ({"question": "How many?", "answer_gt": "3"}, ["3", "I cannot count.", "4"]),  # text only
]


def test_build_correctness_pairs_report_and_data_check(tmp_path, tiny_model_dir, capsys):
    write_images(tmp_path)
    samples = write_samples(tmp_path / "samples", tmp_path, SAMPLES)
    out = tmp_path / "pairs"
    rc = main(["pairs", "build", "--correctness", "--samples", str(samples), "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    lines = [json.loads(x) for x in (out / "shapes.jsonl").read_text().splitlines()]
    got = [(x["prompt_key"], x["chosen"], x["rejected"]) for x in lines]
    assert got == [
        # right: "The shape is red." (its repeat with a trailing space counted once), "Red";
        # wrong: "The shape is blue.", "It is green."; cap 3
        ("shapes/line1", "The shape is red.", "The shape is blue."),
        ("shapes/line1", "Red", "It is green."),
        ("shapes/line1", "The shape is red.", "It is green."),
        ("shapes/line5", "3", "I cannot count."),  # no number read: rejected by default
        ("shapes/line5", "3", "4"),
    ]
    assert lines[0]["image"] == "img/red.png" and lines[0]["answer_gt"] == "red"
    s = report["datasets"]["shapes"]
    assert (
        s["prompts"] == 5 and s["samples"] == 14 and s["duplicate_samples"] == 1 and s["empty_samples"] == 1
    )
    assert s["pairs"] == 5 and s["prompts_with_pairs"] == 2
    assert s["no_pair"] == {"all_correct": 1, "all_wrong": 1, "no_answer_gt": 1}
    assert s["extraction_failures"] == 1 and s["failure_examples"][0]["answer"] == "I cannot count."
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {
        "shapes": {
            "root": str(tmp_path),
            "annotation": "shapes.jsonl",
            "max_dynamic_patch": 4,
            "repeat_time": 1,
            "length": 5,
        }
    }
    # `mpo data check` takes the output as it is.
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"model": {"path": str(tiny_model_dir)}, "data": {"meta_path": str(out / "meta.json")}}
        )
    )
    assert main(["data", "check", "--config", str(cfg), "--json"]) == 0
    checked = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert checked["ok"] and checked["datasets"]["shapes"]["valid_lines"] == 5

    # --unanswered drop: the answer with no number is left out, so line 5 gives one pair.
    rc = main(
        [
            "pairs",
            "build",
            "--correctness",
            "--samples",
            str(samples),
            "--out",
            str(tmp_path / "p2"),
            "--unanswered",
            "drop",
            "--max-pairs-per-prompt",
            "1",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["total"]["pairs"] == 2


def test_build_with_a_judge_of_your_own(tmp_path, monkeypatch, capsys):
    write_images(tmp_path)
    (tmp_path / "my_judges.py").write_text(
        "def longer(record, answer):\n"
        "    if 'pass' in answer:\n"
        "        return None\n"
        "    return len(answer) > 6\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    samples = write_samples(tmp_path / "samples", tmp_path, [(RED, ["short", "much longer", "pass"])])
    out = tmp_path / "pairs"
    argv = ["pairs", "build", "--correctness", "--samples", str(samples), "--out", str(out), "--judge"]
    assert main([*argv, "my_judges:longer", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    lines = [json.loads(x) for x in (out / "shapes.jsonl").read_text().splitlines()]
    assert [(x["chosen"], x["rejected"]) for x in lines] == [
        ("much longer", "short"),
        ("much longer", "pass"),
    ]
    assert report["total"]["extraction_failures"] == 1
    assert main([*argv, "my_judges:nothing"]) == 2
    assert "has no 'nothing'" in capsys.readouterr().err
    sys.modules.pop("my_judges", None)


def test_build_with_no_pair_says_why(tmp_path, capsys):
    write_images(tmp_path)
    samples = write_samples(tmp_path / "samples", tmp_path, [(RED, ["The shape is red."])])
    rc = main(["pairs", "build", "--correctness", "--samples", str(samples), "--out", str(tmp_path / "o")])
    assert (
        rc == 2
        and "no prompt gave a pair" in capsys.readouterr().err
        and "all_correct" in (tmp_path / "o" / "report.json").read_text()
    )


# ---- prompts files and shards ----------------------------------------------------------------
@pytest.mark.parametrize(
    "line,message",
    [
        ({"image": "img/red.png"}, "field 'question' must be a non-empty string, got missing"),
        ({"question": "Q?", "answer_gt": ["red"]}, "field 'answer_gt' must be a string or a number"),
        ({"question": "Q?", "answer_gt": " "}, "field 'answer_gt' is empty"),
        ({"question": "Q?", "id": 1.5}, "field 'id' must be a string or an integer"),
        ({"question": "Q?", "image": "img/none.png"}, "field 'image': file not found"),
        ({"question": "Q?", "image": "../red.png"}, "escapes the dataset root"),
        ({"question": "Q?", "image": {"bytes": "xx"}}, "field 'image' must be a file path"),
        ({"question": "Q?", "id": "a"}, "field 'id': 'p/a' is also the key of"),
    ],
)
def test_bad_prompt_lines_name_file_line_and_field(tmp_path, line, message):
    write_images(tmp_path)
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"question": "Q?", "id": "a", "image": "img/red.png"}) + "\n" + json.dumps(line) + "\n"
    )
    with pytest.raises(DataError, match=message) as exc:
        read_prompts(path)
    assert f"{path}:2" in str(exc.value)


def test_prompt_keys_from_meta_and_lines(tmp_path):
    write_images(tmp_path)
    (tmp_path / "a.jsonl").write_text(json.dumps(RED) + "\n\n" + json.dumps(BLUE) + "\n")
    (tmp_path / "meta.json").write_text(
        json.dumps({"colours": {"root": ".", "annotation": "a.jsonl", "max_dynamic_patch": 2}})
    )
    prompts = read_prompts(tmp_path / "meta.json")
    assert [p.key for p in prompts] == ["colours/line1", "colours/b"]
    assert prompts[1].line == 3 and prompts[0].spec.max_dynamic_patch == 2 and prompts[1].answer_gt == "blue"


# The same multi-turn prompt with its image, system prompt and ground truth, in each format; every
# one must read as the MMPR prompt record WANT.
WANT = {
    "question": "<image>\nWhat colour is it?",
    "image": "img/red.png",
    "history": [["Hi", "Hello"]],
    "system": "Be brief.",
    "answer_gt": "red",
    "id": "q1",
}
OTHER_FORMAT_PROMPTS = {
    "trl_string_completion": {
        "prompt": "<image>\nWhat colour is it?",
        "completion": "red",
        "images": ["img/red.png"],
        "id": "q1",
    },
    "trl_messages": {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        ],
        "completion": [{"role": "assistant", "content": "red"}],
        "images": ["img/red.png"],
        "id": "q1",
    },
    "sharegpt_sft": {  # SFT data: the final assistant turn is the ground truth
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "red"},
        ],
        "system": "Be brief.",
        "images": ["img/red.png"],
        "id": "q1",
    },
    "alpaca": {
        "instruction": "<image>",
        "input": "What colour is it?",
        "output": "red",
        "history": [["Hi", "Hello"]],
        "system": "Be brief.",
        "images": ["img/red.png"],
        "id": "q1",
    },
    "swift_open_prompt_with_answer_gt": {  # ends with the user turn; the ground truth given apart
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "<image>\nWhat colour is it?"},
        ],
        "answer_gt": "red",
        "images": ["img/red.png"],
        "id": "q1",
    },
}


@pytest.mark.parametrize("name", list(OTHER_FORMAT_PROMPTS))
def test_prompts_in_other_formats_read_as_the_mmpr_prompt(tmp_path, name):
    write_images(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps(OTHER_FORMAT_PROMPTS[name]) + "\n")
    (prompt,) = read_prompts(tmp_path / "p.jsonl")
    # A string prompt has no earlier turns or system prompt to carry.
    single_turn = name == "trl_string_completion"
    want = {k: v for k, v in WANT.items() if not (single_turn and k in ("history", "system"))}
    assert prompt.record == want and prompt.key == "p/q1" and prompt.answer_gt == "red"


def test_prompts_in_no_known_format_name_the_fields(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"query": "Q?", "response": "A"}) + "\n")
    with pytest.raises(
        DataError, match="field .question. .* got missing .*trl: prompt.*found fields: query, response"
    ) as exc:
        read_prompts(tmp_path / "p.jsonl")
    assert f"{tmp_path / 'p.jsonl'}:1" in str(exc.value)
    (tmp_path / "q.jsonl").write_text(json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"q.jsonl:1: field 'messages'\[0\]: tool turns .*\(swift record\)"):
        read_prompts(tmp_path / "q.jsonl")


def test_torn_last_line_is_cut_and_keys_are_unique(tmp_path):
    path = shard_path(tmp_path, 0)
    path.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "sam')
    assert set(read_shards(tmp_path)) == {"a", "b"}  # a torn line is not a done prompt
    assert drop_torn_tail(path) == len('{"key": "c", "sam') and path.read_text().endswith('"b"}\n')
    assert drop_torn_tail(path) == 0
    shard_path(tmp_path, 1).write_text('{"key": "b"}\n')
    with pytest.raises(DataError, match="prompt 'b' is also in"):
        read_shards(tmp_path)


def test_sampling_prompt_is_the_training_prompt(tiny_model_dir, tokenizer, tmp_path):
    """What `sample` feeds the model is the prompt part of the training sequence, tiles included."""
    from mpo.config import DataConfig
    from mpo.data.pairs import PairEncoder
    from mpo.model.loading import load_vision_spec

    write_images(tmp_path)
    rows = [
        {**BLUE, "chosen": "Blue.", "rejected": "Red."},  # wide image: 2x1 tiles + thumbnail
        {**RED, "chosen": "Red.", "rejected": "Blue.", "system": "Be brief.", "history": [["Hi", "Hello"]]},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = PairEncoder(tokenizer, load_vision_spec(str(tiny_model_dir)), DataConfig(max_dynamic_patch=4))
    for prompt in read_prompts(tmp_path / "p.jsonl"):
        pair, _ = encoder.encode(prompt.spec, prompt.line, prompt.record)
        got = encoder.encode_prompt(prompt.spec, prompt.line, prompt.record, answer_room=16)
        n = len(got["input_ids"])
        # encode_answer's ids start with the assistant prefix: the training sequence's first n ids.
        assert got["input_ids"] == pair["chosen_input_ids"][:n].tolist()
        assert got["num_tiles"] == pair["num_tiles"] and got["pixel_values"].equal(pair["pixel_values"])


# ---- sampling with the tiny model ------------------------------------------------------------
def sample_config(tmp_path, model_dir) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(model_dir)}, "data": {"max_dynamic_patch": 4}}))
    return cfg


def sample_argv(cfg, prompts, out, *extra):
    return [
        "pairs",
        "sample",
        "--config",
        str(cfg),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--num-samples",
        "3",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--temperature",
        "1.5",
        *extra,
    ]


@pytest.mark.slow
def test_sampling_is_deterministic_and_resumes_exactly(
    tmp_path, tiny_model_dir, demo_data, monkeypatch, capsys
):
    prompts = Path(demo_data["train"]).parent / "eval.jsonl"  # 16 demo prompts with answer_gt
    cfg = sample_config(tmp_path, tiny_model_dir)
    whole = tmp_path / "whole"
    assert main(sample_argv(cfg, prompts, whole)) == 0
    first = read_shards(whole)
    assert len(first) == 16 and all(len(r["samples"]) == 3 for r in first.values())
    texts = [s["text"] for r in first.values() for s in r["samples"]]
    assert len(set(texts)) > 1  # sampled, not greedy copies

    # Interrupted after 2 chunks, killed in the middle of the next write, resumed: the same output.
    resumed = tmp_path / "resumed"
    assert main(sample_argv(cfg, prompts, resumed, "--max-chunks", "2")) == 0
    assert len(read_shards(resumed)) == 4
    with open(shard_path(resumed, 0), "a") as f:
        f.write('{"key": "eval/line5", "samples": [{"te')
    assert main(sample_argv(cfg, prompts, resumed)) == 0
    assert "4 already sampled, 12 sampled now" in capsys.readouterr().out
    assert read_shards(resumed) == first
    assert main(sample_argv(cfg, prompts, resumed)) == 0  # a rerun adds nothing
    assert "16 already sampled, 0 sampled now" in capsys.readouterr().out
    assert sum(1 for _ in open(shard_path(resumed, 0))) == 16

    # Two processes under torchrun, each its own chunks and shard: the same samples.
    ranks = tmp_path / "ranks"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
    done = subprocess.run(
        [*torchrun, "-m", "mpo.cli", *sample_argv(cfg, prompts, ranks)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert shard_path(ranks, 1).is_file() and read_shards(ranks) == first

    # Another seed: other samples; other settings into the same folder: refused.
    other = tmp_path / "other"
    assert main(sample_argv(cfg, prompts, other, "--seed", "1")) == 0
    assert [r["samples"] for r in read_shards(other).values()] != [r["samples"] for r in first.values()]
    assert main(sample_argv(cfg, prompts, whole, "--seed", "1")) == 2
    assert "seed: 0 in the folder, 1 now" in capsys.readouterr().err

    # The same samples give the same pairs (the random model is never right about the colour, so a
    # judge that accepts any answer of three tokens or more makes pairs out of them).
    (tmp_path / "j.py").write_text("def long(record, answer):\n    return len(answer) >= 12\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    built = []
    for folder in (whole, resumed, ranks):
        out = tmp_path / f"pairs-{folder.name}"
        main(
            [
                "pairs",
                "build",
                "--correctness",
                "--samples",
                str(folder),
                "--out",
                str(out),
                "--judge",
                "j:long",
            ]
        )
        built.append((out / "eval.jsonl").read_text())
    assert built[0] == built[1] == built[2] and built[0].count("\n") > 0
    sys.modules.pop("j", None)


# ---- DropoutNTP ------------------------------------------------------------------------------
class SpyGenerator:
    """Passes calls to the real generator and keeps what it was given."""

    def __init__(self, inner):
        self.inner, self.tokenizer, self.calls = inner, inner.tokenizer, []

    def sample(self, prompts, settings, seed, n=None):
        self.calls.append(prompts)
        return self.inner.sample(prompts, settings, seed, n)


@pytest.mark.slow
def test_dropout_ntp_continues_the_cut_answer_without_the_image(tmp_path, tiny_model_dir, capsys):
    from mpo.config import load_config
    from mpo.construct.dropout_ntp import DropoutSettings, blind_prompt, build_dropout_ntp
    from mpo.construct.judge import AnswerJudge
    from mpo.construct.sample import load_generator
    from mpo.data.template import IMAGE_TOKENS

    write_images(tmp_path)
    long_answer = "The shape in the middle of the picture is a bright red circle on white."
    open_ended = {"image": "img/blue.png", "question": "Describe <image> briefly.", "id": "d"}
    samples = write_samples(
        tmp_path / "samples",
        tmp_path,
        [
            (open_ended, [long_answer]),
            (RED, ["The shape is blue.", "Red, and round like a ball on a table."]),  # only the right one
            ({**RED, "answer_gt": "green"}, ["The shape is red."]),  # no right answer
        ],
    )
    cfg = load_config(None, [f"model.path={tiny_model_dir}"], check=False)
    inner, encoder = load_generator(cfg)
    spy = SpyGenerator(inner)
    report = build_dropout_ntp(
        cfg, samples, tmp_path / "out", DropoutSettings(cut_ratio=0.5), AnswerJudge(), spy
    )

    template = encoder.template
    (prompts,) = spy.calls  # one batch of two (batch_size 2 in the manifest)
    image_ids = set(template.image_token_ids.values())
    assert len(image_ids) == len(IMAGE_TOKENS)
    lines = [json.loads(x) for x in (tmp_path / "out" / "shapes.jsonl").read_text().splitlines()]
    assert [x["prompt_key"] for x in lines] == ["shapes/line1", "shapes/line2"]
    for (ids, tiles), record, chosen, line in zip(
        prompts, [open_ended, RED], [long_answer, "Red, and round like a ball on a table."], lines
    ):
        assert tiles is None and not image_ids & set(ids)  # no pixels, no image tokens
        answer_ids = template.tokenizer(chosen, add_special_tokens=False)["input_ids"]
        cut = answer_ids[: len(answer_ids) // 2]
        prefix = blind_prompt(template, record)
        assert ids == prefix + cut  # the prompt without its image, then the first half of the answer
        assert "<image>" not in template.tokenizer.decode(prefix)
        kept = template.tokenizer.decode(cut)
        assert (
            line["chosen"] == chosen
            and line["rejected"].startswith(kept.strip())
            and line["rejected"] != chosen
        )
        assert line["image"] == record["image"]  # the pair itself keeps its image for training
    assert report["datasets"]["shapes"]["no_pair"] == {"no_right_answer": 1}

    # The command: the same samples and seed give the same pairs.
    config = sample_config(tmp_path, tiny_model_dir)
    argv = ["pairs", "build", "--dropout-ntp", "--samples", str(samples), "--out", str(tmp_path / "cli")]
    assert main([*argv, "--config", str(config)]) == 0
    assert (tmp_path / "cli" / "shapes.jsonl").read_text() == (tmp_path / "out" / "shapes.jsonl").read_text()


@pytest.mark.slow
def test_a_prompt_that_cannot_be_encoded_stops_or_is_recorded(tmp_path, tiny_model_dir, capsys):
    write_images(tmp_path)
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(RED) + "\n" + json.dumps({**RED, "image": "img/broken.png"}) + "\n")
    cfg = sample_config(tmp_path, tiny_model_dir)
    assert main(sample_argv(cfg, prompts, tmp_path / "a")) == 2
    assert f"{prompts}:2: field 'image': cannot decode image" in capsys.readouterr().err
    assert main([*sample_argv(cfg, prompts, tmp_path / "b"), "data.on_bad_sample=skip"]) == 0
    assert "1 could not be encoded" in capsys.readouterr().out
    rows = read_shards(tmp_path / "b")
    assert rows["p/line2"]["reason"] == "corrupt_image" and len(rows["p/line1"]["samples"]) == 3
    argv = ["pairs", "build", "--correctness", "--samples", str(tmp_path / "b"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2  # the random model is never right: no pair, and the report says why
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["total"]["no_pair"] == {"all_wrong": 1, "not_sampled:corrupt_image": 1}
