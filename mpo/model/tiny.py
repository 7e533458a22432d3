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

# InternVL's added tokens (chat markers, image spans and grounding tags), and all special tokens in
# the order the published tokenizers add them after the BPE vocab.
IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS = ["<|endoftext|>", *CHATML_TOKENS, *IMAGE_TOKENS, "<video>"]

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


# ---- tiny ORIGINAL-format checkpoints, one per LLM backbone ---------------------------------------
# Written from the original layout itself (the key names and shapes of InternVL's remote code:
# ``modeling_intern_vit.py``, ``modeling_internvl_chat.py``'s ``mlp1`` and each LLM's modeling file),
# never by running mpo.model.convert backwards, so the conversion tests compare two independent
# readings of the same checkpoint.
TINY_BACKBONES = ("qwen2", "qwen3", "llama", "internlm3", "phi3", "internlm2")
# The template each backbone's InternVL uses (InternVL2.5-1B, InternVL3.5, InternVL2-40B,
# InternVL3-9B, InternVL2-4B, InternVL2.5-8B).
TINY_TEMPLATES = {
    "qwen2": "internvl2_5",
    "qwen3": "internvl2_5",
    "llama": "Hermes-2",
    "internlm3": "internvl2_5",
    "phi3": "phi3-chat",
    "internlm2": "internvl2_5",
}
_ARCH = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "internlm3": "InternLM3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
}
# Small, but with grouped-query attention (2 query heads per KV head) so InternLM2's wqkv
# interleave is exercised, and Qwen3/InternLM3 with head_dim != hidden/heads.
TINY_LLM = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96
)
TINY_VITS = {
    # InternViT-300M: LayerNorm, q/k/v bias, no qk normalisation.
    "300m": dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False),
    # InternViT-6B: RMSNorm, no q/k/v bias, RMSNorm on q and k over all heads.
    "6b": dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True),
}
TINY_VIT_SIZES = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=56,
    patch_size=14,
)
PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]


def build_sp_tokenizer(added: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A sentencepiece-like tokenizer (InternLM2's, Phi-3's): ``▁`` for spaces, no prefix space,
    ``<unk>``/``<s>``/``</s>`` at ids 0/1/2, a BOS in front of every encoding, ``added`` special tokens.

    Nothing in it is byte-level BPE: this is what keeps Qwen assumptions out of the shared code.
    """
    from tokenizers import processors

    from mpo.data.template import TEMPLATES

    corpus = default_corpus() + [t.system_message for t in TEMPLATES.values()]
    alphabet = set("".join(corpus)) | set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!:;'\"()-\n"
    )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # prepend_scheme="never": no dummy "▁" before a text (InternLM2's sentencepiece model has none).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=sorted(c.replace(" ", "▁") for c in alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",  # InternLM2 pads with its EOS
        model_max_length=8192,
        additional_special_tokens=added,
    )


def tokenizer_for(backbone: str) -> PreTrainedTokenizerFast:
    """The tiny tokenizer of a backbone's family: byte-level BPE for Qwen, sentencepiece-like otherwise."""
    if backbone in ("qwen2", "qwen3"):
        return build_tokenizer()
    return build_sp_tokenizer((PHI3_TOKENS if backbone == "phi3" else CHATML_TOKENS) + IMAGE_TOKENS)


def tiny_original_config(backbone: str, vit: str, tokenizer, template: str | None = None) -> dict:
    """The ``config.json`` of a tiny original checkpoint, with the fields InternVL's code writes."""
    llm = dict(TINY_LLM, vocab_size=len(tokenizer), architectures=[_ARCH[backbone]], model_type=backbone)
    llm.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        torch_dtype="float32",
    )
    top_tie = False
    if backbone == "qwen2":
        llm.update(rope_theta=1000000.0, sliding_window=512, use_sliding_window=False, max_window_layers=2)
    elif backbone == "qwen3":
        # InternVL3.5 (Qwen3-0.6B): head_dim apart from hidden/heads, tied head; the saved
        # llm_config omits tie_word_embeddings, the top level carries it.
        llm.update(head_dim=24, rope_theta=1000000.0, attention_bias=False)
        top_tie = True
    elif backbone == "internlm3":
        llm.update(head_dim=24, qkv_bias=False, bias=False, rope_theta=50000000.0)
    elif backbone == "phi3":
        # Phi-3-mini-128k's "su" scaling, with factors far from 1 so a lost scaling shows.
        half = 8  # head_dim 16 / 2
        llm.update(
            original_max_position_embeddings=128,
            rope_theta=10000.0,
            rope_scaling={
                "type": "su",
                "short_factor": [1.0 + 0.25 * i for i in range(half)],
                "long_factor": [2.0] * half,
            },
            sliding_window=511,
        )
    elif backbone == "internlm2":
        llm.update(bias=False, rope_theta=1000000.0, rope_scaling={"type": "dynamic", "factor": 2.0})
        llm["attn_implementation"] = "eager"
    if not top_tie:
        llm["tie_word_embeddings"] = False
    vision = dict(
        TINY_VIT_SIZES,
        **TINY_VITS[vit],
        architectures=["InternVisionModel"],
        model_type="intern_vit_6b",
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        initializer_factor=0.1,
        num_channels=3,
        dropout=0.0,
        drop_path_rate=0.0,
        attention_dropout=0.0,
    )
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": TINY_VIT_SIZES["image_size"],
        "llm_config": llm,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "ps_version": "v2",
        "select_layer": -1,
        "template": template or TINY_TEMPLATES[backbone],
        "tie_word_embeddings": top_tie,
        "torch_dtype": "float32",
        "use_thumbnail": True,
        "vision_config": vision,
    }


