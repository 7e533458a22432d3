"""The rendered internvl2_5 template and label masks against hand-written strings; collation with
odd pad/ignore sentinels against hand-written tensors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mpo.config import DataConfig
from mpo.data.collate import PairCollator
from mpo.data.events import DataEvents
from mpo.data.pairs import PairDataset, SampleError
from mpo.data.template import DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX
from mpo.data.tiling import VisionSpec

VISION = VisionSpec(image_size=28, tokens_per_tile=2)
SYS = f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n"
IMG1 = "<img>" + "<IMG_CONTEXT>" * 2 + "</img>"  # one 28px tile, 2 tokens per tile


def write_data(tmp_path, lines: list[dict], images: dict[str, tuple[int, int]] | None = None):
    for name, size in (images or {}).items():
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def encode_one(tmp_path, tokenizer, line: dict, images=None, **cfg):
    ds = PairDataset(write_data(tmp_path, [line], images), tokenizer, VISION, DataConfig(**cfg))
    return ds[0][0]


def decoded(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids.tolist(), skip_special_tokens=False)


def trained(tokenizer, ids: torch.Tensor, labels: torch.Tensor) -> str:
    assert torch.equal(ids[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    return tokenizer.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)


def test_single_image_prefix_and_masks(tmp_path, tokenizer):
    line = {
        "image": "a.png",
        "question": "What color?",
        "chosen": "Red.",
        "rejected": "Blue.",
        "answer_gt": "x",
    }
    pair = encode_one(tmp_path, tokenizer, line, {"a.png": (28, 28)})
    prompt = SYS + f"<|im_start|>user\n{IMG1}\nWhat color?<|im_end|>\n"
    assert decoded(tokenizer, pair["chosen_input_ids"]) == prompt + "<|im_start|>assistant\nRed.<|im_end|>\n"
    assert (
        decoded(tokenizer, pair["rejected_input_ids"]) == prompt + "<|im_start|>assistant\nBlue.<|im_end|>\n"
    )
    assert trained(tokenizer, pair["chosen_input_ids"], pair["chosen_labels"]) == "Red.<|im_end|>"
    assert trained(tokenizer, pair["rejected_input_ids"], pair["rejected_labels"]) == "Blue.<|im_end|>"
    # The masked tail is exactly the final "\n"; the trained block is contiguous.
    labels = pair["chosen_labels"]
    kept = (labels != IGNORE_INDEX).nonzero().flatten()
    assert kept[-1] == len(labels) - 2 and torch.equal(kept, torch.arange(kept[0], kept[-1] + 1))
    assert pair["num_tiles"] == [1] and pair["pixel_values"].shape == (1, 3, 28, 28)
    assert (pair["dataset"], pair["line"]) == ("data", 1)


def test_multi_image_placeholders_in_the_middle(tmp_path, tokenizer):
    line = {
        "image": ["a.png", "b.png"],
        "question": "Compare <image> with <image> please.",
        "chosen": "Same.",
        "rejected": "Different.",
    }
    # b.png is 2:1, so with max_dynamic_patch 4 each image gets 4 // 2 = 2 tiles: a 2x1 grid
    # (2 tiles) + thumbnail = 3 tiles; a.png is square: 1 tile.
    pair = encode_one(tmp_path, tokenizer, line, {"a.png": (28, 28), "b.png": (56, 28)}, max_dynamic_patch=4)
    assert pair["num_tiles"] == [1, 3]
    img2 = "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"
    expected = (
        SYS
        + f"<|im_start|>user\nCompare {IMG1} with {img2} please.<|im_end|>\n<|im_start|>assistant\nSame.<|im_end|>\n"
    )
    assert decoded(tokenizer, pair["chosen_input_ids"]) == expected
    assert trained(tokenizer, pair["chosen_input_ids"], pair["chosen_labels"]) == "Same.<|im_end|>"
    assert pair["pixel_values"].shape == (4, 3, 28, 28)


def test_text_only_pair(tmp_path, tokenizer):
    pair = encode_one(
        tmp_path, tokenizer, {"question": "2+2?", "chosen": "4", "rejected": "5"}, system_message="Be brief."
    )
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert decoded(tokenizer, pair["chosen_input_ids"]) == expected
    assert trained(tokenizer, pair["chosen_input_ids"], pair["chosen_labels"]) == "4<|im_end|>"
    assert pair["pixel_values"] is None and pair["num_tiles"] == []


@pytest.mark.parametrize(
    "image,question,message",
    [
        (
            ["a.png", "b.png"],
            "Only one <image> here",
            "1 '<image>' placeholder(s) but the sample has 2 image(s)",
        ),
        (["a.png", "b.png"], "No placeholder", "0 '<image>' placeholder(s) but the sample has 2 image(s)"),
        ("a.png", "<image> and <image>", "2 '<image>' placeholder(s) but the sample has 1 image(s)"),
        (None, "text <image>", "1 '<image>' placeholder(s) but the sample has 0 image(s)"),
    ],
)
def test_placeholder_count_mismatch(tmp_path, tokenizer, image, question, message):
    line = {"image": image, "question": question, "chosen": "a", "rejected": "b"}
    with pytest.raises(SampleError) as err:
        encode_one(tmp_path, tokenizer, line, {"a.png": (28, 28), "b.png": (28, 28)})
    assert message in str(err.value)
    assert str(err.value).startswith(f"{tmp_path / 'data.jsonl'}:1: field 'question'")
    assert err.value.reason == "placeholder_mismatch"


def _pair(c_ids, c_lab, r_ids, r_lab, tiles=None):
    t = torch.tensor
    return {
        "chosen_input_ids": t(c_ids),
        "chosen_labels": t(c_lab),
        "rejected_input_ids": t(r_ids),
        "rejected_labels": t(r_lab),
        "pixel_values": tiles,
    }


def test_collation_with_odd_sentinels():
    px_a = torch.full((2, 3, 4, 4), 1.5)
    px_b = torch.full((1, 3, 4, 4), -2.0)
    a = _pair([11, 12, 13], [-100, 12, 13], [11, 14], [-100, 14], px_a)
    b = _pair([21, 22], [-100, 22], [21, 23, 24, 25], [-100, -100, 24, 25], px_b)
    collator = PairCollator(pad_token_id=7, ignore_index=-7)
    skipped = DataEvents.skip("missing_image", "d.jsonl:2: field 'image': image not found", bad=True)
    batch, events = collator(
        [(a, DataEvents(seen=1)), (None, skipped), (b, DataEvents(seen=1, truncated={"chosen": 1}))]
    )
    assert batch["num_pairs"] == 2
    assert (events.seen, events.bad, dict(events.skipped), dict(events.truncated)) == (
        3, 1, {"missing_image": 1}, {"chosen": 1}
    )  # fmt: skip
    assert torch.equal(
        batch["input_ids"],
        torch.tensor([[11, 12, 13, 7], [21, 22, 7, 7], [11, 14, 7, 7], [21, 23, 24, 25]]),
    )
    assert torch.equal(
        batch["labels"],
        torch.tensor([[-7, 12, 13, -7], [-7, 22, -7, -7], [-7, 14, -7, -7], [-7, -7, 24, 25]]),
    )
    assert torch.equal(
        batch["attention_mask"], torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    )
    # Tiles once per pair (not per answer), in pair order.
    assert torch.equal(batch["pixel_values"], torch.cat([px_a, px_b]))


def test_collation_text_only_and_all_skipped():
    collator = PairCollator(pad_token_id=7, ignore_index=-7)
    batch, _ = collator([(_pair([5], [5], [6, 6], [6, 6]), DataEvents(seen=1))])
    assert "pixel_values" not in batch
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 7], [6, 6]]))
    assert torch.equal(batch["labels"], torch.tensor([[5, -7], [6, 6]]))
    gone = DataEvents.skip("invalid_json", "x", bad=True)
    batch, events = collator([(None, gone), (None, gone)])
    assert batch == {"num_pairs": 0} and events.seen == 2 and events.skipped == {"invalid_json": 2}


def test_collating_real_pairs_keeps_each_pairs_tokens(tmp_path, tokenizer):
    lines = [
        {"image": "a.png", "question": "Q1", "chosen": "yes", "rejected": "no no no"},
        {"question": "Q2", "chosen": "a longer chosen answer", "rejected": "b"},
    ]
    ds = PairDataset(write_data(tmp_path, lines, {"a.png": (28, 28)}), tokenizer, VISION, DataConfig())
    batch, _ = PairCollator(pad_token_id=7, ignore_index=-7)([ds[0], ds[1]])
    items = [ds[0][0], ds[1][0]]
    for row, (item, key) in enumerate(
        [(items[0], "chosen"), (items[1], "chosen"), (items[0], "rejected"), (items[1], "rejected")]
    ):
        ids = item[f"{key}_input_ids"]
        n = len(ids)
        assert torch.equal(batch["input_ids"][row, :n], ids)
        assert (batch["input_ids"][row, n:] == 7).all()
        lab = item[f"{key}_labels"]
        assert torch.equal(batch["labels"][row, :n], torch.where(lab == IGNORE_INDEX, -7, lab))
    assert batch["pixel_values"].shape == (1, 3, 28, 28)


class NewlineMergingTokenizer:
    """Stands in for Qwen2's BPE where it matters here: a run of newlines is one token, so
    "assistant\\n" followed by an answer that starts with "\\n" does not end on the prefix's "\\n"."""

    SPECIAL = ("<|im_start|>", "<|im_end|>")

    def __init__(self):
        self.vocab: dict[str, int] = {t: i for i, t in enumerate(self.SPECIAL)}

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab))

    def __call__(self, text: str, add_special_tokens: bool = False):
        import re

        pieces = re.findall(r"<\|im_(?:start|end)\|>|\n+|[^\n<]+|<", text)
        return {"input_ids": [self._id(p) for p in pieces]}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._id(token)

    def decode(self, ids: list[int]) -> str:
        inverse = {i: t for t, i in self.vocab.items()}
        return "".join(inverse[i] for i in ids)


def test_answer_starting_with_newline_keeps_prefix_masked_and_answer_trained():
    from mpo.data.template import ASSISTANT_PREFIX, TemplateEncoder

    tok = NewlineMergingTokenizer()
    enc = TemplateEncoder(tok)
    joint = tok(ASSISTANT_PREFIX + "\nStep 1<|im_end|>\n")["input_ids"]
    assert joint[: len(enc.prefix_ids)] != enc.prefix_ids  # the merge this guards against
    ids, labels = enc.encode_answer("\nStep 1")
    n = len(enc.prefix_ids)
    assert ids[:n] == enc.prefix_ids and labels[:n] == [IGNORE_INDEX] * n
    assert tok.decode(ids) == ASSISTANT_PREFIX + "\nStep 1<|im_end|>\n"
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "\nStep 1<|im_end|>"
    plain_ids, plain_labels = enc.encode_answer("Step 1")  # no merge: the joint tokens as before
    assert plain_ids == tok(ASSISTANT_PREFIX + "Step 1<|im_end|>\n")["input_ids"]
