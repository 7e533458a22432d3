"""Other projects' preference formats (TRL, LLaMA-Factory, ms-swift): each read directly and after
``mpo data convert`` gives exactly the pairs of the same data written as MMPR; bad records get one
error naming file, line, the fields expected and the ones found; JSON array files are indexed."""

from __future__ import annotations

import base64
import json
import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mpo.cli import main
from mpo.config import DataConfig
from mpo.data.formats import LlamaFactoryColumns, detect, read_llamafactory, read_swift, read_trl
from mpo.data.mmpr import DataError, JsonArrayFile, json_array_index, read_meta
from mpo.data.pairs import PairDataset
from mpo.data.template import IGNORE_INDEX, TemplateEncoder
from mpo.data.tiling import VisionSpec

VISION = VisionSpec(image_size=28, tokens_per_tile=2)
CFG = DataConfig(max_dynamic_patch=4)

# The reference pairs, as MMPR lines: one image without a placeholder, two images with theirs,
# text only, and a multi-turn prompt with its own system message and the image in the first turn.
MMPR = [
    {"image": "img/a.png", "question": "What colour?", "chosen": "Red.", "rejected": "Blue."},
    {
        "image": ["img/a.png", "img/wide.png"],
        "question": "<image>\nversus\n<image>\nSame?",
        "chosen": "No.",
        "rejected": "Yes.",
    },
    {"question": "2+2?", "chosen": "4", "rejected": "5"},
    {
        "image": "img/a.png",
        "history": [["<image>\nDescribe it.", "A red square."]],
        "system": "Be brief.",
        "question": "And the background?",
        "chosen": "Black.",
        "rejected": "White.",
    },
]


def trl_rows(conversational: bool) -> list[dict]:
    """MMPR as TRL writes it: message lists with image blocks, or strings with placeholders."""
    if not conversational:
        return [
            {"prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.", "images": ["img/a.png"]},
            {
                **{k: MMPR[1][k] for k in ("chosen", "rejected")},
                "prompt": MMPR[1]["question"],
                "images": MMPR[1]["image"],
            },
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            None,  # multi-turn needs messages
        ]

    def said(role, *parts):
        return {
            "role": role,
            "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts],
        }

    img = {"type": "image"}
    return [
        {
            "prompt": [said("user", img, "What colour?")],
            "chosen": [said("assistant", "Red.")],
            "rejected": [said("assistant", "Blue.")],
            "images": ["img/a.png"],
        },
        {
            "prompt": [said("user", img, "versus", img, "Same?")],
            "chosen": [said("assistant", "No.")],
            "rejected": [said("assistant", "Yes.")],
            "images": ["img/a.png", "img/wide.png"],
        },
        # the implicit-prompt variant: the shared leading messages are the prompt
        {
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
        },
        {
            # string contents without placeholders: TRL puts the image before the first user text
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Describe it."},
                {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": "And the background?"},
            ],
            "chosen": [{"role": "assistant", "content": "Black."}],
            "rejected": [{"role": "assistant", "content": "White."}],
            "image": "img/a.png",
        },
    ]


def sharegpt_rows() -> list[dict]:
    def turn(tag, text):
        return {"from": tag, "value": text}

    return [
        {
            "conversations": [turn("human", "What colour?")],
            "chosen": turn("gpt", "Red."),
            "rejected": turn("gpt", "Blue."),
            "images": ["img/a.png"],
        },
        {
            "conversations": [turn("human", MMPR[1]["question"])],
            "chosen": turn("gpt", "No."),
            "rejected": turn("gpt", "Yes."),
            "images": ["img/a.png", "img/wide.png"],
        },
        {"conversations": [turn("human", "2+2?")], "chosen": turn("gpt", "4"), "rejected": turn("gpt", "5")},
        {
            "conversations": [
                turn("system", "Be brief."),
                turn("human", "<image>\nDescribe it."),
                turn("gpt", "A red square."),
                turn("human", "And the background?"),
            ],
            "chosen": turn("gpt", "Black."),
            "rejected": turn("gpt", "White."),
            "images": ["img/a.png"],
        },
    ]


