"""InternVL checkpoint formats: original remote-code ``InternVLChatModel`` <-> native ``-hf``.

Two layouts of the same network exist on the hub (docs/internvl-format.md §1):

* original (``OpenGVLab/InternVL2_5-1B-MPO``, served by LMDeploy): ``architectures:
  ["InternVLChatModel"]``, a config with ``vision_config`` / ``llm_config``, keys ``vision_model.*``,
  ``mlp1.*``, ``language_model.{model,lm_head}.*`` and a fused ``attn.qkv`` in every ViT layer;
* native (``OpenGVLab/InternVL2_5-1B-MPO-hf``, transformers' ``InternVLForConditionalGeneration``,
  served by vLLM and transformers): ``model_type: "internvl"``, ``vision_config`` / ``text_config``.

Both directions are written here from the key list in docs/internvl-format.md §1 and checked by round trips
in ``tests/test_convert.py``; nothing runs the checkpoint's remote code. The native config keeps
the original config under ``mpo_original_config`` so that original -> native -> original gives the
same config back (fields the weights determine are always re-derived from the native config).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

logger = logging.getLogger(__name__)

ORIGINAL_ARCH = "InternVLChatModel"
NATIVE_MODEL_TYPE = "internvl"
STASH_KEY = "mpo_original_config"  # the original config.json, carried inside a converted native config
IMG_CONTEXT = "<IMG_CONTEXT>"
# LLM families whose original keys (``language_model.model.*``) equal the native ones.
SUPPORTED_LLMS = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CONFIG_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
SHARD_BYTES = 5 * 1024**3


class FormatError(ValueError):
    """A folder or config that is not an InternVL checkpoint in a format we can read."""


# ---- detection ---------------------------------------------------------------------------------
def read_config(folder: str | Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict, with a clear error when it is missing or not JSON."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise FormatError(f"{folder}: no such folder")
    if not path.is_file():
        raise FormatError(f"{folder}: no config.json, so this folder is not a checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc


def config_format(config: dict[str, Any], where: str = "config.json") -> str:
    """``"original"`` or ``"native"`` for an InternVL config dict; FormatError for anything else."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if ORIGINAL_ARCH in architectures or model_type == "internvl_chat":
        for key in ("vision_config", "llm_config"):
            if not isinstance(config.get(key), dict):
                raise FormatError(
                    f"{where}: original InternVL config (InternVLChatModel) lacks the '{key}' section"
                )
        return "original"
    if model_type == NATIVE_MODEL_TYPE:
        return "native"
    raise FormatError(
        f"{where}: model_type={model_type!r}, architectures={architectures}: not an InternVL checkpoint "
        "(expected native model_type 'internvl' or original architectures ['InternVLChatModel'])"
    )


def detect_format(folder: str | Path) -> str:
    """``"original"`` or ``"native"`` for a local checkpoint folder.

    Raises:
        FormatError: missing folder/config, a non-InternVL config, or a config without weights.
    """
    config = read_config(folder)
    fmt = config_format(config, f"{folder}/config.json")
    if not _weight_files(Path(folder)):
        raise FormatError(
            f"{folder}: config.json says {fmt} InternVL but the folder holds no *.safetensors weights"
        )
    return fmt


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# ---- weights: original <-> native (in-memory native key names) ---------------------------------
# Per-layer renames of the vision tower, original -> native; qkv is handled apart (split in thirds).
_VIT_LAYER = {
    "ls1": "lambda_1",
    "ls2": "lambda_2",
    "attn.proj.weight": "attention.projection_layer.weight",
    "attn.proj.bias": "attention.projection_layer.bias",
    "attn.q_norm.weight": "attention.q_norm.weight",
    "attn.q_norm.bias": "attention.q_norm.bias",
    "attn.k_norm.weight": "attention.k_norm.weight",
    "attn.k_norm.bias": "attention.k_norm.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
}
_VIT_EMBED = {
    "embeddings.class_embedding": "embeddings.cls_token",
    "embeddings.position_embedding": "embeddings.position_embeddings",
    "embeddings.patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embedding.bias": "embeddings.patch_embeddings.projection.bias",
}
# mlp1 is nn.Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, 3.
_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
_ORIG_LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_NATIVE_LAYER_RE = re.compile(r"^model\.vision_tower\.encoder\.layer\.(\d+)\.(.+)$")


