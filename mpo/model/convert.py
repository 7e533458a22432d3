"""InternVL checkpoint formats: original remote-code ``InternVLChatModel`` <-> native ``-hf``.

Two layouts of the same network exist on the hub (docs/internvl-format.md §1):

* original (``OpenGVLab/InternVL2_5-1B-MPO``, served by LMDeploy): ``architectures:
  ["InternVLChatModel"]``, a config with ``vision_config`` / ``llm_config``, keys ``vision_model.*``,
  ``mlp1.*``, ``language_model.{model,lm_head}.*`` and a fused ``attn.qkv`` in every ViT layer;
* native (``OpenGVLab/InternVL2_5-1B-MPO-hf``, transformers' ``InternVLForConditionalGeneration``,
  served by vLLM and transformers): ``model_type: "internvl"``, ``vision_config`` / ``text_config``.

Both directions are written here from the key list in docs/internvl-format.md §1 and checked by round trips
in ``tests/test_convert.py`` and ``tests/test_family.py``; nothing runs the checkpoint's remote code.
The vision tower and projector are the same for every generation; the LLM part depends on the
backbone ``llm_config.architectures`` names (``mpo.model.backbones``: Qwen2, Qwen3, Llama,
InternLM3, Phi-3 keep the native names, InternLM2 is renamed and its ``wqkv`` split). The native
config keeps the original config under ``mpo_original_config`` so that original -> native ->
original gives the same config back (fields the weights determine are always re-derived from the
native config).
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

from mpo.model.backbones import (
    QWEN2,
    QWEN3,
    Backbone,
    BackboneError,
    Heads,
    backbone_for_arch,
    backbone_for_native,
    llm_to_native,
    llm_to_original,
    native_text_kwargs,
    original_llm_config,
)

logger = logging.getLogger(__name__)

ORIGINAL_ARCH = "InternVLChatModel"
NATIVE_MODEL_TYPE = "internvl"
STASH_KEY = "mpo_original_config"  # the original config.json, carried inside a converted native config
IMG_CONTEXT = "<IMG_CONTEXT>"
# The native InternViT's q/k RMSNorms have a fixed epsilon (InternVLVisionRMSNorm's default).
NATIVE_QK_NORM_EPS = 1e-6
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CONFIG_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
SHARD_BYTES = 5 * 1024**3


class FormatError(ValueError):
    """A folder or config that is not an InternVL checkpoint in a format we can read."""


def llm_backbone(orig: dict[str, Any], where: str = "config.json") -> Backbone:
    """The LLM backbone of an original config; FormatError (one line, naming the field) otherwise."""
    try:
        return backbone_for_arch((orig.get("llm_config") or {}).get("architectures"), where)
    except BackboneError as exc:
        raise FormatError(str(exc)) from exc


def _stash(cfg: dict[str, Any]) -> dict[str, Any]:
    """The original config a native config was converted from (empty when it never was original)."""
    return json.loads(cfg[STASH_KEY]) if isinstance(cfg.get(STASH_KEY), str) else {}


def original_tie(orig: dict[str, Any]) -> bool:
    """Whether an original checkpoint ties its LM head to the embeddings.

    InternVL2/2.5/3's ``InternVLChatConfig`` forces ``tie_word_embeddings`` false; InternVL3.5's
    copies the LLM's value to the top level (its ``configuration_internvl_chat.py``, and the saved
    ``llm_config`` may omit it), so the top level is read, and absent means untied.
    """
    return bool(orig.get("tie_word_embeddings", False))


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


def original_to_native_state_dict(
    sd: dict[str, torch.Tensor], orig: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Rename (and split the fused ``qkv``/``wqkv`` of) an original state dict into native in-memory keys.

    Args:
        sd: original keys, e.g. ``vision_model.encoder.layers.0.attn.qkv.weight`` ``(3D, D)``.
        orig: the original config, for the LLM backbone and its head counts; None: Qwen2.

    Returns:
        Native keys (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
        ``model.language_model.*``, ``lm_head.weight``); q/k/v are ``(D, D)`` copies of ``qkv``.

    Raises:
        FormatError: on a key outside the known layout (never silently dropped).
    """
    backbone = llm_backbone(orig) if orig is not None else QWEN2
    heads = Heads.from_config(_llm_sizes(backbone, orig["llm_config"])) if backbone.renamed else None
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("vision_model."):
            out.update(_vision_key_to_native(key, value))
        elif key.startswith("mlp1."):
            idx, _, leaf = key[len("mlp1.") :].partition(".")
            if idx not in _PROJECTOR:
                raise FormatError(f"weight '{key}': unknown projector layer mlp1.{idx} (expected 0, 1 or 3)")
            out[f"model.multi_modal_projector.{_PROJECTOR[idx]}.{leaf}"] = value
        elif key.startswith("language_model."):
            try:
                out.update(llm_to_native(backbone, key[len("language_model.") :], value, heads))
            except BackboneError as exc:
                raise FormatError(str(exc)) from exc
        else:
            raise FormatError(
                f"weight '{key}': not part of the original InternVL layout (vision_model/mlp1/language_model)"
            )
    return out


