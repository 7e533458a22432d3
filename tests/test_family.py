"""Every InternVL backbone in and out: tiny ORIGINAL-format checkpoints built from the layout itself
(``mpo.model.tiny.save_tiny_original``), converted, and compared against an independent float64
forward (``tests/family_reference.py``); bit-identical ``--to original`` round trips; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_reference import reference_logits  # tests/ is on sys.path under pytest

from mpo.cli import main as mpo_main
from mpo.model import convert as C
from mpo.model.loading import ModelLoadError, check_model_path, load_model, load_tokenizer
from mpo.model.tiny import TINY_BACKBONES, save_tiny_original

# Every backbone with InternViT-300M, and InternViT-6B with the backbones it is paired with
# (InternVL2/2.5-26B InternLM2, InternVL2-40B/76B Llama, 2.5/3-38B/78B Qwen2, 3.5-38B Qwen3).
CASES = [(b, "300m") for b in TINY_BACKBONES] + [(b, "6b") for b in ("internlm2", "llama", "qwen2", "qwen3")]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """``original(backbone, vit)`` -> a tiny original checkpoint folder, built once per module."""
    built: dict[tuple[str, str], Path] = {}

    def make(backbone: str, vit: str) -> Path:
        if (backbone, vit) not in built:
            built[backbone, vit] = save_tiny_original(
                tmp_path_factory.mktemp(f"{backbone}-{vit}"), backbone, vit, seed=len(built)
            )
        return built[backbone, vit]

    return make


def _inputs(model, tiles: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence ``(T,)`` with text around one image span of ``tiles`` tiles, and its pixels."""
    g = torch.Generator().manual_seed(seed)
    img = model.config.image_token_id
    text = torch.randint(10, 200, (12,), generator=g)
    text[text == img] = 9
    ids = torch.cat([text[:3], torch.full((tiles * model.config.image_seq_length,), img), text[3:]])
    size = model.config.vision_config.image_size[0]
    return ids, torch.randn(tiles, 3, size, size, generator=g)


@pytest.mark.parametrize(("backbone", "vit"), CASES)
def test_converted_logits_match_an_independent_forward(original, backbone, vit):
    """The native model (converted in memory) against the original equations read off the original
    weights. Tolerance: the reference is float64, the model float32; a logit is the end of a few
    hundred float32 operations in series (2 ViT layers, projector, 2 decoder layers, dot products of
    <= 128 terms), each rounding by u = 6e-8 relative, which accumulate like a random walk to about
    sqrt(300)·u ≈ 1e-6 of the logits' scale. With logits below 25 (asserted) that is 2.5e-5; the
    bound 1e-4 keeps a 4x margin and is far below what any layout error gives (the last test)."""
    folder = original(backbone, vit)
    cfg = json.loads((folder / "config.json").read_text())
    model = load_model(str(folder), "float32")
    ids, pixels = _inputs(model)
    with torch.no_grad():
        ours = model(input_ids=ids[None], pixel_values=pixels).logits[0].double()
    ref = reference_logits(C.read_safetensors_folder(folder), cfg, ids, pixels, model.config.image_token_id)
    assert ref.abs().max() < 25
    assert (ours - ref).abs().max() <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize(("backbone", "vit"), CASES)