def original_to_native_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split the fused ``qkv`` of) an original state dict into native in-memory keys.

    Args:
        sd: original keys, e.g. ``vision_model.encoder.layers.0.attn.qkv.weight`` ``(3D, D)``.

    Returns:
        Native keys (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
        ``model.language_model.*``, ``lm_head.weight``); q/k/v are ``(D, D)`` views of ``qkv``.

    Raises:
        FormatError: on a key outside the known layout (never silently dropped).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("vision_model."):
            out.update(_vision_key_to_native(key, value))
        elif key.startswith("mlp1."):
            idx, _, leaf = key[len("mlp1.") :].partition(".")
            if idx not in _PROJECTOR:
                raise FormatError(f"weight '{key}': unknown projector layer mlp1.{idx} (expected 0, 1 or 3)")
            out[f"model.multi_modal_projector.{_PROJECTOR[idx]}.{leaf}"] = value
        elif key.startswith("language_model.model."):
            out["model.language_model." + key[len("language_model.model.") :]] = value
        elif key == "language_model.lm_head.weight":
            out["lm_head.weight"] = value
        else:
            raise FormatError(
                f"weight '{key}': not part of the original InternVL layout (vision_model/mlp1/language_model)"
            )
    return out


def _vision_key_to_native(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    rest = key[len("vision_model.") :]
    if rest in _VIT_EMBED:
        return {f"model.vision_tower.{_VIT_EMBED[rest]}": value}
    m = _ORIG_LAYER_RE.match(key)
    if not m:
        raise FormatError(f"weight '{key}': unknown vision weight")
    i, leaf = m.group(1), m.group(2)
    prefix = f"model.vision_tower.encoder.layer.{i}."
    if leaf in ("attn.qkv.weight", "attn.qkv.bias"):
        # The fused projection stacks q, k, v along dim 0 (InternViT ``InternAttention``).
        q, k, v = value.chunk(3, dim=0)
        kind = leaf.rsplit(".", 1)[1]
        return {f"{prefix}attention.{n}_proj.{kind}": t.contiguous() for n, t in zip("qkv", (q, k, v))}
    if leaf not in _VIT_LAYER:
        raise FormatError(f"weight '{key}': unknown vision layer weight '{leaf}'")
    return {prefix + _VIT_LAYER[leaf]: value}


def native_to_original_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`original_to_native_state_dict` (q/k/v concatenated back into ``qkv``).

    Args:
        sd: native in-memory keys; must hold ``lm_head.weight`` (a tied model's head is passed
            explicitly, since the original format keeps a separate ``lm_head``).
    """
    inv_layer = {v: k for k, v in _VIT_LAYER.items()}
    inv_embed = {v: k for k, v in _VIT_EMBED.items()}
    inv_proj = {v: k for k, v in _PROJECTOR.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith("model.vision_tower."):
            rest = key[len("model.vision_tower.") :]
            m = _NATIVE_LAYER_RE.match(key)
            if rest in inv_embed:
                out[f"vision_model.{inv_embed[rest]}"] = value
            elif m and re.fullmatch(r"attention\.[qkv]_proj\.(weight|bias)", m.group(2)):
                name, kind = m.group(2).split(".")[1:]
                qkv.setdefault((m.group(1), kind), {})[name[0]] = value
            elif m and m.group(2) in inv_layer:
                out[f"vision_model.encoder.layers.{m.group(1)}.{inv_layer[m.group(2)]}"] = value
            else:
                raise FormatError(f"weight '{key}': no original counterpart (unsupported vision option?)")
        elif key.startswith("model.multi_modal_projector."):
            mod, _, leaf = key[len("model.multi_modal_projector.") :].partition(".")
            if mod not in inv_proj:
                raise FormatError(f"weight '{key}': unknown projector module '{mod}'")
            out[f"mlp1.{inv_proj[mod]}.{leaf}"] = value
        elif key.startswith("model.language_model."):
            out["language_model.model." + key[len("model.language_model.") :]] = value
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = value
        else:
            raise FormatError(f"weight '{key}': not part of the native InternVL layout")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise FormatError(f"vision layer {i}: {kind} of q/k/v incomplete ({sorted(parts)})")
        out[f"vision_model.encoder.layers.{i}.attn.qkv.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out


# ---- configs -----------------------------------------------------------------------------------
def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def original_to_native_config(
    orig: dict[str, Any], image_token_id: int, has_lm_head: bool = True
) -> InternVLConfig:
    """Native ``InternVLConfig`` for an original config dict.

    Args:
        orig: the original ``config.json``.
        image_token_id: id of ``<IMG_CONTEXT>``; the original config does not carry it (the
            remote code reads it from the tokenizer), so the caller takes it from the tokenizer.
        has_lm_head: the checkpoint stores ``language_model.lm_head.weight``; then the head stays
            untied (the original config forces ``tie_word_embeddings`` false).
    """
    vc, lc = orig["vision_config"], orig["llm_config"]
    if orig.get("ps_version", "v1") != "v2":
        raise FormatError(
            f"config.json: ps_version={orig.get('ps_version')!r}; the native model implements pixel shuffle 'v2' only"
        )
    if vc.get("norm_type", "rms_norm") not in ("layer_norm", "rms_norm"):
        raise FormatError(f"config.json: vision_config.norm_type={vc.get('norm_type')!r} is not supported")
    arch = (lc.get("architectures") or [None])[0]
    if arch not in SUPPORTED_LLMS:
        raise FormatError(
            f"config.json: llm_config.architectures={lc.get('architectures')}; supported: {sorted(SUPPORTED_LLMS)}"
        )
    # The checkpoint's own tile size wins over the ViT default: never assume 448.
    image_size = int(orig.get("force_image_size") or _first(vc["image_size"]))
    patch = int(_first(vc["patch_size"]))
    vision = InternVLVisionConfig(
        hidden_size=vc["hidden_size"],
        num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"],
        intermediate_size=vc["intermediate_size"],
        attention_bias=bool(vc.get("qkv_bias", False)),
        use_qk_norm=bool(vc.get("qk_normalization", True)),
        hidden_act=vc.get("hidden_act", "gelu"),
        norm_type=vc.get("norm_type", "rms_norm"),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        attention_dropout=vc.get("attention_dropout", 0.0),
        hidden_dropout_prob=vc.get("dropout", 0.0),
        initializer_range=vc.get("initializer_range", 0.02),
        layer_scale_init_value=vc.get("initializer_factor", 0.1),
        image_size=image_size,
        patch_size=patch,
        num_channels=vc.get("num_channels", 3),
        # InternViT has no final LayerNorm; use_mean_pooling=True keeps the native one an Identity.
        use_mean_pooling=True,
    )
    text_kwargs = {
        k: v
        for k, v in lc.items()
        if k not in ("model_type", "transformers_version", "auto_map", "_name_or_path")
    }
    text_kwargs["tie_word_embeddings"] = not has_lm_head
    text = AutoConfig.for_model(SUPPORTED_LLMS[arch], **text_kwargs)
    ratio = float(orig.get("downsample_ratio", 0.5))
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=int((image_size // patch) ** 2 * ratio**2),
        downsample_ratio=ratio,
        projector_hidden_act="gelu",  # mlp1 uses nn.GELU(): exact erf GELU, transformers' "gelu"
        vision_feature_layer=int(orig.get("select_layer", -1)),
        vision_feature_select_strategy="default",  # the CLS token is dropped before projection
        tie_word_embeddings=not has_lm_head,
    )
    # Kept as a JSON string so PretrainedConfig's (de)serialisation cannot touch its nested keys.
    setattr(config, STASH_KEY, json.dumps(orig, sort_keys=True))
    return config


# Fields the native config determines; everything else in the original config comes from the stash.
_LLM_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act", "bos_token_id", "eos_token_id",
    "pad_token_id", "attention_dropout", "sliding_window", "use_sliding_window", "max_window_layers",
)  # fmt: skip


def native_to_original_config(native: InternVLConfig | dict[str, Any]) -> dict[str, Any]:
    """Original ``config.json`` dict for a native config.

    Starts from the stashed original config when the native one was converted from it (so the
    round trip returns it unchanged) or from InternVL2.5's defaults, then writes every field the
    native config determines.
    """
    cfg = native.to_dict() if hasattr(native, "to_dict") else copy.deepcopy(native)
    vc, tc = cfg["vision_config"], cfg["text_config"]
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise FormatError(
            "native config: vision_feature_select_strategy must be 'default' (CLS dropped) for the original format"
        )
    model_type = tc.get("model_type", "qwen2")
    archs = {v: k for k, v in SUPPORTED_LLMS.items()}
    if model_type not in archs:
        raise FormatError(f"native config: text_config.model_type={model_type!r}; supported: {sorted(archs)}")
    stash = json.loads(cfg[STASH_KEY]) if isinstance(cfg.get(STASH_KEY), str) else {}
    out = _default_original_config() if not stash else copy.deepcopy(stash)
    image_size = int(_first(vc["image_size"]))
    ovc = out.setdefault("vision_config", {})
    ovc.update(
        {
            "hidden_size": vc["hidden_size"],
            "num_hidden_layers": vc["num_hidden_layers"],
            "num_attention_heads": vc["num_attention_heads"],
            "intermediate_size": vc["intermediate_size"],
            "qkv_bias": bool(vc.get("attention_bias", False)),
            "qk_normalization": bool(vc.get("use_qk_norm", False)),
            "hidden_act": vc.get("hidden_act", "gelu"),
            "norm_type": vc.get("norm_type", "layer_norm"),
            "layer_norm_eps": vc.get("layer_norm_eps", 1e-6),
            "patch_size": int(_first(vc["patch_size"])),
            "num_channels": vc.get("num_channels", 3),
        }
    )
    # The ViT's own image_size may differ from force_image_size (which wins); keep it when consistent.
    if not stash or int(out.get("force_image_size") or 0) != image_size:
        ovc["image_size"] = image_size
    olc = out.setdefault("llm_config", {})
    # Keys the original never had stay absent when native only holds a None default for them.
    olc.update({k: tc[k] for k in _LLM_FIELDS if k in tc and (k in olc or tc[k] is not None)})
    if (
        tc.get("sliding_window") is None
        and not tc.get("use_sliding_window")
        and "sliding_window" in stash.get("llm_config", {})
    ):  # noqa: E501
        # Qwen2Config nulls sliding_window when it is off; the original's inert value is kept.
        olc["sliding_window"] = stash["llm_config"]["sliding_window"]
    olc["architectures"] = [archs[model_type]]
    olc["model_type"] = model_type
    rope = tc.get("rope_parameters") or {}
    if "rope_theta" in rope or "rope_theta" in tc:
        olc["rope_theta"] = rope.get("rope_theta", tc.get("rope_theta"))
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in olc:
        olc["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    # The original keeps a separate lm_head and forces tying off (its configuration_internvl_chat.py).
    olc["tie_word_embeddings"] = False
    out["tie_word_embeddings"] = False
    out["architectures"] = [ORIGINAL_ARCH]
    out["model_type"] = "internvl_chat"
    out["force_image_size"] = image_size
    out["downsample_ratio"] = cfg.get("downsample_ratio", 0.5)
    out["select_layer"] = cfg.get("vision_feature_layer", -1)
    out["ps_version"] = "v2"
    return out


def _default_original_config() -> dict[str, Any]:
    """The fields an InternVL2.5 ``config.json`` carries besides the sizes (InternVL2_5-1B-MPO's values)."""
    return {
        "architectures": [ORIGINAL_ARCH],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "torch_dtype": "bfloat16",
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
            "model_type": "intern_vit_6b",
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "use_flash_attn": True,
        },
    }


# ---- reading / writing folders -----------------------------------------------------------------
def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's ``*.safetensors`` shards (``(name -> tensor)``)."""
    files = _weight_files(folder)
    if not files:
        raise FormatError(
            f"{folder}: no *.safetensors weights (pytorch_model.bin checkpoints are not supported)"
        )
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f))
        dup = set(part) & set(sd)
        if dup:
            raise FormatError(f"{f}: tensor {sorted(dup)[0]} also appears in another shard")
        sd.update(part)
    return sd