def _llm_sizes(backbone: Backbone, lc: dict[str, Any]) -> dict[str, Any]:
    """The native text config's sizes for an original ``llm_config`` (with the backbone's defaults)."""
    return native_text_kwargs(backbone, lc, False) if backbone.renamed else lc


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


def native_to_original_state_dict(
    sd: dict[str, torch.Tensor], backbone: Backbone = QWEN2, heads: Heads | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`original_to_native_state_dict` (q/k/v concatenated back into ``qkv``/``wqkv``).

    Args:
        sd: native in-memory keys; holds ``lm_head.weight`` unless the original keeps the head tied.
        backbone: the LLM layout to write; ``heads`` its attention sizes (needed for InternLM2).
    """
    inv_layer = {v: k for k, v in _VIT_LAYER.items()}
    inv_embed = {v: k for k, v in _VIT_EMBED.items()}
    inv_proj = {v: k for k, v in _PROJECTOR.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    llm: dict[str, torch.Tensor] = {}
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
        elif key.startswith("model.language_model.") or key == "lm_head.weight":
            llm[key] = value
        else:
            raise FormatError(f"weight '{key}': not part of the native InternVL layout")
    try:
        out.update({f"language_model.{k}": v for k, v in llm_to_original(backbone, llm, heads).items()})
    except BackboneError as exc:
        raise FormatError(str(exc)) from exc
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


def original_to_native_config(orig: dict[str, Any], image_token_id: int) -> InternVLConfig:
    """Native ``InternVLConfig`` for an original config dict.

    Args:
        orig: the original ``config.json``.
        image_token_id: id of ``<IMG_CONTEXT>``; the original config does not carry it (the
            remote code reads it from the tokenizer), so the caller takes it from the tokenizer.

    Raises:
        FormatError: a setting the native model cannot reproduce exactly, named by its field.
    """
    lc = orig["llm_config"]
    if orig.get("ps_version", "v1") != "v2":
        raise FormatError(
            f"config.json: ps_version={orig.get('ps_version')!r}; the native model implements pixel shuffle 'v2' only"
        )
    backbone = llm_backbone(orig)
    vision = _native_vision_config(orig)
    tie = original_tie(orig)
    try:
        text = AutoConfig.for_model(backbone.native_type, **native_text_kwargs(backbone, lc, tie))
    except BackboneError as exc:
        raise FormatError(f"config.json: {exc}") from exc
    ratio = float(orig.get("downsample_ratio", 0.5))
    image_size, patch = vision.image_size[0], vision.patch_size[0]
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=int((image_size // patch) ** 2 * ratio**2),
        downsample_ratio=ratio,
        projector_hidden_act="gelu",  # mlp1 uses nn.GELU(): exact erf GELU, transformers' "gelu"
        vision_feature_layer=int(orig.get("select_layer", -1)),
        vision_feature_select_strategy="default",  # the CLS token is dropped before projection
        tie_word_embeddings=tie,
    )
    # Kept as a JSON string so PretrainedConfig's (de)serialisation cannot touch its nested keys.
    setattr(config, STASH_KEY, json.dumps(orig, sort_keys=True))
    return config


def _native_vision_config(orig: dict[str, Any]) -> InternVLVisionConfig:
    """The native InternViT config (300M or 6B) for an original config.

    Defaults are ``InternVisionConfig``'s (OpenGVLab/InternVL ``configuration_intern_vit.py``:
    the 6B's qk normalisation and RMSNorm), used only where the checkpoint omits a key.
    """
    vc = orig["vision_config"]
    norm_type = vc.get("norm_type", "rms_norm")
    if norm_type not in ("layer_norm", "rms_norm"):
        raise FormatError(f"config.json: vision_config.norm_type={norm_type!r} is not supported")
    qk_norm = bool(vc.get("qk_normalization", True))
    eps = vc.get("layer_norm_eps", 1e-6)
    if qk_norm and eps != NATIVE_QK_NORM_EPS:
        # The original's q/k RMSNorms use layer_norm_eps; the native ones a fixed 1e-6.
        raise FormatError(
            f"config.json: vision_config.layer_norm_eps={eps} with qk_normalization: the native InternViT's "
            f"q/k norms use {NATIVE_QK_NORM_EPS} and would not give the same outputs"
        )
    # The checkpoint's own tile size wins over the ViT default: never assume 448.
    image_size = int(orig.get("force_image_size") or _first(vc["image_size"]))
    return InternVLVisionConfig(
        hidden_size=vc["hidden_size"],
        num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"],
        intermediate_size=vc["intermediate_size"],
        attention_bias=bool(vc.get("qkv_bias", False)),
        use_qk_norm=qk_norm,
        hidden_act=vc.get("hidden_act", "gelu"),
        norm_type=norm_type,
        layer_norm_eps=eps,
        attention_dropout=vc.get("attention_dropout", 0.0),
        hidden_dropout_prob=vc.get("dropout", 0.0),
        initializer_range=vc.get("initializer_range", 0.02),
        layer_scale_init_value=vc.get("initializer_factor", 0.1),
        image_size=image_size,
        patch_size=int(_first(vc["patch_size"])),
        num_channels=vc.get("num_channels", 3),
        # InternViT has no final LayerNorm; use_mean_pooling=True keeps the native one an Identity.
        use_mean_pooling=True,
    )


def native_backbone(cfg: dict[str, Any], llm_arch: str | None = None) -> Backbone:
    """The LLM layout to write for a native config dict: ``llm_arch`` if given, else the stashed
    original's, else the one its ``text_config.model_type`` names (``llama`` -> Llama)."""
    stash_arch = (_stash(cfg).get("llm_config") or {}).get("architectures") or [None]
    try:
        return backbone_for_native(cfg["text_config"].get("model_type", "qwen2"), llm_arch or stash_arch[0])
    except BackboneError as exc:
        raise FormatError(str(exc)) from exc


def keeps_tied_head(cfg: dict[str, Any], backbone: Backbone) -> bool:
    """Whether the original checkpoint written for a native config keeps a tied head (no lm_head).

    InternVL3.5's code honours tying (its Qwen3 models tie at 0.6B-4B), InternVL2/2.5/3's forces it
    off, so a tied model gets an explicit head unless it came from a tied original or is Qwen3.
    """
    if not cfg["text_config"].get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)):
        return False
    stash = _stash(cfg)
    return original_tie(stash) if stash else backbone is QWEN3