def alpaca_rows() -> list[dict]:
    return [
        {
            "instruction": "What colour?",
            "input": "",
            "chosen": "Red.",
            "rejected": "Blue.",
            "images": ["img/a.png"],
        },
        {
            "instruction": "<image>\nversus\n<image>",
            "input": "Same?",  # LLaMA-Factory joins instruction and input with a newline
            "chosen": "No.",
            "rejected": "Yes.",
            "images": ["img/a.png", "img/wide.png"],
        },
        {"instruction": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "instruction": "And the background?",
            "history": [["<image>\nDescribe it.", "A red square."]],
            "system": "Be brief.",
            "chosen": "Black.",
            "rejected": "White.",
            "images": ["img/a.png"],
        },
    ]


def swift_rows(image_value=lambda rel: rel) -> list[dict]:
    def m(role, text):
        return {"role": role, "content": text}

    return [
        {
            "messages": [m("user", "What colour?"), m("assistant", "Red.")],
            "rejected_response": "Blue.",
            "images": [image_value("img/a.png")],
        },
        {
            "messages": [m("user", MMPR[1]["question"]), m("assistant", "No.")],
            "rejected_response": [m("assistant", "Yes.")],
            "images": [image_value("img/a.png"), image_value("img/wide.png")],
        },
        {
            "messages": [m("user", "2+2?"), m("assistant", "4")],
            "rejected_messages": [m("user", "2+2?"), m("assistant", "5")],
        },
        {
            "messages": [
                m("system", "Be brief."),
                m("user", "<image>\nDescribe it."),
                m("assistant", "A red square."),
                m("user", "And the background?"),
                m("assistant", "Black."),
            ],
            "rejected_response": "White.",
            "images": [image_value("img/a.png")],
        },
    ]


def write_images(root):
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (250, 0, 0)).save(root / "img" / "a.png")
    Image.new("RGB", (128, 64), (0, 0, 250)).save(root / "img" / "wide.png")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r is not None))
    return path


def pairs(meta, **cfg) -> list[dict]:
    ds = PairDataset(meta, TOKENIZER[0], VISION, DataConfig(max_dynamic_patch=4, **cfg))
    out = []
    for i in range(len(ds)):
        pair, _ = ds[i]
        assert pair is not None
        out.append(pair)
    return out


TOKENIZER: list = []


@pytest.fixture(autouse=True)
def _tok(tokenizer):
    TOKENIZER[:] = [tokenizer]


