"""A tiny InternVL (real architecture, random weights) and a locally trained tokenizer.

Tests and the demo use these so nothing is downloaded. The architecture is the real one
(InternViT -> pixel-unshuffle MLP projector -> Qwen2), only the sizes are small; the special
tokens and the chat markers are InternVL's (docs/internvl-format.md §1, §3).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from mpo.data.template import DEFAULT_SYSTEM_MESSAGE

# InternVL's special tokens, in the order the published tokenizers add them after the BPE vocab.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
]

# Sizes chosen so the demo learns on 2 CPU cores in minutes; proportions are not InternVL's.
TINY_VISION = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=64,
    patch_size=16,
    layer_scale_init_value=0.1,
    use_mean_pooling=True,
)
TINY_TEXT = dict(
    hidden_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=192,
    max_position_embeddings=4096,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)


def default_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the template, the system prompt and demo answers."""
    words = (
        "What color is the shape in the image ? Answer with one word . The shape is red green blue "
        "yellow purple orange white black . What shape is shown ? It is a circle square triangle . What color is the background ? The background is white black gray . "
        "How many shapes are there ? There are one two three four five shapes . Describe the image "
        "Frame user assistant system image picture the a an of and is are in on with"
    )
    lines = [DEFAULT_SYSTEM_MESSAGE, words, "<|im_start|>system\n", "<|im_start|>user\n"]
    lines += [f"{w}\n" for w in words.split()]
    return lines * 4


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with InternVL's special tokens, deterministically.

    Byte-level so any text (the Chinese system prompt included) round-trips exactly.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=8192,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast, vision: dict | None = None, text: dict | None = None
) -> InternVLConfig:
    """An InternVLConfig with tiny sizes and the tokenizer's ids wired in."""
    vision_cfg = InternVLVisionConfig(**{**TINY_VISION, **(vision or {})})
    text_cfg = Qwen2Config(
        **{**TINY_TEXT, **(text or {})},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_size = vision_cfg.image_size[0]
    patch = vision_cfg.patch_size[0]
    return InternVLConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(image_size // patch) ** 2 // 4,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        tie_word_embeddings=text_cfg.tie_word_embeddings,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, **sizes
) -> InternVLForConditionalGeneration:
    """Random-weight tiny InternVL; the same seed gives bit-identical weights."""
    config = build_config(tokenizer, **sizes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    return model.eval()


def save_tiny_internvl(out_dir: str | Path, seed: int = 0, **sizes) -> Path:
    """Build the tiny tokenizer + model and save both in HF format to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **sizes)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "mpo_tiny.json").write_text(json.dumps({"seed": seed, "sizes": sizes}, indent=1))
    return out