def tiny_original_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the original names and shapes for ``config`` (float32).

    Norm weights and layer scales are drawn around their usual values (not 1 and not equal across
    layers) so that a swapped or dropped tensor changes the logits.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.08, center: float = 0.0) -> torch.Tensor:
        return center + scale * torch.randn(*shape, generator=g)

    sd = _tiny_vit_weights(config["vision_config"], rnd)
    c4 = config["vision_config"]["hidden_size"] * 4  # pixel unshuffle at ratio 0.5: channels x4
    h = config["llm_config"]["hidden_size"]
    sd.update({
        "mlp1.0.weight": rnd(c4, scale=0.1, center=1.0), "mlp1.0.bias": rnd(c4),
        "mlp1.1.weight": rnd(h, c4), "mlp1.1.bias": rnd(h), "mlp1.3.weight": rnd(h, h), "mlp1.3.bias": rnd(h),
    })  # fmt: skip
    sd.update({f"language_model.{k}": v for k, v in _tiny_llm_weights(config, rnd).items()})
    return sd


def _tiny_vit_weights(vc: dict, rnd) -> dict[str, torch.Tensor]:
    c, p, inter = vc["hidden_size"], vc["patch_size"], vc["intermediate_size"]
    n = (vc["image_size"] // p) ** 2 + 1
    sd = {
        "vision_model.embeddings.class_embedding": rnd(1, 1, c, scale=0.5),
        "vision_model.embeddings.patch_embedding.weight": rnd(c, 3, p, p, scale=0.05),
        "vision_model.embeddings.patch_embedding.bias": rnd(c),
        "vision_model.embeddings.position_embedding": rnd(1, n, c, scale=0.5),
    }
    layer_norm = vc["norm_type"] == "layer_norm"
    for i in range(vc["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        sd.update({
            pre + "attn.qkv.weight": rnd(3 * c, c, scale=0.2), pre + "attn.proj.weight": rnd(c, c, scale=0.2),
            pre + "attn.proj.bias": rnd(c), pre + "mlp.fc1.weight": rnd(inter, c, scale=0.2),
            pre + "mlp.fc1.bias": rnd(inter), pre + "mlp.fc2.weight": rnd(c, inter, scale=0.2),
            pre + "mlp.fc2.bias": rnd(c), pre + "ls1": rnd(c, scale=0.1, center=0.5), pre + "ls2": rnd(c, scale=0.1, center=0.5),
        })  # fmt: skip
        for norm in ("norm1", "norm2"):
            sd[f"{pre}{norm}.weight"] = rnd(c, scale=0.1, center=1.0)
            if layer_norm:
                sd[f"{pre}{norm}.bias"] = rnd(c)
        if vc["qkv_bias"]:
            sd[pre + "attn.qkv.bias"] = rnd(3 * c)
        if vc["qk_normalization"]:  # InternRMSNorm over all heads: a weight only
            sd[pre + "attn.q_norm.weight"] = rnd(c, scale=0.1, center=1.0)
            sd[pre + "attn.k_norm.weight"] = rnd(c, scale=0.1, center=1.0)
    return sd


def _tiny_llm_weights(config: dict, rnd) -> dict[str, torch.Tensor]:
    """LLM weights under the names after ``language_model.``, per backbone."""
    lc = config["llm_config"]
    arch, h, inter, v = lc["architectures"][0], lc["hidden_size"], lc["intermediate_size"], lc["vocab_size"]
    heads, kv = lc["num_attention_heads"], lc["num_key_value_heads"]
    d = lc.get("head_dim") or h // heads
    q_rows, kv_rows = heads * d, kv * d
    norm = lambda n: rnd(n, scale=0.1, center=1.0)  # noqa: E731
    if arch == "InternLM2ForCausalLM":
        sd = {"model.tok_embeddings.weight": rnd(v, h, scale=0.5), "output.weight": rnd(v, h, scale=0.2)}
        for i in range(lc["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            sd.update({
                pre + "attention.wqkv.weight": rnd(q_rows + 2 * kv_rows, h, scale=0.2),
                pre + "attention.wo.weight": rnd(h, q_rows, scale=0.2),
                pre + "feed_forward.w1.weight": rnd(inter, h, scale=0.2),
                pre + "feed_forward.w3.weight": rnd(inter, h, scale=0.2),
                pre + "feed_forward.w2.weight": rnd(h, inter, scale=0.2),
                pre + "attention_norm.weight": norm(h), pre + "ffn_norm.weight": norm(h),
            })  # fmt: skip
            if lc.get("bias", True):
                sd[pre + "attention.wqkv.bias"] = rnd(q_rows + 2 * kv_rows)
                sd[pre + "attention.wo.bias"] = rnd(h)
        sd["model.norm.weight"] = norm(h)
        return sd
    sd = {"model.embed_tokens.weight": rnd(v, h, scale=0.5), "model.norm.weight": norm(h)}
    if not config.get("tie_word_embeddings"):
        sd["lm_head.weight"] = rnd(v, h, scale=0.2)
    for i in range(lc["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = norm(h)
        sd[pre + "post_attention_layernorm.weight"] = norm(h)
        sd[pre + "self_attn.o_proj.weight"] = rnd(h, q_rows, scale=0.2)
        sd[pre + "mlp.down_proj.weight"] = rnd(h, inter, scale=0.2)
        if arch == "Phi3ForCausalLM":  # fused q|k|v and gate|up, as Phi-3 stores them
            sd[pre + "self_attn.qkv_proj.weight"] = rnd(q_rows + 2 * kv_rows, h, scale=0.2)
            sd[pre + "mlp.gate_up_proj.weight"] = rnd(2 * inter, h, scale=0.2)
            continue
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            sd[f"{pre}self_attn.{name}.weight"] = rnd(rows, h, scale=0.2)
            if arch == "Qwen2ForCausalLM" or lc.get("qkv_bias"):
                sd[f"{pre}self_attn.{name}.bias"] = rnd(rows)
        if lc.get("bias"):  # InternLM3's o_proj bias
            sd[pre + "self_attn.o_proj.bias"] = rnd(h)
        for name in ("gate_proj", "up_proj"):
            sd[f"{pre}mlp.{name}.weight"] = rnd(inter, h, scale=0.2)
        if arch == "Qwen3ForCausalLM":  # RMSNorm per head on q and k
            sd[pre + "self_attn.q_norm.weight"] = norm(d)
            sd[pre + "self_attn.k_norm.weight"] = norm(d)
    return sd


def save_tiny_original(
    out_dir: str | Path,
    backbone: str = "internlm2",
    vit: str = "300m",
    template: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    mlp1_dtype: torch.dtype | None = None,
) -> Path:
    """Write a tiny ORIGINAL-format InternVL (``InternVLChatModel``) with its tokenizer.

    Args:
        backbone: one of ``TINY_BACKBONES``; vit: ``300m`` or ``6b``.
        template: the config's ``template`` (default: the backbone's InternVL's).
        dtype: weight dtype on disk; ``mlp1_dtype`` a different one for the projector (InternVL3.5
            checkpoints may store ``mlp1`` in float32 beside bfloat16 weights).
    """
    if backbone not in TINY_BACKBONES or vit not in TINY_VITS:
        raise ValueError(f"backbone must be one of {TINY_BACKBONES} and vit one of {sorted(TINY_VITS)}")
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_for(backbone)
    config = tiny_original_config(backbone, vit, tokenizer, template)
    sd = {
        k: v.to(mlp1_dtype if (mlp1_dtype and k.startswith("mlp1.")) else dtype)
        for k, v in tiny_original_state_dict(config, seed).items()
    }
    config["torch_dtype"] = config["llm_config"]["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    return out