def assert_same_pairs(got: list[dict], want: list[dict]) -> None:
    """Token ids, labels, tiles and pixels identical, pair by pair."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert torch.equal(g[key], w[key]), key
        assert g["num_tiles"] == w["num_tiles"]
        assert (g["pixel_values"] is None) == (w["pixel_values"] is None)
        if w["pixel_values"] is not None:
            assert torch.equal(g["pixel_values"], w["pixel_values"])


@pytest.fixture
def reference(tmp_path):
    write_images(tmp_path)
    return pairs(write_jsonl(tmp_path / "mmpr.jsonl", MMPR))


FORMAT_FILES = {
    "trl": lambda: [r for r in trl_rows(True)],
    "trl-strings": lambda: trl_rows(False),
    "llamafactory-sharegpt": sharegpt_rows,
    "llamafactory-alpaca": alpaca_rows,
    "swift": swift_rows,
}


@pytest.mark.parametrize("name", list(FORMAT_FILES))
def test_each_format_reads_as_the_same_pairs(tmp_path, reference, name):
    rows = FORMAT_FILES[name]()
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    want = [w for w, r in zip(reference, rows) if r is not None]
    assert_same_pairs(pairs(path), want)
    fmt = name.split("-")[0]
    assert read_meta(path)[0].format is None and detect(rows[0]) == fmt


@pytest.mark.parametrize("name", list(FORMAT_FILES))
def test_convert_round_trip(tmp_path, reference, name, capsys):
    rows = FORMAT_FILES[name]()
    fmt = name.split("-")[0]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    rc = main(["data", "convert", "--from", fmt, str(path), str(tmp_path / "out"), "--name", "mine"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    kept = sum(r is not None for r in rows)
    assert list(meta) == ["mine"] and meta["mine"]["length"] == kept
    lines = [json.loads(x) for x in (tmp_path / "out" / "mine.jsonl").read_text().splitlines()]
    assert all(detect(x) == "mmpr" for x in lines)
    # The converted lines are MMPR: read without conversion, they give the reference pairs again.
    assert_same_pairs(
        pairs(tmp_path / "out" / "meta.json"), [w for w, r in zip(reference, rows) if r is not None]
    )


def test_llamafactory_dataset_info_is_a_meta_file(tmp_path, reference, caplog):
    """dataset_info.json entries with custom column names and OpenAI-style tags; non-ranking
    entries are left out (and named), media resolve under the file's folder."""
    rows = sharegpt_rows()
    renamed = []
    for r in rows:
        msgs = [
            {"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
            for t in r["conversations"]
        ]
        out = {"msgs": msgs, "good": {"role": "assistant", "content": r["chosen"]["value"]}}
        out["bad"] = {"role": "assistant", "content": r["rejected"]["value"]}
        if "images" in r:
            out["pics"] = r["images"]
        renamed.append(out)
    (tmp_path / "prefs.json").write_text(
        json.dumps(renamed, indent=2)
    )  # a JSON array, as LLaMA-Factory writes
    info = {
        "sft_data": {"file_name": "whatever.json"},
        "mine": {
            "file_name": "prefs.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "msgs", "chosen": "good", "rejected": "bad", "images": "pics"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        },
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING"):
        specs = read_meta(tmp_path / "dataset_info.json")
    assert [s.name for s in specs] == ["mine"] and specs[0].format == "llamafactory"
    assert "sft_data" in caplog.text
    assert_same_pairs(pairs(tmp_path / "dataset_info.json"), reference)
    # Converting the dataset_info.json writes one meta entry per preference dataset.
    assert (
        main(
            [
                "data",
                "convert",
                "--from",
                "llamafactory",
                str(tmp_path / "dataset_info.json"),
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert_same_pairs(pairs(tmp_path / "o" / "meta.json"), reference)


def test_meta_entry_names_the_format(tmp_path, reference):
    write_jsonl(tmp_path / "s.jsonl", swift_rows())
    (tmp_path / "meta.json").write_text(json.dumps({"s": {"annotation": "s.jsonl", "format": "swift"}}))
    assert read_meta(tmp_path / "meta.json")[0].format == "swift"
    assert_same_pairs(pairs(tmp_path / "meta.json"), reference)
    (tmp_path / "bad.json").write_text(json.dumps({"s": {"annotation": "s.jsonl", "format": "openai"}}))
    with pytest.raises(DataError, match="field 'format' must be one of mmpr, trl, llamafactory, swift"):
        read_meta(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({"s": {"annotation": "s.jsonl", "columns": {}}}))
    with pytest.raises(DataError, match='need "format": "llamafactory"'):
        read_meta(tmp_path / "bad2.json")


def test_images_as_absolute_paths_data_urls_and_hf_image_columns(tmp_path, reference):
    """ms-swift's absolute paths and base64 data URLs, and TRL's HF Image column with the bytes
    inside a parquet file: the same pixels; conversion writes the embedded images out as files."""
    data_dir = tmp_path / "elsewhere"
    data_dir.mkdir()
    absolute = write_jsonl(data_dir / "abs.jsonl", swift_rows(lambda rel: str(tmp_path / rel)))
    assert_same_pairs(pairs(absolute), reference)

    def data_url(rel):
        return "data:image/png;base64," + base64.b64encode((tmp_path / rel).read_bytes()).decode()

    inline = write_jsonl(data_dir / "inline.jsonl", swift_rows(data_url))
    assert_same_pairs(pairs(inline), reference)

    import datasets

    def image(rel):
        return {"bytes": (tmp_path / rel).read_bytes(), "path": None}

    table = [  # TRL's standard format with the images inside the file, as on the hub
        {"prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.", "images": [image("img/a.png")]},
        {
            "prompt": MMPR[1]["question"],
            "chosen": "No.",
            "rejected": "Yes.",
            "images": [image(p) for p in MMPR[1]["image"]],
        },
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "images": []},
    ]
    features = datasets.Features(
        {k: datasets.Value("string") for k in ("prompt", "chosen", "rejected")}
        | {"images": datasets.Sequence(datasets.Image())}
    )
    datasets.Dataset.from_list(table, features=features).to_parquet(str(tmp_path / "t.parquet"))
    assert_same_pairs(pairs(tmp_path / "t.parquet"), reference[:3])
    assert main(["data", "convert", "--from", "trl", str(tmp_path / "t.parquet"), str(tmp_path / "o")]) == 0
    written = sorted(p.name for p in (tmp_path / "o" / "images" / "t").iterdir())
    assert written == ["1_0.png", "2_0.png", "2_1.png"]
    assert_same_pairs(pairs(tmp_path / "o" / "meta.json"), reference[:3])


# ---- bad records --------------------------------------------------------------------------------
def test_unknown_format_names_fields_expected_and_found(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"query": "q", "response": "a", "images": []}])
    with pytest.raises(DataError) as err:
        PairDataset(path, TOKENIZER[0], VISION, CFG)
    msg = str(err.value)
    assert msg.startswith(f"{path}:1: not a preference record in a known format")
    assert "trl: prompt, chosen, rejected" in msg and "swift: messages" in msg and "mmpr: question" in msg
    assert msg.endswith("found fields: query, response, images")


BAD = [
    (
        "trl",
        {"prompt": "q", "chosen": "a"},
        "missing_rejected",
        "missing field 'rejected' for format 'trl': expected the fields of trl: prompt, chosen, rejected",
    ),
    (
        "trl",
        {"prompt": "q", "chosen": "a", "rejected": "b", "images": ["https://x/y.png"]},
        "image_url",
        "is a web URL",
    ),
    (
        "trl",
        {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
        "bad_turns",
        "ending with a user turn; got roles ['assistant']",
    ),
    (
        "llamafactory",
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": "f()"},
                {"from": "observation", "value": "r"},
            ],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
        "bad_turns",
        "tool turns are not supported",
    ),
    (
        "llamafactory",
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "human", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
        "bad_chosen",
        "field 'chosen' must be an assistant message",
    ),
    (
        "swift",
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected_response": "b",
            "images": ["img/a.png"],
            "rejected_images": ["img/wide.png"],
        },
        "rejected_images",
        "an MPO pair shares its images",
    ),
    (
        "swift",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "missing_rejected",
        "missing field 'rejected_response' for format 'swift'",
    ),
]


@pytest.mark.parametrize("fmt,record,reason,message", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_record_raises_or_is_counted(tmp_path, fmt, record, reason, message):
    write_images(tmp_path)
    good = {"trl": trl_rows(True)[0], "llamafactory": sharegpt_rows()[0], "swift": swift_rows()[0]}[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [good, record])
    ds = PairDataset(path, TOKENIZER[0], VISION, CFG)
    assert ds[0][0] is not None
    with pytest.raises(DataError) as err:
        ds[1]
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value), str(err.value)
    assert str(err.value).endswith(f"({fmt} record)") and err.value.reason == reason
    skip = PairDataset(path, TOKENIZER[0], VISION, DataConfig(max_dynamic_patch=4, on_bad_sample="skip"))
    pair, events = skip[1]
    assert pair is None and events.skipped == {reason: 1}


def test_convert_stops_at_or_counts_bad_records(tmp_path, capsys):
    write_images(tmp_path)
    rows = [swift_rows()[0], BAD[-1][1], swift_rows()[2]]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["data", "convert", "--from", "swift", str(path), str(tmp_path / "o")]) == 2
    assert f"{path}:2: missing field 'rejected_response'" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "convert",
                "--from",
                "swift",
                str(path),
                str(tmp_path / "o"),
                "--on-bad",
                "skip",
                "--overwrite",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "in: 2 pairs" in out and "skipped 1 (missing_rejected)" in out
    assert main(["data", "convert", "--from", "swift", str(path), str(tmp_path / "o")]) == 2
    assert "exists" in capsys.readouterr().err


# ---- pieces --------------------------------------------------------------------------------------
def test_readers_on_hand_written_records():
    assert read_trl({"prompt": "q", "chosen": "a", "rejected": "b"}) == {
        "question": "q",
        "chosen": "a",
        "rejected": "b",
    }
    # Blocks join with newlines; two images without placeholders in string contents go in front.
    got = read_trl(
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": "a",
            "rejected": "b",
            "images": ["x.png", "/abs/y.png"],
        }
    )
    assert got["question"] == "<image>\n<image>\nq"
    assert got["image"] == ["x.png", {"bytes": None, "path": "/abs/y.png"}]
    alpaca = read_llamafactory(
        {"instruction": "i", "input": "j", "chosen": "a", "rejected": "b", "system": ""}
    )
    assert alpaca == {"question": "i\nj", "chosen": "a", "rejected": "b"}
    # A system message in the conversation overrides the system column.
    lf = read_llamafactory(
        {
            "conversations": [{"from": "system", "value": "S1"}, {"from": "human", "value": "q"}],
            "system": "S0",
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        }
    )
    assert lf["system"] == "S1"
    # A dataset_info entry without an images column does not read images (LLaMA-Factory's rule).
    entry = LlamaFactoryColumns.from_entry(
        {
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        }
    )
    no_img = read_llamafactory({**sharegpt_rows()[0]}, entry)
    assert "image" not in no_img
    sw = read_swift(
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected_response": "b",
            "videos": ["v.mp4"],
        }
    )
    assert sw == {"question": "q", "chosen": "a", "rejected": "b", "video": "v.mp4"}