def test_original_native_original_is_bit_identical(original, backbone, vit, tmp_path):
    folder = original(backbone, vit)
    native = C.convert_checkpoint(folder, tmp_path / "native", "native")
    back = C.convert_checkpoint(native, tmp_path / "orig", "original")
    assert (back / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    a, b = C.read_safetensors_folder(folder), C.read_safetensors_folder(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_internlm2_wqkv_split_by_hand(original):
    """The grouped interleave, checked on hand-picked rows: 4 query heads, 2 KV heads, head_dim 16,
    so each KV group holds rows [q_j0, q_j1, k, v] of 16 rows each (64 rows per group)."""
    folder = original("internlm2", "300m")
    sd = C.read_safetensors_folder(folder)
    model = load_model(str(folder))
    native = model.state_dict()
    wqkv = sd["language_model.model.layers.1.attention.wqkv.weight"]
    attn = "model.language_model.layers.1.self_attn."
    d = 16
    q, k, v = (native[f"{attn}{n}_proj.weight"] for n in "qkv")
    assert q.shape == (4 * d, 64) and k.shape == v.shape == (2 * d, 64)
    assert torch.equal(q[0:d], wqkv[0:d])  # query head 0 = group 0, first
    assert torch.equal(q[d : 2 * d], wqkv[d : 2 * d])  # query head 1 = group 0, second
    assert torch.equal(q[2 * d : 3 * d], wqkv[4 * d : 5 * d])  # query head 2 = group 1, first
    assert torch.equal(k[0:d], wqkv[2 * d : 3 * d]) and torch.equal(k[d:], wqkv[6 * d : 7 * d])
    assert torch.equal(v[0:d], wqkv[3 * d : 4 * d]) and torch.equal(v[d:], wqkv[7 * d : 8 * d])
    names = {
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj",
        "attention.wo": "self_attn.o_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for orig_name, native_name in names.items():
        assert torch.equal(
            sd[f"language_model.model.layers.0.{orig_name}.weight"],
            native[f"model.language_model.layers.0.{native_name}.weight"],
        )
    assert torch.equal(sd["language_model.output.weight"], native["lm_head.weight"])
    assert type(model.model.language_model).__name__ == "LlamaModel"
    assert model.config.text_config.model_type == "llama"


def test_a_naive_wqkv_split_would_be_caught(original):
    """The logits test can fail: reading wqkv as plain [q; k; v] thirds (the ViT's rule) moves the
    logits by far more than its bound."""
    folder = original("internlm2", "300m")
    cfg = json.loads((folder / "config.json").read_text())
    sd = C.read_safetensors_folder(folder)
    model = load_model(str(folder))
    ids, pixels = _inputs(model)
    with torch.no_grad():
        ours = model(input_ids=ids[None], pixel_values=pixels).logits[0].double()
    wrong = dict(sd)
    for i in range(2):
        key = f"language_model.model.layers.{i}.attention.wqkv.weight"
        rows = sd[key].reshape(2, 4, 16, 64)  # (kv, gs, d, in)
        q, k, v = rows[:, :2].reshape(64, 64), rows[:, 2].reshape(32, 64), rows[:, 3].reshape(32, 64)
        wrong[key] = torch.cat([q, k, v])  # what a thirds-style reader would assume
    ref_wrong = reference_logits(wrong, cfg, ids, pixels, model.config.image_token_id)
    assert (ours - ref_wrong).abs().max() > 1e-2


def test_qwen3_tied_head_and_float32_projector_survive(tmp_path):
    """InternVL3.5: tying is read from the top level (the saved llm_config omits it); a float32
    mlp1 beside bfloat16 weights is converted as stored, in both directions."""
    folder = save_tiny_original(
        tmp_path / "o", "qwen3", "300m", dtype=torch.bfloat16, mlp1_dtype=torch.float32
    )
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "tie_word_embeddings" not in cfg["llm_config"]
    assert cfg["llm_config"]["head_dim"] == 24  # != hidden 64 / 4 heads
    model = C.load_original_as_native(folder)
    assert model.config.tie_word_embeddings and model.config.text_config.head_dim == 24
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.float32
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    native = C.convert_checkpoint(folder, tmp_path / "n", "native")
    back = C.convert_checkpoint(native, tmp_path / "b", "original")
    a, b = C.read_safetensors_folder(folder), C.read_safetensors_folder(back)
    assert "language_model.lm_head.weight" not in b and sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert b["mlp1.1.weight"].dtype == torch.float32


def test_untied_original_without_head_is_an_error(original, tmp_path):
    from safetensors.torch import save_file

    src = original("internlm2", "300m")
    broken = tmp_path / "nohead"
    broken.mkdir()
    sd = {k: v for k, v in C.read_safetensors_folder(src).items() if k != "language_model.output.weight"}
    save_file(sd, str(broken / "model.safetensors"))
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(C.FormatError, match="tie_word_embeddings is false"):
        C.load_original_as_native(broken)


def test_native_without_stash_goes_back_to_internlm2_with_llm_arch(original, tmp_path):
    """A native -hf InternVL2.5-8B has a Llama text model and no record of InternLM2:
    ``--llm-arch InternLM2ForCausalLM`` writes the InternLM2 layout again."""
    folder = original("internlm2", "300m")
    native = C.convert_checkpoint(folder, tmp_path / "n", "native")
    cfg = json.loads((native / "config.json").read_text())
    del cfg[C.STASH_KEY]
    (native / "config.json").write_text(json.dumps(cfg))
    plain = C.convert_checkpoint(native, tmp_path / "llama", "original")
    assert json.loads((plain / "config.json").read_text())["llm_config"]["architectures"] == [
        "LlamaForCausalLM"
    ]
    argv = [
        "convert",
        "--to",
        "original",
        "--llm-arch",
        "InternLM2ForCausalLM",
        str(native),
        str(tmp_path / "o"),
    ]
    assert mpo_main(argv) == 0
    back = tmp_path / "o"
    out_cfg = json.loads((back / "config.json").read_text())
    assert out_cfg["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    assert out_cfg["llm_config"]["model_type"] == "internlm2" and out_cfg["llm_config"]["bias"] is False
    assert (
        out_cfg["template"] == "internvl2_5"
    )  # from the tokenizer's (ChatML) chat template: none -> default
    a, b = C.read_safetensors_folder(folder), C.read_safetensors_folder(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = C.load_original_as_native(back)
    ids, pixels = _inputs(reloaded)
    ref = load_model(str(folder))
    with torch.no_grad():
        assert torch.equal(
            reloaded(input_ids=ids[None], pixel_values=pixels).logits,
            ref(input_ids=ids[None], pixel_values=pixels).logits,
        )


@pytest.mark.parametrize(
    ("arch", "named"),
    [
        ("GptOssForCausalLM", "GPT-OSS mixture-of-experts"),
        ("Qwen3MoeForCausalLM", "Qwen3 mixture-of-experts"),
        ("MambaForCausalLM", "unknown LLM architecture"),
    ],
)
def test_unsupported_llms_are_refused_in_one_line(original, tmp_path, capsys, arch, named):
    folder = tmp_path / "m"
    folder.mkdir()
    src = original("qwen2", "300m")
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["llm_config"]["architectures"] = [arch]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert mpo_main(["convert", "--to", "native", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert f"llm_config.architectures=['{arch}']" in err[0] and named in err[0]
    assert "supported: InternLM2ForCausalLM, InternLM3ForCausalLM, LlamaForCausalLM" in err[0]
    with pytest.raises(ModelLoadError, match="llm_config.architectures"):
        check_model_path(str(folder))


def test_tokenizer_of_each_family_and_its_template(original):
    """Sentencepiece-like tokenizers for InternLM2/InternLM3/Llama/Phi-3 (BOS added, no byte-level
    merges), byte-level BPE for Qwen; load_tokenizer records the checkpoint's template."""
    expected = {"qwen2": "internvl2_5", "internlm2": "internvl2_5", "llama": "Hermes-2", "phi3": "phi3-chat"}
    for backbone, template in expected.items():
        tok = load_tokenizer(str(original(backbone, "300m")))
        assert tok.internvl_template == template
        bos_added = tok("a")["input_ids"][0] == tok.bos_token_id
        assert bos_added == (backbone != "qwen2")
    phi3 = load_tokenizer(str(original("phi3", "300m")))
    assert len(phi3("<|user|>\nhi<|end|>", add_special_tokens=False)["input_ids"]) == 4


def test_remote_code_tokenizer_config_loads_without_running_it(original, tmp_path):
    """Original InternLM2 folders name InternLM2Tokenizer in auto_map (remote code): loaded with
    transformers' generic backend instead, with the same ids."""
    src = original("internlm2", "300m")
    folder = tmp_path / "remote"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {
        "AutoTokenizer": [
            "tokenization_internlm2.InternLM2Tokenizer",
            "tokenization_internlm2_fast.InternLM2TokenizerFast",
        ]
    }
    tok_cfg["tokenizer_class"] = "InternLM2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    tok, ref = load_tokenizer(str(folder)), load_tokenizer(str(src))
    text = "<|im_start|>user\nWhat color is the shape ?<|im_end|>"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.internvl_template == "internvl2_5"
    model = load_model(str(folder))
    assert model.config.image_token_id == ref.convert_tokens_to_ids("<IMG_CONTEXT>")


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_llm_target_resolves_for_every_backbone(original, backbone):
    """``target: llm`` adapts every linear layer of every decoder layer as it is in memory (Phi-3's
    fused qkv_proj/gate_up_proj included) and nothing of the ViT."""
    from mpo.model.lora import apply_lora

    model = load_model(str(original(backbone, "300m")))
    decoder = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".language_model.layers." in n
    }
    peft = apply_lora(model, {"target": "llm", "r": 2})
    adapted = {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert adapted == decoder and len(decoder) == 2 * (7 if backbone != "phi3" else 4)


def test_lora_accepts_internlm2_module_names(original):
    from mpo.model.lora import apply_lora

    model = load_model(str(original("internlm2", "300m")))
    peft = apply_lora(model, {"target": "llm", "r": 2, "target_modules": ["wqkv", "wo"]})
    leaves = {n.rsplit(".", 1)[-1] for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_mpo_trains_and_exports_every_backbone(original, backbone, demo_data, tmp_path):
    """10 MPO steps on CPU from an ORIGINAL checkpoint of each backbone, then ``final/`` back to
    the original layout with ``mpo export --format original``."""
    from mpo.config import load_config
    from mpo.run import run_training

    folder = original(backbone, "300m")
    cfg = load_config(
        None,
        [
            f"model.path={folder}",
            f"data.meta_path={demo_data['train']}",
            f"training.output_dir={tmp_path / 'run'}",
            "data.max_dynamic_patch=2",
            "training.max_steps=10",
            "training.per_device_train_batch_size=2",
            "training.learning_rate=1e-3",
            "training.save_steps=100",
            "training.use_cpu=true",
            "training.report_to=none",
            "training.disable_tqdm=true",
        ],
    )
    summary = run_training(cfg)
    assert summary["global_step"] == 10 and torch.isfinite(torch.tensor(summary["train_loss"]))
    final = tmp_path / "run" / "final"
    jinja = (final / "chat_template.jinja").read_text()
    template = json.loads((folder / "config.json").read_text())["template"]
    assert jinja.startswith("{#- internvl template: " + template)
    assert mpo_main(["export", "--format", "original", str(final), str(tmp_path / "orig")]) == 0
    out_cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    src_cfg = json.loads((folder / "config.json").read_text())
    assert out_cfg["llm_config"]["architectures"] == src_cfg["llm_config"]["architectures"]
    assert (
        out_cfg["template"] == template and out_cfg["tie_word_embeddings"] == src_cfg["tie_word_embeddings"]
    )
    before, after = C.read_safetensors_folder(folder), C.read_safetensors_folder(tmp_path / "orig")
    assert sorted(before) == sorted(after)  # the original layout, wqkv and all
    assert any(not torch.equal(before[k], after[k]) for k in before)  # and it trained


# What a 4.x ``PretrainedConfig.to_dict`` writes into an original config's llm_config besides the
# architecture (InternVL's own to_dict dumps it whole).
LEGACY_KEYS = {
    "add_cross_attention": False, "bad_words_ids": None, "chunk_size_feed_forward": 0, "do_sample": False,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "max_length": 20, "num_beams": 1, "output_attentions": False, "pruned_heads": {}, "return_dict": True,
    "temperature": 1.0, "tie_encoder_decoder": False, "top_k": 50, "torchscript": False, "use_bfloat16": True,
    "attn_implementation": "flash_attention_2", "transformers_version": "4.37.2",
}  # fmt: skip
INTERNVL2_5_8B_LLM = {
    # llm_config fields of OpenGVLab/InternVL2_5-8B-MPO (InternLM2.5-7B-chat).
    "_name_or_path": "internlm/internlm2_5-7b-chat",
    "architectures": ["InternLM2ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    },
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "internlm2",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 2.0, "type": "dynamic"},
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 92553,
    **LEGACY_KEYS,
}


def test_realistic_internlm2_config_maps_and_round_trips(tmp_path):
    from test_convert import REALISTIC_ORIGINAL
    from transformers import InternVLConfig

    orig = json.loads(json.dumps(REALISTIC_ORIGINAL))
    orig["llm_config"] = INTERNVL2_5_8B_LLM
    native = C.original_to_native_config(orig, image_token_id=92546)
    native.save_pretrained(tmp_path)
    loaded = InternVLConfig.from_pretrained(tmp_path)
    t = loaded.text_config
    assert t.model_type == "llama" and (t.num_key_value_heads, t.head_dim, t.vocab_size) == (8, 128, 92553)
    assert t.attention_bias is False and t.mlp_bias is False and t.rms_norm_eps == 1e-5
    assert t.rope_parameters["rope_type"] == "dynamic" and t.rope_parameters["factor"] == 2.0
    assert t.rope_parameters["rope_theta"] == 1000000 and t.tie_word_embeddings is False
    assert C.native_to_original_config(loaded) == orig
