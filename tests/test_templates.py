"""Chat templates per generation: rendered text and trained span against hand-written strings, for
byte-level (Qwen) and sentencepiece-like (InternLM2, Phi-3) tokenizers; how ``auto`` finds the
template; exported chat templates and stop tokens that equal what was trained."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mpo.config import DataConfig
from mpo.data.pairs import PairDataset, SampleError
from mpo.data.template import (
    DEFAULT_SYSTEM_MESSAGE,
    IGNORE_INDEX,
    INTERNVL2_SYSTEM_MESSAGE,
    TEMPLATES,
    TemplateEncoder,
    TemplateError,
    resolve_template,
)
from mpo.data.tiling import VisionSpec
from mpo.model.tiny import build_tokenizer, tokenizer_for

VISION = VisionSpec(image_size=28, tokens_per_tile=2)
IMG = "<img><IMG_CONTEXT><IMG_CONTEXT></img>"
LINE = {"image": "a.png", "question": "What color? ", "chosen": " Red. ", "rejected": "Blue."}


@pytest.fixture(scope="module")
def toks():
    return {"qwen": build_tokenizer(), "internlm2": tokenizer_for("internlm2"), "phi3": tokenizer_for("phi3")}


def _pair(tmp_path, tokenizer, line=LINE, **cfg):
    Image.new("RGB", (28, 28), (200, 10, 10)).save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(line) + "\n")
    pair, _ = PairDataset(path, tokenizer, VISION, DataConfig(**cfg))[0]
    return pair


def _text(tok, ids: torch.Tensor) -> str:
    return tok.decode(ids.tolist(), skip_special_tokens=False)


def _trained(tok, ids: torch.Tensor, labels: torch.Tensor) -> str:
    keep = labels != IGNORE_INDEX
    assert torch.equal(ids[keep], labels[keep])
    assert keep.nonzero().flatten().diff().eq(1).all()  # one contiguous span
    return tok.decode(labels[keep].tolist(), skip_special_tokens=False)


# (template, tokenizer, the chosen sequence as InternVL's preprocess_* renders it, trained text)
CASES = [
    (
        "internvl2_5",
        "qwen",
        f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n{IMG}\nWhat color? <|im_end|>\n"
        "<|im_start|>assistant\n Red. <|im_end|>\n",
        " Red. <|im_end|>",
    ),
    (  # InternVL2.5-2B/8B/26B: internvl2_5 on InternLM2's tokenizer, one BOS in front
        "internvl2_5",
        "internlm2",
        f"<s><|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n{IMG}\nWhat color? <|im_end|>\n"
        "<|im_start|>assistant\n Red. <|im_end|>\n",
        " Red. <|im_end|>",
    ),
    (  # InternVL2-2B/8B/26B: no newline between turns, messages stripped (preprocess_internlm)
        "internlm2-chat",
        "internlm2",
        f"<s><|im_start|>system\n{INTERNVL2_SYSTEM_MESSAGE}<|im_end|><|im_start|>user\n{IMG}\nWhat color?<|im_end|>"
        "<|im_start|>assistant\nRed.<|im_end|>",
        "Red.<|im_end|>",
    ),
    (  # InternVL2-1B/40B/76B (preprocess_mpt): no newline between turns, nothing stripped
        "Hermes-2",
        "qwen",
        f"<|im_start|>system\n{INTERNVL2_SYSTEM_MESSAGE}<|im_end|><|im_start|>user\n{IMG}\nWhat color? <|im_end|>"
        "<|im_start|>assistant\n Red. <|im_end|>",
        " Red. <|im_end|>",
    ),
    (  # InternVL2-4B (preprocess_phi3)
        "phi3-chat",
        "phi3",
        f"<s><|system|>\n{INTERNVL2_SYSTEM_MESSAGE}<|end|><|user|>\n{IMG}\nWhat color? <|end|><|assistant|>\n Red. <|end|>",
        " Red. <|end|>",
    ),
]


@pytest.mark.parametrize(("template", "tok_name", "rendered", "trained"), CASES)
def test_rendered_text_and_trained_span(tmp_path, toks, template, tok_name, rendered, trained):
    tok = toks[tok_name]
    pair = _pair(tmp_path, tok, template=template)
    ids, labels = pair["chosen_input_ids"], pair["chosen_labels"]
    assert _text(tok, ids) == rendered
    assert _trained(tok, ids, labels) == trained
    bos = tok.bos_token_id
    if bos is not None:  # exactly one BOS, in front
        assert ids[0] == bos and (ids == bos).sum().item() == 1
    # The image span is exactly the tokenizer's ids for <img>, <IMG_CONTEXT> x 2, </img>.
    span = [tok.convert_tokens_to_ids(t) for t in ("<img>", "<IMG_CONTEXT>", "<IMG_CONTEXT>", "</img>")]
    assert any(ids[i : i + 4].tolist() == span for i in range(len(ids) - 3))


def test_data_inspect_shows_the_trained_span(tmp_path, toks):
    from mpo.data.cli import inspect_pair

    tok = toks["internlm2"]
    pair = _pair(tmp_path, tok, template="internlm2-chat")
    shown = inspect_pair(pair, tok, VISION.tokens_per_tile, IGNORE_INDEX)
    assert json.dumps(shown, ensure_ascii=False).count("Red.<|im_end|>") >= 1
    assert "Red.<|im_end|>" in json.dumps(shown["chosen"], ensure_ascii=False)


def test_reserved_tokens_come_from_the_template_and_tokenizer(tmp_path, toks):
    """A data string the tokenizer would read as structure is refused: InternLM2's <s>/</s>,
    Phi-3's <|end|>; text that is only special for another family passes."""
    for tok_name, template, bad in (
        ("internlm2", "internlm2-chat", "</s>"),
        ("phi3", "phi3-chat", "<|end|>"),
    ):
        line = dict(LINE, chosen=f"Red.{bad} more")
        with pytest.raises(SampleError, match="reserved token"):
            _pair(tmp_path, toks[tok_name], line, template=template)
    ok = _pair(tmp_path, toks["phi3"], dict(LINE, chosen="Red <|im_end|> text"), template="phi3-chat")
    assert "<|im_end|>" in _text(toks["phi3"], ok["chosen_input_ids"])
    enc = TemplateEncoder(toks["internlm2"], template="internvl2_5")
    assert set(enc.reserved_tokens) == {
        "<|im_start|>",
        "<|im_end|>",
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<s>",
        "</s>",
        "<unk>",
    }