def test_multi_turn_prompt_tokens_and_labels(tokenizer):
    """The prompt is the template's turns one after the other (each tokenized on its own), the
    record's system message replaces the default, and only the final answer is trained."""
    enc = TemplateEncoder(tokenizer, None, "internvl2_5")

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    got = enc.encode_prompt("q2", [("q1", "a1")], "S")
    want = ids("<|im_start|>system\nS<|im_end|>\n") + ids("<|im_start|>user\nq1<|im_end|>\n")
    want += ids("<|im_start|>assistant\na1<|im_end|>\n") + ids("<|im_start|>user\nq2<|im_end|>\n")
    assert got == want
    assert enc.encode_prompt("q") == enc.encode_prompt("q", (), None)


def test_multi_turn_pair_trains_only_the_final_answer(tmp_path):
    write_images(tmp_path)
    pair = pairs(write_jsonl(tmp_path / "m.jsonl", [MMPR[3]]))[0]
    tok = TOKENIZER[0]
    labels, ids = pair["chosen_labels"], pair["chosen_input_ids"]
    assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == "Black.<|im_end|>"
    text = tok.decode(ids.tolist())
    # The image span sits in the first user turn, where the placeholder was.
    assert (
        text.index("<img>")
        < text.index("Describe it.")
        < text.index("A red square.")
        < text.index("And the background?")
    )
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_json_array_index_matches_json_load(tmp_path):
    """Element byte ranges and start lines against json.load on random nested data whose strings
    hold quotes, backslashes, brackets and newlines, at chunk sizes that split every escape."""
    rng = random.Random(0)

    def text():
        return "".join(rng.choice('ab"\\[]{},\n é') for _ in range(rng.randint(0, 10)))

    def value(depth=0):
        r = rng.random()
        if depth > 3 or r < 0.3:
            return text()
        if r < 0.5:
            return rng.randint(-5, 5)
        if r < 0.75:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {text(): value(depth + 1) for _ in range(rng.randint(0, 3))}

    for trial in range(60):
        data = [{"k": value(), text(): value()} for _ in range(rng.randint(1, 6))]
        raw = json.dumps(data, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5).encode()
        path = tmp_path / f"{trial}.json"
        path.write_bytes(raw)
        for chunk in (1, 2, 3, 7, 1 << 20):
            ranges, _ = json_array_index(path, chunk)
            assert [json.loads(raw[s:e]) for s, e in ranges] == data
        f = JsonArrayFile(path)
        for i, want in enumerate(data):
            line, obj = f.record(i)
            start = int(f.ranges[i, 0])
            first = start + len(raw[start:]) - len(raw[start:].lstrip())
            assert obj == want and line == raw[:first].count(b"\n") + 1
    for bad in (b'[{"a": 1}', b'[{"a": "1}]', b'[{"a": 1}] x', b"[1]]"):
        (tmp_path / "bad.json").write_bytes(bad)
        with pytest.raises(DataError, match="bad.json"):
            json_array_index(tmp_path / "bad.json")