def _image_token_id(folder: Path) -> int:
    from transformers import AutoTokenizer

    try:
        # trust_remote_code=False: an original folder's config.json names remote code in auto_map.
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise FormatError(
            f"{folder}: cannot load the tokenizer, needed for the {IMG_CONTEXT} id: {exc}"
        ) from exc
    tid = tok.convert_tokens_to_ids(IMG_CONTEXT)
    if tid is None or tid == tok.unk_token_id:
        raise FormatError(f"{folder}: the tokenizer has no {IMG_CONTEXT} token")
    return int(tid)


def load_original_as_native(
    path: str | Path, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"
) -> InternVLForConditionalGeneration:
    """Load an original-format folder as a native model, converting in memory (no remote code).

    Args:
        path: folder with the original ``config.json``, safetensors weights and tokenizer.
        dtype: parameter dtype; None keeps the checkpoint's.
    """
    folder = Path(path)
    orig = read_config(folder)
    if config_format(orig, f"{folder}/config.json") != "original":
        raise FormatError(f"{folder}: not an original-format (InternVLChatModel) checkpoint")
    sd = original_to_native_state_dict(read_safetensors_folder(folder))
    config = original_to_native_config(orig, _image_token_id(folder), has_lm_head="lm_head.weight" in sd)
    config._name_or_path = str(folder)
    return _model_from_state_dict(config, sd, dtype, attn_implementation)


