"""Checkpoint formats: detection, original <-> native mapping, lossless round trips, same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

from mpo.cli import main as mpo_main
from mpo.model import convert as C
from mpo.model.loading import ModelLoadError, check_model_path, load_model, load_tokenizer


def _inputs(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """A prompt with one image span of the model's size and its pixel values."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n = cfg.image_seq_length
    ids = [1, 7, 9] + [cfg.image_token_id] * n + [11, 12, 13]
    size = cfg.vision_config.image_size[0]
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, size, size, generator=g)}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def biased_native_dir(tmp_path_factory, tokenizer):
    """Tiny native model with q/k/v biases and QK-norm, so the qkv split/concat covers every tensor."""
    from mpo.model.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("native-biased")
    model = build_tiny_model(tokenizer, seed=3, vision={"attention_bias": True, "use_qk_norm": True})
    with torch.no_grad():  # non-trivial norm/scale values so a swapped tensor shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or "lambda" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["plain", "biased"])
def native_dir(request, tiny_model_dir, biased_native_dir):
    return tiny_model_dir if request.param == "plain" else biased_native_dir


@pytest.fixture(scope="module")
def original_dir(native_dir, tmp_path_factory):
    """An ORIGINAL-format checkpoint made from the tiny native one by our inverse mapping."""
    return C.convert_checkpoint(native_dir, tmp_path_factory.mktemp("orig") / "m", "original")


def test_detect_format(native_dir, original_dir):
    assert C.detect_format(native_dir) == "native"
    assert C.detect_format(original_dir) == "original"