def test_json_array_record_errors_name_the_line(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"question": "q", "chosen": "a", "rejected": "b"},\n  [1]\n]\n')
    f = JsonArrayFile(tmp_path / "a.json")
    assert len(f) == 2 and f.record(0) == (2, {"question": "q", "chosen": "a", "rejected": "b"})
    with pytest.raises(DataError, match=r"a.json:3: an element must be a JSON object"):
        f.record(1)


def test_inspect_shows_the_same_pair_from_mmpr_and_each_format(tmp_path, tiny_model_dir, capsys):
    """``mpo data inspect --index all`` prints the same pairs (text, trained text, tokens, pixels)
    whether the data is MMPR or another format; only the dataset name differs."""
    write_images(tmp_path)
    sources = {"mmpr": write_jsonl(tmp_path / "mmpr.jsonl", MMPR)}
    sources["trl"] = write_jsonl(tmp_path / "trl.jsonl", trl_rows(True))
    sources["swift"] = write_jsonl(tmp_path / "swift.jsonl", swift_rows())
    (tmp_path / "lf.json").write_text(json.dumps(sharegpt_rows(), indent=1))
    sources["llamafactory"] = tmp_path / "lf.json"
    printed = {}
    for name, path in sources.items():
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "model": {"path": str(tiny_model_dir)},
                    "data": {"meta_path": str(path), "max_dynamic_patch": 4},
                }
            )
        )
        assert main(["data", "inspect", "--config", str(cfg), "--index", "all", "--json"]) == 0
        rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        printed[name] = [{k: v for k, v in r.items() if k not in ("dataset", "line")} for r in rows]
        assert main(["data", "check", "--config", str(cfg), "--json"]) == 0
        (checked,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert checked["ok"] and checked["formats"] == {path.stem: name}
    assert len(printed["mmpr"]) == 4 and printed["mmpr"][3]["num_tiles"] == [1]
    for name in ("trl", "swift", "llamafactory"):
        assert printed[name] == printed["mmpr"], name
    assert np.isfinite(printed["mmpr"][0]["pixel_stats"]["sum"])


def test_sample_log_names_images_stored_inside_the_data():
    """samples.jsonl holds JSON: an image read as bytes (HF Image column, data URL) is named, not dumped."""
    from mpo.observability import _image_label

    value = [{"bytes": b"\x89PNG", "path": None}, "img/a.png", {"bytes": None, "path": "/abs/b.png"}]
    assert _image_label(value) == ["<image stored in the data>", "img/a.png", "/abs/b.png"]
    json.dumps(_image_label(value))