def native_to_original_config(
    native: InternVLConfig | dict[str, Any], llm_arch: str | None = None, template: str | None = None
) -> dict[str, Any]:
    """Original ``config.json`` dict for a native config.

    Starts from the stashed original config when the native one was converted from it (so the
    round trip returns it unchanged) or from InternVL2.5's defaults, then writes every field the
    native config determines.

    Args:
        native: the native config (object or dict).
        llm_arch: the original LLM architecture to write (``InternLM2ForCausalLM`` for a Llama text
            model that was InternLM2); default: the stashed original's, else the native type's own.
        template: the chat template name to record (``template``); default: the stashed one, else
            ``internvl2_5``.
    """
    cfg = native.to_dict() if hasattr(native, "to_dict") else copy.deepcopy(native)
    vc, tc = cfg["vision_config"], cfg["text_config"]
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise FormatError(
            "native config: vision_feature_select_strategy must be 'default' (CLS dropped) for the original format"
        )
    backbone = native_backbone(cfg, llm_arch)
    stash = _stash(cfg)
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
    if not stash or "initializer_factor" in ovc:  # InternViT's layer-scale init value (ls1/ls2 start at it)
        ovc["initializer_factor"] = vc.get("layer_scale_init_value", 0.1)
    # The ViT's own image_size may differ from force_image_size (which wins); keep it when consistent.
    if not stash or int(out.get("force_image_size") or 0) != image_size:
        ovc["image_size"] = image_size
    base_lc = out.get("llm_config") or {}
    from_stash = bool(stash) and base_lc.get("architectures") == [backbone.arch]
    if base_lc.get("architectures") not in (None, [backbone.arch]):
        # Another LLM than the stashed/default one: none of its fields apply, except the dtype.
        base_lc = {k: v for k, v in base_lc.items() if k == "torch_dtype"}
    try:
        out["llm_config"] = original_llm_config(backbone, tc, base_lc, from_stash)
    except BackboneError as exc:
        raise FormatError(str(exc)) from exc
    tie = keeps_tied_head(cfg, backbone)
    # InternVL2/2.5/3 keep a separate lm_head and force tying off (their configuration_internvl_chat.py);
    # InternVL3.5 reads the top level, and its saved llm_config may not carry the key at all.
    if not from_stash or "tie_word_embeddings" in out["llm_config"]:
        out["llm_config"]["tie_word_embeddings"] = tie
    out["tie_word_embeddings"] = tie
    out["architectures"] = [ORIGINAL_ARCH]
    out["model_type"] = "internvl_chat"
    if template is not None:
        out["template"] = template
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