def _model_from_state_dict(config, sd, dtype, attn_implementation) -> InternVLForConditionalGeneration:
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    dtype = dtype or next(iter(sd.values())).dtype
    # Every weight comes from ``sd``: skip the random init (minutes for a 1B model on CPU).
    with no_init_weights():
        model = InternVLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    if config.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    if is_deepspeed_zero3_enabled():
        # _from_config partitioned the parameters (zero.Init); load layer by layer through
        # transformers' own ZeRO-3 loader (private, pinned version 5.23).
        from transformers.integrations.deepspeed import _load_state_dict_into_zero3_model

        errors, missing = _load_state_dict_into_zero3_model(model, sd)
        unexpected = errors
    else:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise FormatError(
            f"weights do not fit the config: missing {sorted(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def save_original(
    model: InternVLForConditionalGeneration, out_dir: str | Path, max_shard_bytes: int = SHARD_BYTES
) -> Path:
    """Write ``model`` in the original layout: ``config.json`` + safetensors (sharded with an index)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if "lm_head.weight" not in sd or model.config.tie_word_embeddings:
        # Tied heads share storage with the embeddings; the original format wants its own copy.
        sd["lm_head.weight"] = model.get_output_embeddings().weight.detach().cpu().clone()
    orig_sd = native_to_original_state_dict(sd)
    config = native_to_original_config(model.config)
    config["torch_dtype"] = str(next(iter(orig_sd.values())).dtype).removeprefix("torch.")
    _write_safetensors(orig_sd, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _write_safetensors(sd: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: sd[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
            "weight_map": split.tensor_to_filename,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# What makes a folder a resumable checkpoint: never copied into a converted model.
TRAINING_STATE_FILES = (
    "trainer_state.json",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "mpo_state.json",
    "checkpoint_complete.json",
    "latest",
    "zero_to_fp32.py",
)


def copy_side_files(src: Path, dst: Path, skip: Callable[[Path], bool] | None = None) -> list[str]:
    """Copy tokenizer/processor/generation files (everything but weights and configs) from src to dst.

    The source's files win over any that ``save_pretrained`` just wrote (e.g. a generation config
    rebuilt from the model config), so a round trip keeps them byte for byte.
    """
    copied = []
    for f in sorted(src.iterdir()):
        if (
            not f.is_file()
            or f.name in CONFIG_FILES
            or f.name in TRAINING_STATE_FILES
            or f.name.endswith(WEIGHT_SUFFIXES)
            or (skip and skip(f))
        ):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, dtype: torch.dtype | None = None) -> Path:
    """Convert a checkpoint folder on disk to ``to`` ("native" or "original").

    Weights, config and the tokenizer/processor/generation files all move to ``dst``; a folder
    already in the target format is rewritten as is (useful to re-shard or change dtype).
    """
    if to not in ("native", "original"):
        raise ValueError(f"--to must be 'native' or 'original', got {to!r}")
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"output folder {dst} is the input folder; choose another")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"output folder {dst} is not empty; choose a new one")
    fmt = detect_format(src)
    if fmt == "original":
        model = load_original_as_native(src, dtype=dtype)
    else:
        model = InternVLForConditionalGeneration.from_pretrained(str(src), dtype=dtype or "auto")
    dst.mkdir(parents=True, exist_ok=True)
    if to == "native":
        model.save_pretrained(str(dst))
    else:
        save_original(model, dst)
    copy_side_files(src, dst)
    logger.info("converted %s (%s) -> %s (%s)", src, fmt, dst, to)
    return dst