def test_original_layout_matches_the_remote_code_names(native_dir, original_dir):
    """Keys, fused qkv and config fields are those of InternVLChatModel checkpoints."""
    native = load_file(str(next(Path(native_dir).glob("*.safetensors"))))
    orig = C.read_safetensors_folder(Path(original_dir))
    cfg = json.loads((Path(original_dir) / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLChatModel"] and cfg["model_type"] == "internvl_chat"
    assert cfg["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["vision_config"]["architectures"] == ["InternVisionModel"]
    assert cfg["template"] == "internvl2_5" and cfg["ps_version"] == "v2"
    assert cfg["force_image_size"] == 64 and cfg["downsample_ratio"] == 0.5
    assert cfg["tie_word_embeddings"] is False and cfg["llm_config"]["tie_word_embeddings"] is False
    assert cfg["llm_config"]["rope_theta"] == 1000000.0
    assert all(k.split(".")[0] in ("vision_model", "mlp1", "language_model") for k in orig)
    # On disk the native layout is vision_tower.* / language_model.model.* (no lm_head: tied).
    for i in range(2):
        src = f"vision_tower.encoder.layer.{i}.attention."
        qkv = torch.cat([native[src + f"{n}_proj.weight"] for n in "qkv"])
        assert torch.equal(orig[f"vision_model.encoder.layers.{i}.attn.qkv.weight"], qkv)
        assert torch.equal(
            orig[f"vision_model.encoder.layers.{i}.ls1"], native[f"vision_tower.encoder.layer.{i}.lambda_1"]
        )
    assert torch.equal(
        orig["vision_model.embeddings.class_embedding"], native["vision_tower.embeddings.cls_token"]
    )
    assert torch.equal(orig["mlp1.0.weight"], native["multi_modal_projector.layer_norm.weight"])
    assert torch.equal(orig["mlp1.3.weight"], native["multi_modal_projector.linear_2.weight"])
    # The separate lm_head the original format needs is the tied embedding's copy.
    embed = (
        native["language_model.model.embed_tokens.weight"]
        if "language_model.model.embed_tokens.weight" in native
        else native["model.language_model.embed_tokens.weight"]
    )
    assert torch.equal(orig["language_model.lm_head.weight"], embed)


def test_original_native_original_is_bit_identical(original_dir, tmp_path):
    nat = C.convert_checkpoint(original_dir, tmp_path / "native", "native")
    back = C.convert_checkpoint(nat, tmp_path / "orig2", "original")
    assert (Path(original_dir) / "config.json").read_bytes() == (back / "config.json").read_bytes()
    a, b = C.read_safetensors_folder(Path(original_dir)), C.read_safetensors_folder(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # Tokenizer and generation files travel with the weights.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / name).read_bytes() == (Path(original_dir) / name).read_bytes()


def test_logits_unchanged_by_conversion(native_dir, original_dir, tmp_path):
    ref = InternVLForConditionalGeneration.from_pretrained(str(native_dir)).eval()
    inputs = _inputs(ref)
    expected = _logits(ref, inputs)
    in_memory = C.load_original_as_native(original_dir)
    assert torch.equal(_logits(in_memory, inputs), expected)
    on_disk = InternVLForConditionalGeneration.from_pretrained(
        str(C.convert_checkpoint(original_dir, tmp_path / "n", "native"))
    )
    assert torch.equal(_logits(on_disk.eval(), inputs), expected)
    # Native -> original -> native keeps every tensor (the head is now an untied copy).
    ref_sd, back_sd = ref.state_dict(), on_disk.state_dict()
    assert set(ref_sd) == set(back_sd)
    assert all(torch.equal(ref_sd[k], back_sd[k]) for k in ref_sd)


def test_load_model_and_tokenizer_accept_original_folders(original_dir, native_dir):
    model = load_model(str(original_dir))
    ref = InternVLForConditionalGeneration.from_pretrained(str(native_dir)).eval()
    inputs = _inputs(ref, seed=1)
    assert torch.equal(_logits(model, inputs), _logits(ref, inputs))
    tok = load_tokenizer(str(original_dir))
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == model.config.image_token_id


REALISTIC_ORIGINAL = {
    # Fields as in OpenGVLab/InternVL2_5-1B-MPO config.json (sizes of InternViT-300M + Qwen2.5-0.5B).
    "_name_or_path": "OpenGVLab/InternVL2_5-1B-MPO",
    "architectures": ["InternVLChatModel"],
    "auto_map": {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    },
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "llm_config": {
        "_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_bfloat16": True,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151674,
    },
    "max_dynamic_patch": 12,
    "min_dynamic_patch": 1,
    "model_type": "internvl_chat",
    "pad2square": False,
    "ps_version": "v2",
    "select_layer": -1,
    "template": "internvl2_5",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "use_thumbnail": True,
    "vision_config": {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "image_size": 448,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-06,
        "model_type": "intern_vit_6b",
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "qk_normalization": False,
        "qkv_bias": True,
        "use_flash_attn": True,
    },
}


def test_realistic_config_maps_and_round_trips(tmp_path):
    native = C.original_to_native_config(REALISTIC_ORIGINAL, image_token_id=151667)
    native.save_pretrained(tmp_path)  # through config.json, as convert does
    loaded = InternVLConfig.from_pretrained(tmp_path)
    v, t = loaded.vision_config, loaded.text_config
    assert (loaded.image_seq_length, loaded.image_token_id, loaded.downsample_ratio) == (256, 151667, 0.5)
    assert (
        v.image_size == [448, 448]
        and v.patch_size == [14, 14]
        and v.attention_bias is True
        and v.use_qk_norm is False
    )
    assert v.use_mean_pooling is True  # InternViT has no final LayerNorm
    assert (t.hidden_size, t.num_key_value_heads, t.vocab_size, t.tie_word_embeddings) == (
        896,
        2,
        151674,
        False,
    )
    assert t.rope_parameters["rope_theta"] == 1000000.0
    assert loaded.projector_hidden_act == "gelu" and loaded.tie_word_embeddings is False
    assert C.native_to_original_config(loaded) == REALISTIC_ORIGINAL


def test_force_image_size_wins_over_vit_default():
    orig = json.loads(json.dumps(REALISTIC_ORIGINAL))
    orig["force_image_size"] = 224
    native = C.original_to_native_config(orig, image_token_id=1)
    assert tuple(native.vision_config.image_size) == (224, 224) and native.image_seq_length == 64


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(ps_version="v1"), "ps_version"),
        (lambda c: c["llm_config"].update(architectures=["GptOssForCausalLM"]), "GPT-OSS mixture-of-experts"),
        (lambda c: c["llm_config"].update(architectures=["MysteryForCausalLM"]), "llm_config.architectures"),
        (lambda c: c["vision_config"].update(qk_normalization=True, layer_norm_eps=1e-5), "layer_norm_eps"),
    ],
)
def test_unsupported_original_configs_are_named(edit, message):
    orig = json.loads(json.dumps(REALISTIC_ORIGINAL))
    edit(orig)
    with pytest.raises(C.FormatError, match=message):
        C.original_to_native_config(orig, image_token_id=1)


def test_unknown_weight_key_is_an_error():
    with pytest.raises(C.FormatError, match="vision_model.encoder.layers.0.attn.mystery"):
        C.original_to_native_state_dict({"vision_model.encoder.layers.0.attn.mystery.weight": torch.zeros(1)})
    with pytest.raises(C.FormatError, match="mlp1.2"):
        C.original_to_native_state_dict({"mlp1.2.weight": torch.zeros(1)})


def test_bad_folders_have_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(C.FormatError, match="no config.json"):
        C.detect_format(empty)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(C.FormatError, match="not an InternVL checkpoint"):
        C.detect_format(llama)
    with pytest.raises(ModelLoadError, match="expected an InternVL checkpoint"):
        check_model_path(str(llama))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "internvl",')
    with pytest.raises(C.FormatError, match="not valid JSON"):
        C.detect_format(broken)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(
        json.dumps({"architectures": ["InternVLChatModel"], "vision_config": {}, "llm_config": {}})
    )
    with pytest.raises(C.FormatError, match="no \\*.safetensors"):
        C.detect_format(no_weights)
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    save_file({"x": torch.zeros(1)}, str(half / "model.safetensors"))
    with pytest.raises(C.FormatError, match="lacks the 'vision_config' section"):
        C.detect_format(half)


def test_cli_convert(original_dir, tmp_path, capsys):
    assert mpo_main(["convert", "--to", "native", str(original_dir), str(tmp_path / "out")]) == 0
    assert C.detect_format(tmp_path / "out") == "native"
    assert mpo_main(["convert", "--to", "native", str(tmp_path), str(tmp_path / "out2")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_converting_a_training_checkpoint_leaves_its_training_state_behind(native_dir, tmp_path, capsys):
    """A converted checkpoint-N is a model, not a resumable checkpoint; outputs never overwrite."""
    import shutil

    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(native_dir, ckpt)
    for name in ("trainer_state.json", "mpo_state.json", "checkpoint_complete.json"):
        (ckpt / name).write_text("{}")
    assert mpo_main(["convert", "--to", "original", str(ckpt), str(tmp_path / "orig")]) == 0
    names = {p.name for p in (tmp_path / "orig").iterdir()}
    assert not names & {"trainer_state.json", "mpo_state.json", "checkpoint_complete.json"}
    assert "tokenizer.json" in names
    assert mpo_main(["convert", "--to", "native", str(ckpt), str(tmp_path / "orig")]) == 2
    assert "is not empty" in capsys.readouterr().err