def open_tokenizer(path: str | Path):
    """A checkpoint's tokenizer, never running remote code, tagged with the checkpoint's template.

    Original InternLM2-based folders name their tokenizer class in remote code (``auto_map``:
    ``InternLM2Tokenizer``); transformers' own generic backend reads the same ``tokenizer.json``
    (or, with ``sentencepiece`` installed, ``tokenizer.model``), as it does for InternLM2's own
    checkpoints. ``tokenizer.internvl_template`` is the ``template`` of the folder's original config
    (or of the one a converted native config stashed), or None.

    Raises:
        OSError: the path cannot be read (a hub id offline...).
        FormatError: the tokenizer cannot be built without remote code.
    """
    from transformers import AutoTokenizer, PreTrainedConfig, TokenizersBackend

    kwargs = {}
    if Path(path, "config.json").is_file() and read_config(path).get("model_type") == "internvl_chat":
        # AutoConfig cannot read an original config without its remote code; the tokenizer class
        # comes from tokenizer_config.json anyway, so give it an empty config instead.
        kwargs["config"] = PreTrainedConfig()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        try:
            tok = TokenizersBackend.from_pretrained(str(path))
        except (ValueError, ImportError, OSError) as inner:
            raise FormatError(
                f"{path}: the tokenizer is remote code and transformers' generic backend cannot read it "
                f"({inner}); install `sentencepiece` so tokenizer.model can be converted, or add a tokenizer.json"
            ) from exc
    if tok.pad_token is None:
        # Pad positions are masked everywhere; the collator only needs some id to fill them with.
        tok.pad_token = tok.unk_token or tok.eos_token
        logger.info("%s: the tokenizer has no pad token; padding with %r", path, tok.pad_token)
    tok.internvl_template = _checkpoint_template(Path(path))
    return tok


def _checkpoint_template(folder: Path) -> str | None:
    """The ``template`` of a local folder's original config (or the one a native config stashed)."""
    if not (folder / "config.json").is_file():
        return None
    cfg = read_config(folder)
    return cfg.get("template") if cfg.get("model_type") == "internvl_chat" else _stash(cfg).get("template")


def _image_token_id(folder: Path) -> int:
    tok = open_tokenizer(folder)
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
        dtype: parameter dtype; None keeps every tensor as stored (InternVL3.5 checkpoints may hold
            a float32 ``mlp1`` beside bfloat16 weights: converted, never rounded).
    """
    folder = Path(path)
    orig = read_config(folder)
    if config_format(orig, f"{folder}/config.json") != "original":
        raise FormatError(f"{folder}: not an original-format (InternVLChatModel) checkpoint")
    config = original_to_native_config(orig, _image_token_id(folder))
    sd = original_to_native_state_dict(read_safetensors_folder(folder), orig)
    if config.tie_word_embeddings:
        sd = _drop_tied_head(sd, folder)
    elif "lm_head.weight" not in sd:
        raise FormatError(
            f"{folder}: no language_model LM head weight, and config.json says tie_word_embeddings "
            "is false (InternVL2/2.5/3 always keep a separate head)"
        )
    config._name_or_path = str(folder)
    return _model_from_state_dict(config, sd, dtype, attn_implementation)


def _drop_tied_head(sd: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """A tied model's head is its embeddings; a stored copy that differs would be silently unused."""
    head = sd.pop("lm_head.weight", None)
    embed = sd.get("model.language_model.embed_tokens.weight")
    if head is not None and embed is not None and not torch.equal(head, embed):
        raise FormatError(
            f"{folder}: config.json ties the LM head to the embeddings, but the stored head differs from them"
        )
    return sd