def test_auto_finds_the_checkpoint_template(tmp_path, toks):
    from mpo.model import convert as C
    from mpo.model.loading import load_tokenizer
    from mpo.model.tiny import save_tiny_original

    folder = save_tiny_original(tmp_path / "o", "internlm2", template="internlm2-chat")
    tok = load_tokenizer(str(folder))
    assert TemplateEncoder(tok).spec.name == "internlm2-chat"  # data.template=auto
    assert TemplateEncoder(tok, template="internvl2_5").spec.name == "internvl2_5"  # the override wins
    native = C.convert_checkpoint(folder, tmp_path / "n", "native")
    assert load_tokenizer(str(native)).internvl_template == "internlm2-chat"  # from the stashed config
    # A native folder without a record: the chat template decides, then the default.
    plain = toks["phi3"]
    assert resolve_template("auto", plain).name == "internvl2_5"
    from mpo.model.export import chat_template

    plain.chat_template = chat_template(template=TEMPLATES["phi3-chat"])
    assert resolve_template("auto", plain).name == "phi3-chat"
    plain.chat_template = None


def test_unknown_and_refused_templates_are_named(toks):
    with pytest.raises(
        TemplateError, match="data.template='vicuna_v1.1': unknown template; supported: internvl2_5"
    ):
        resolve_template("vicuna_v1.1", toks["qwen"])

    class Tagged:
        internvl_template = "internvl3_5_gpt_oss"

    with pytest.raises(TemplateError, match="GPT-OSS InternVL3.5 model's template is not supported"):
        resolve_template("auto", Tagged())
    with pytest.raises(TemplateError, match="has no '<\\|system\\|>' token"):
        TemplateEncoder(toks["qwen"], template="phi3-chat")


def test_data_template_key_lists_every_template():
    """The config key's allowed values are exactly the templates (plus auto): one list to keep."""
    import typing

    from mpo.config import DataConfig as D

    hints = typing.get_type_hints(D)
    assert set(typing.get_args(hints["template"])) == {"auto", *TEMPLATES}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_exported_chat_template_renders_the_trained_text(toks, name):
    """What vLLM/transformers render from the exported template equals the training prompt, as text
    and as token ids, for a conversation with an image, a system default and a history."""
    from mpo.model.export import chat_template

    tok = {"phi3-chat": toks["phi3"], "internlm2-chat": toks["internlm2"]}.get(name, toks["qwen"])
    enc = TemplateEncoder(tok, template=name)
    tok.chat_template = chat_template(None, enc.spec, with_bos=bool(enc.bos_ids))
    try:
        spec, bos = enc.spec, (tok.bos_token if enc.bos_ids else "")
        msgs = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What color? "}]},
            {"role": "assistant", "content": " Red. "},
            {"role": "user", "content": "And now?"},
        ]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        expected = (
            bos
            + spec.system_turn()
            + spec.user_turn("<IMG_CONTEXT>\n What color? ")
            + spec.assistant_turn(" Red. ")
            + spec.user_turn("And now?")
            + spec.assistant_prefix
        )
        assert text == expected
        one = tok.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
        assert tok(one, add_special_tokens=False)["input_ids"] == enc.generation_prefix("Hi")
        system = tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False
        )
        assert system == bos + spec.system_turn("Be brief.") + spec.user_turn("Hi")
    finally:
        tok.chat_template = None


def test_export_metadata_stops_at_the_end_of_turn_token(tmp_path):
    """generation_config.json stops at the template's end-of-turn token, not the tokenizer's EOS
    (InternLM2's EOS is </s>; its chat turns end with <|im_end|>)."""
    from transformers import GenerationConfig

    from mpo.model.export import write_export_metadata
    from mpo.model.tiny import save_tiny_original

    for backbone, end in (("internlm2", "<|im_end|>"), ("phi3", "<|end|>")):
        folder = save_tiny_original(tmp_path / backbone, backbone)
        write_export_metadata(folder)
        gen = GenerationConfig.from_pretrained(folder)
        tok = tokenizer_for(backbone)
        assert gen.eos_token_id[0] == tok.convert_tokens_to_ids(end) != tok.eos_token_id
        jinja = (folder / "chat_template.jinja").read_text()
        assert jinja.startswith("{#- internvl template: ") and end in jinja


def test_reference_cache_settings_name_the_template(tmp_path, toks):
    from mpo.refcache import data_settings

    Image.new("RGB", (28, 28), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps(LINE) + "\n")
    a = PairDataset(tmp_path / "d.jsonl", toks["qwen"], VISION, DataConfig())
    b = PairDataset(tmp_path / "d.jsonl", toks["qwen"], VISION, DataConfig(template="Hermes-2"))
    assert data_settings(a)["template"] == "internvl2_5" and data_settings(b)["template"] == "Hermes-2"
