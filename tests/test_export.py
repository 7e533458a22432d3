"""Export metadata (chat template, generation config, processor, model card) and greedy generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, InternVLForConditionalGeneration

from mpo.cli import main as mpo_main
from mpo.data.template import ASSISTANT_PREFIX, DEFAULT_SYSTEM_MESSAGE, system_turn, user_turn
from mpo.data.tiling import VisionSpec, tile_image
from mpo.model.export import write_export_metadata
from mpo.model.generate import answer, build_prompt


@pytest.fixture
def exported(tiny_model_dir, tiny_config, tmp_path):
    """A copy of the tiny model folder with the metadata a finished run writes."""
    out = tmp_path / "final"
    shutil.copytree(tiny_model_dir, out)
    cfg = tiny_config()
    summary = {"global_step": 7, "train_loss": 1.25, "eval": {"rewards/accuracies": 0.75}}
    written = write_export_metadata(out, cfg, summary)
    return out, cfg, written


def test_metadata_files(exported):
    out, cfg, written = exported
    for name in (
        "chat_template.jinja",
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "README.md",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file() and name in written, name
    tok = AutoTokenizer.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>") and gen.do_sample is False
    assert json.loads((out / "processor_config.json").read_text())["image_seq_length"] == 4
    card = (out / "README.md").read_text()
    for text in (
        str(cfg.model.path),
        str(cfg.data.meta_path),
        "0.8 x preference",
        "0.2 x quality",
        "Steps: 7",
        "0.75",
    ):
        assert text in card, text


def test_chat_template_matches_the_training_template(exported):
    out, _, _ = exported
    tok = AutoTokenizer.from_pretrained(out)
    q = "What color is the shape?"
    text = tok.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
    )
    assert text == system_turn(None) + user_turn(q) + ASSISTANT_PREFIX
    assert DEFAULT_SYSTEM_MESSAGE in text
    # An image item becomes the processor's placeholder on its own line before the question.
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert text == system_turn(None) + user_turn("<IMG_CONTEXT>\n" + q)
    # A conversation's own system turn replaces the default one.
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == system_turn("Be brief.") + user_turn(q) + ASSISTANT_PREFIX


def test_image_processor_reproduces_internvl_tiling(exported):
    """The shipped processor settings give the same pixels as the training tiling (docs/internvl-format.md §2)."""
    out, _, _ = exported
    proc = AutoImageProcessor.from_pretrained(out)
    img = Image.new("RGB", (128, 64), (200, 30, 30))
    img.paste((30, 60, 220), (10, 10, 70, 50))
    got = proc(images=img, return_tensors="pt", max_patches=4)["pixel_values"]
    expected = tile_image(img, max_num=4, image_size=64)
    assert got.shape == expected.shape == (3, 3, 64, 64)  # 2x1 grid + thumbnail
    # The same resized pixels normalised by two float32 code paths: a few ε·2.64 apart (|x| ≤ 2.64).
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _manual_greedy(model, tokenizer, inputs, max_new_tokens: int) -> list[int]:
    """Greedy decode by full forward passes (no KV cache, no generate())."""
    ids = inputs["input_ids"]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, pixel_values=inputs.get("pixel_values")).logits
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


@pytest.fixture
def lively_model_dir(tokenizer, tmp_path):
    """The tiny model with weights x3: its greedy answers vary token to token (seed 0 at x1 repeats "\\n")."""
    from mpo.model.tiny import build_tiny_model

    model = build_tiny_model(tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(tmp_path / "lively")
    tokenizer.save_pretrained(tmp_path / "lively")
    return tmp_path / "lively"


def test_generate_equals_manual_greedy_decode(lively_model_dir, tmp_path, capsys):
    from mpo.model.generate import greedy_generate

    model = InternVLForConditionalGeneration.from_pretrained(str(lively_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(lively_model_dir))
    img = Image.new("RGB", (128, 64), (30, 180, 40))
    q = "What color is the shape?"
    got = answer(model, tok, q, img, max_new_tokens=6, max_num=4)
    inputs = build_prompt(tok, VisionSpec.from_config(model.config), q, img, max_num=4)
    # 2x1 tiles + thumbnail, 4 tokens each, inside one <img>...</img> after the system turn.
    assert inputs["pixel_values"].shape[0] == 3
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 12
    manual = _manual_greedy(model, tok, inputs, 6)
    assert greedy_generate(model, tok, inputs, 6) == manual
    assert len(set(manual)) > 3  # a real sequence, not one token repeated
    expected = tok.decode(manual, skip_special_tokens=True)
    assert isinstance(got, str) and got == expected

    img_path = tmp_path / "x.png"
    img.save(img_path)
    argv = ["generate", "--model", str(lively_model_dir), "--image", str(img_path), "--question", q]
    assert mpo_main(argv + ["--max-new-tokens", "6", "--max-num", "4"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_export_full_model_to_original(tiny_model_dir, tmp_path):
    from mpo.model.convert import load_original_as_native

    assert mpo_main(["export", str(tiny_model_dir), str(tmp_path / "o"), "--format", "original"]) == 0
    assert (tmp_path / "o" / "README.md").is_file() and (tmp_path / "o" / "chat_template.jinja").is_file()
    model = load_original_as_native(tmp_path / "o")
    ref = InternVLForConditionalGeneration.from_pretrained(str(tiny_model_dir))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.state_dict().items())
    assert (
        mpo_main(["export", str(tiny_model_dir), str(tmp_path / "o"), "--format", "original"]) == 2
    )  # not empty