def _model_from_state_dict(config, sd, dtype, attn_implementation) -> InternVLForConditionalGeneration:
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    keep_stored = dtype is None
    if keep_stored:  # build in the most common dtype; each tensor keeps its own below
        dtypes = [v.dtype for v in sd.values()]
        dtype = max(set(dtypes), key=dtypes.count)
    # Every weight comes from ``sd``: skip the random init (minutes for a 1B model on CPU).
    with no_init_weights():
        model = InternVLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    if is_deepspeed_zero3_enabled():
        # _from_config partitioned the parameters (zero.Init); load layer by layer through
        # transformers' own ZeRO-3 loader (private, pinned version 5.23).
        from transformers.integrations.deepspeed import _load_state_dict_into_zero3_model

        errors, missing = _load_state_dict_into_zero3_model(model, sd)
        unexpected = errors
    else:
        # assign=True: the parameters become the stored tensors themselves (their dtype included).
        sd = sd if keep_stored else {k: v.to(dtype) for k, v in sd.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise FormatError(
            f"weights do not fit the config: missing {sorted(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def save_original(
    model: InternVLForConditionalGeneration,
    out_dir: str | Path,
    max_shard_bytes: int = SHARD_BYTES,
    llm_arch: str | None = None,
    template: str | None = None,
) -> Path:
    """Write ``model`` in the original layout: ``config.json`` + safetensors (sharded with an index).

    Args:
        llm_arch, template: the original LLM architecture and chat template name to record (see
            :func:`native_to_original_config`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = native_to_original_config(model.config, llm_arch, template)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        sd.pop("lm_head.weight", None)
    elif "lm_head.weight" not in sd or model.config.tie_word_embeddings:
        # Tied heads share storage with the embeddings; InternVL2/2.5/3 want their own copy.
        sd["lm_head.weight"] = model.get_output_embeddings().weight.detach().cpu().clone()
    backbone = backbone_for_arch(config["llm_config"]["architectures"])
    heads = Heads.from_config(model.config.text_config.to_dict())
    orig_sd = native_to_original_state_dict(sd, backbone, heads)
    dtypes = [v.dtype for v in orig_sd.values()]
    config["torch_dtype"] = str(max(set(dtypes), key=dtypes.count)).removeprefix("torch.")
    if "torch_dtype" in config["llm_config"]:
        config["llm_config"]["torch_dtype"] = config["torch_dtype"]
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


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


def _on_disk_name(name: str) -> str:
    """A native in-memory parameter name as ``save_pretrained`` writes it (``model.`` prefix off,
    ``language_model.model.*`` for the text model)."""
    name = name.removeprefix("model.")
    return (
        "language_model.model." + name[len("language_model.") :]
        if name.startswith("language_model.")
        else name
    )


def load_native_as_stored(folder: Path, dtype: torch.dtype | None = None) -> InternVLForConditionalGeneration:
    """A native folder's model; with ``dtype=None`` every tensor keeps its stored dtype.

    ``from_pretrained(dtype="auto")`` gives every tensor the config's one dtype, which would round
    a float32 projector stored beside bfloat16 weights (as InternVL3.5 checkpoints have it).
    """
    from safetensors import safe_open

    if dtype is not None:
        return InternVLForConditionalGeneration.from_pretrained(str(folder), dtype=dtype)
    stored: dict[str, torch.dtype] = {}
    for f in _weight_files(folder):
        with safe_open(str(f), "pt") as handle:
            stored.update(
                {k: _SAFETENSORS_DTYPES.get(handle.get_slice(k).get_dtype()) for k in handle.keys()}
            )
    if len(set(stored.values())) <= 1:
        return InternVLForConditionalGeneration.from_pretrained(str(folder), dtype="auto")
    # Widening to float32 is exact; each tensor then goes back to its own stored dtype.
    model = InternVLForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
    for name, param in model.named_parameters():
        want = stored.get(_on_disk_name(name))
        if want is not None and param.dtype != want:
            param.data = param.data.to(want)
    return model


def convert_checkpoint(
    src: str | Path, dst: str | Path, to: str, dtype: torch.dtype | None = None, llm_arch: str | None = None
) -> Path:
    """Convert a checkpoint folder on disk to ``to`` ("native" or "original").

    Weights, config and the tokenizer/processor/generation files all move to ``dst``; a folder
    already in the target format is rewritten as is (useful to re-shard or change dtype).
    ``llm_arch``: for ``to="original"``, the LLM layout to write (``InternLM2ForCausalLM`` for a
    native InternVL2.5-2B/8B/26B ``-hf`` model, whose Llama text model was InternLM2).
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
        model = load_native_as_stored(src, dtype)
    dst.mkdir(parents=True, exist_ok=True)
    if to == "native":
        model.save_pretrained(str(dst))
    else:
        from mpo.data.template import resolve_template

        template = resolve_template("auto", open_tokenizer(src)).name
        save_original(model, dst, llm_arch=llm_arch, template=template)
    copy_side_files(src, dst)
    logger.info("converted %s (%s) -> %s (%s)", src, fmt, dst, to)
    return dst
