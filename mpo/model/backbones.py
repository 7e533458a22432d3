"""The language models InternVL is built on, and how each maps between the two checkpoint formats.

An original-format checkpoint names its LLM in ``llm_config.architectures``; the native
``InternVLForConditionalGeneration`` hosts any text model transformers knows (``AutoModel`` on
``text_config``). Five of the six dense backbones store their weights under the names the native
model uses, so only their configs need care; InternLM2 (InternVL2/2.5 at 2B, 8B and 26B) has no
transformers class and is hosted as a Llama text model, which needs renames and a split of its
fused ``wqkv`` projection (``InternLM2Attention`` in OpenGVLab/InternVL
``internvl_chat/internvl/model/internlm2/modeling_internlm2.py``; transformers' own InternVL
conversion script hosts it the same way).

Which InternVL generation uses which backbone (the model cards of OpenGVLab/InternVL2-*,
InternVL2_5-*, InternVL3-*, InternVL3_5-*) is listed in README.md, "Supported models".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch


class BackboneError(ValueError):
    """An LLM backbone (or a setting of one) that the native InternVL cannot host exactly."""


@dataclass(frozen=True)
class Backbone:
    """One LLM family as an original InternVL checkpoint stores it.

    Attributes:
        arch: ``llm_config.architectures[0]`` in the original config.
        model_type: ``llm_config.model_type`` in the original config.
        native_type: ``text_config.model_type`` of the native model hosting it.
        fields: ``llm_config`` fields beyond the common ones whose value the native config fixes.
    """

    arch: str
    model_type: str
    native_type: str
    fields: tuple[str, ...] = field(default=())

    @property
    def renamed(self) -> bool:
        """Whether its weights carry other names than the native model's (only InternLM2)."""
        return self.arch == INTERNLM2.arch


QWEN2 = Backbone("Qwen2ForCausalLM", "qwen2", "qwen2")
QWEN3 = Backbone("Qwen3ForCausalLM", "qwen3", "qwen3", ("head_dim", "attention_bias"))
LLAMA = Backbone("LlamaForCausalLM", "llama", "llama", ("head_dim", "attention_bias", "mlp_bias"))
# InternLM3 keeps Llama's weight names; transformers hosts it with LlamaModel under its own config.
INTERNLM3 = Backbone("InternLM3ForCausalLM", "internlm3", "internlm3", ("head_dim", "qkv_bias", "bias"))
PHI3 = Backbone("Phi3ForCausalLM", "phi3", "phi3", ("original_max_position_embeddings",))
INTERNLM2 = Backbone("InternLM2ForCausalLM", "internlm2", "llama", ("bias",))

BACKBONES = {b.arch: b for b in (QWEN2, QWEN3, LLAMA, INTERNLM3, PHI3, INTERNLM2)}
# Mixture-of-experts LLMs of InternVL3.5: their expert layers have no dense counterpart here.
REFUSED = {
    "GptOssForCausalLM": "GPT-OSS mixture-of-experts (InternVL3.5-20B-A4B)",
    "Qwen3MoeForCausalLM": "Qwen3 mixture-of-experts (InternVL3.5-30B-A3B, -241B-A28B)",
}

# llm_config fields every backbone's native config fixes (the sizes, ids and norms).
COMMON_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act", "bos_token_id", "eos_token_id",
    "pad_token_id", "attention_dropout", "sliding_window", "use_sliding_window", "max_window_layers",
)  # fmt: skip
# Keys of an original llm_config that are bookkeeping or run-time choices, not architecture (the
# attention kernel is model.attn_implementation's to choose).
_NOT_ARCHITECTURE = (
    "model_type", "transformers_version", "auto_map", "_name_or_path", "architectures", "attn_implementation",
    "_attn_implementation_autoset",
)  # fmt: skip


def supported_list() -> str:
    return ", ".join(sorted(BACKBONES))


def backbone_for_arch(architectures: Any, where: str = "config.json") -> Backbone:
    """The backbone an original config's ``llm_config.architectures`` names.

    Raises:
        BackboneError: one line naming the field, what it holds and what is supported.
    """
    arch = architectures[0] if isinstance(architectures, list) and architectures else architectures
    if arch in BACKBONES:
        return BACKBONES[arch]
    why = f"{REFUSED[arch]} is not supported" if arch in REFUSED else "unknown LLM architecture"
    raise BackboneError(
        f"{where}: llm_config.architectures={architectures!r}: {why}; supported: {supported_list()}"
    )


def backbone_for_native(text_type: str, original_arch: str | None = None) -> Backbone:
    """The backbone of a native ``text_config.model_type``.

    ``llama`` hosts both Llama and InternLM2; ``original_arch`` (the original config a converted
    model came from, or the user's choice) says which layout to write back.
    """
    if original_arch is not None:
        backbone = backbone_for_arch([original_arch], "original config")
        if backbone.native_type != text_type:
            raise BackboneError(
                f"llm_config.architectures=['{original_arch}'] is hosted as text model_type "
                f"'{backbone.native_type}', but this native model's text_config.model_type is '{text_type}'"
            )
        return backbone
    for backbone in (QWEN2, QWEN3, LLAMA, INTERNLM3, PHI3):
        if backbone.native_type == text_type:
            return backbone
    natives = sorted({b.native_type for b in BACKBONES.values()})
    raise BackboneError(f"native config: text_config.model_type={text_type!r}; supported: {natives}")


# ---- configs ---------------------------------------------------------------------------------------
def native_text_kwargs(backbone: Backbone, lc: dict[str, Any], tie: bool) -> dict[str, Any]:
    """Keyword arguments of the native text config for an original ``llm_config``.

    Args:
        backbone: the LLM family.
        lc: the original ``llm_config`` dict.
        tie: whether the head is tied to the embeddings (read from the top-level config).
    """
    if backbone.renamed:
        return _internlm2_text_kwargs(lc, tie)
    kwargs = {k: v for k, v in lc.items() if k not in _NOT_ARCHITECTURE}
    kwargs["tie_word_embeddings"] = tie
    rope = kwargs.get("rope_scaling")
    if isinstance(rope, dict) and rope.get("type") == "su" and "rope_type" not in rope:
        # Phi-3's "su" scaling is what transformers calls "longrope" (same long/short factors).
        kwargs["rope_scaling"] = {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": "longrope"}
    return kwargs


def _internlm2_text_kwargs(lc: dict[str, Any], tie: bool) -> dict[str, Any]:
    """LlamaConfig arguments equivalent to an ``InternLM2Config`` (its defaults where a key is absent)."""
    hidden, heads = lc.get("hidden_size", 4096), lc.get("num_attention_heads", 32)
    if hidden % heads:
        raise BackboneError(
            f"llm_config: hidden_size={hidden} is not a multiple of num_attention_heads={heads}"
        )
    bias = bool(lc.get("bias", True))  # InternLM2Config's default; released checkpoints say false
    kwargs = {
        "vocab_size": lc.get("vocab_size", 103168),
        "hidden_size": hidden,
        "intermediate_size": lc.get("intermediate_size", 11008),
        "num_hidden_layers": lc.get("num_hidden_layers", 32),
        "num_attention_heads": heads,
        "num_key_value_heads": lc.get("num_key_value_heads") or heads,
        "hidden_act": lc.get("hidden_act", "silu"),
        "max_position_embeddings": lc.get("max_position_embeddings", 2048),
        "initializer_range": lc.get("initializer_range", 0.02),
        "rms_norm_eps": lc.get("rms_norm_eps", 1e-6),
        "pad_token_id": lc.get("pad_token_id", 0),
        "bos_token_id": lc.get("bos_token_id", 1),
        "eos_token_id": lc.get("eos_token_id", 2),
        # wqkv and wo share InternLM2's one `bias` flag; its MLP never has a bias.
        "attention_bias": bias,
        "mlp_bias": False,
        "head_dim": hidden // heads,
        "rope_theta": lc.get("rope_theta", 10000),
        "tie_word_embeddings": tie,
    }
    rope = lc.get("rope_scaling")
    if rope:
        kind = rope.get("type") or rope.get("rope_type")
        if kind not in ("linear", "dynamic"):
            raise BackboneError(
                f"llm_config.rope_scaling={rope!r}: InternLM2 knows 'linear' and 'dynamic' only"
            )
        # InternLM2's dynamic NTK rule (base * (f*L/L_max - (f-1)) ** (d/(d-2)) past L_max) is
        # transformers' "dynamic" rope; "linear" divides positions by the factor in both.
        kwargs["rope_scaling"] = {"rope_type": kind, "factor": float(rope["factor"])}
    return kwargs


def original_llm_config(
    backbone: Backbone, tc: dict[str, Any], base: dict[str, Any], from_stash: bool
) -> dict[str, Any]:
    """The original ``llm_config`` for a native ``text_config`` dict.

    Args:
        backbone: the LLM layout to write.
        tc: the native text config as a dict.
        base: the ``llm_config`` to start from (the stashed original one, or defaults).
        from_stash: ``base`` is the original the native config was converted from: then only the
            keys it has are rewritten (a converted model gives its config back unchanged); else
            every field the native config determines is written, under the original code's names.
    """
    olc = dict(base)
    keep = (lambda k: k in olc) if from_stash else (lambda k: True)  # noqa: E731
    if backbone.renamed:
        olc.update({k: v for k, v in _internlm2_llm_fields(tc).items() if keep(k)})
    else:
        names = COMMON_FIELDS + backbone.fields
        # Keys the original never had stay absent when native only holds a None default for them.
        olc.update({k: tc[k] for k in names if k in tc and keep(k) and (k in olc or tc[k] is not None)})
        if backbone is INTERNLM3:  # transformers' names for InternLM3's own qkv_bias / bias
            olc.pop("attention_bias", None), olc.pop("mlp_bias", None)
            olc["qkv_bias"], olc["bias"] = bool(tc.get("attention_bias")), bool(tc.get("mlp_bias"))
        if tc.get("sliding_window") is None and not tc.get("use_sliding_window") and "sliding_window" in base:
            # Qwen2Config nulls sliding_window when it is off; the original's inert value is kept.
            olc["sliding_window"] = base["sliding_window"]
    rope = tc.get("rope_parameters") or {}
    if ("rope_theta" in rope or "rope_theta" in tc) and keep("rope_theta"):
        olc["rope_theta"] = rope.get("rope_theta", tc.get("rope_theta"))
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in olc:
        olc["rope_scaling"] = _original_rope_scaling(backbone, rope)
    olc["architectures"] = [backbone.arch]
    olc["model_type"] = backbone.model_type
    return olc


def _internlm2_llm_fields(tc: dict[str, Any]) -> dict[str, Any]:
    """InternLM2Config fields of a native Llama text config that hosts InternLM2."""
    hidden, heads = tc["hidden_size"], tc["num_attention_heads"]
    if tc.get("mlp_bias") or (tc.get("head_dim") or hidden // heads) != hidden // heads:
        raise BackboneError(
            "native config: an InternLM2 layout needs mlp_bias=false and head_dim=hidden_size/num_attention_heads "
            f"(got mlp_bias={tc.get('mlp_bias')}, head_dim={tc.get('head_dim')})"
        )
    names = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
        "pad_token_id", "bos_token_id", "eos_token_id",
    )  # fmt: skip
    out = {k: tc[k] for k in names if k in tc}
    out["bias"] = bool(tc.get("attention_bias", False))
    return out


def _original_rope_scaling(backbone: Backbone, rope: dict[str, Any]) -> dict[str, Any]:
    if backbone.renamed:  # InternLM2Config accepts exactly {"type", "factor"}
        return {"type": rope["rope_type"], "factor": rope["factor"]}
    if backbone is PHI3 and rope["rope_type"] == "longrope":
        # InternVL's Phi-3 code knows this scaling as "su" (and reads only the two factor lists).
        return {"type": "su", "long_factor": rope["long_factor"], "short_factor": rope["short_factor"]}
    return {k: v for k, v in rope.items() if k != "rope_theta"}


# ---- weights ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heads:
    """Attention sizes needed to split or fuse InternLM2's ``wqkv``."""

    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Heads:
        heads = cfg["num_attention_heads"]
        return cls(
            heads, cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads
        )


def split_wqkv(wqkv: torch.Tensor, h: Heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v projections of InternLM2's fused ``wqkv`` (weight ``(out, in)`` or bias ``(out,)``).

    The rows run over KV groups; each group holds its ``heads/kv_heads`` query heads, then its key
    head, then its value head, ``head_dim`` rows each (``rearrange(qkv, 'b q (h gs d) -> b q h gs d',
    gs=2 + groups)`` in ``InternLM2Attention.forward``). Query head ``g·groups + j`` is group g's j-th.

    Returns:
        q ``(heads·head_dim, ...)``, k and v ``(kv_heads·head_dim, ...)``, contiguous.
    """
    groups = h.heads // h.kv_heads
    rest = wqkv.shape[1:]
    if wqkv.shape[0] != (h.heads + 2 * h.kv_heads) * h.head_dim:
        raise BackboneError(
            f"wqkv has {wqkv.shape[0]} rows; (heads {h.heads} + 2 x kv heads {h.kv_heads}) x head_dim {h.head_dim} expected"
        )
    per_group = wqkv.reshape(h.kv_heads, groups + 2, h.head_dim, *rest)
    q = per_group[:, :groups].reshape(h.heads * h.head_dim, *rest).contiguous()
    k = per_group[:, groups].reshape(h.kv_heads * h.head_dim, *rest).contiguous()
    v = per_group[:, groups + 1].reshape(h.kv_heads * h.head_dim, *rest).contiguous()
    return q, k, v


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: Heads) -> torch.Tensor:
    """Inverse of :func:`split_wqkv`: ``(heads + 2·kv_heads)·head_dim`` rows in InternLM2's order."""
    groups = h.heads // h.kv_heads
    rest = q.shape[1:]
    parts = (
        q.reshape(h.kv_heads, groups, h.head_dim, *rest),
        k.reshape(h.kv_heads, 1, h.head_dim, *rest),
        v.reshape(h.kv_heads, 1, h.head_dim, *rest),
    )
    return torch.cat(parts, dim=1).reshape(-1, *rest)


# InternLM2 layer weights -> Llama's (per decoder layer, after ``layers.N.``); wqkv is split apart.
_INTERNLM2_LAYER = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_INTERNLM2_TOP = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def llm_to_native(backbone: Backbone, key: str, value: torch.Tensor, h: Heads) -> dict[str, torch.Tensor]:
    """Native in-memory weights for one original LLM weight.

    Args:
        key: the name after ``language_model.`` (``model.layers.0.attention.wqkv.weight``, ``output.weight``).

    Returns:
        ``{native name: tensor}``: ``model.language_model.*`` or ``lm_head.weight``.

    Raises:
        BackboneError: a name outside the backbone's layout.
    """
    if not backbone.renamed:
        if key == "lm_head.weight":
            return {"lm_head.weight": value}
        if key.startswith("model."):
            return {"model.language_model." + key[len("model.") :]: value}
        raise BackboneError(f"weight 'language_model.{key}': not part of the {backbone.arch} layout")
    return _internlm2_to_native(key, value, h)


def _internlm2_to_native(key: str, value: torch.Tensor, h: Heads) -> dict[str, torch.Tensor]:
    if key in _INTERNLM2_TOP:
        name = _INTERNLM2_TOP[key]
        return {name if name == "lm_head.weight" else "model.language_model." + name[len("model.") :]: value}
    if key == "model.norm.weight":
        return {"model.language_model.norm.weight": value}
    m = _LAYER_RE.match(key)
    if m:
        i, module, kind = m.groups()
        prefix = f"model.language_model.layers.{i}."
        if module == "attention.wqkv":
            q, k, v = split_wqkv(value, h)
            return {f"{prefix}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))}
        if module in _INTERNLM2_LAYER:
            return {f"{prefix}{_INTERNLM2_LAYER[module]}.{kind}": value}
    raise BackboneError(f"weight 'language_model.{key}': not part of the InternLM2ForCausalLM layout")


_NATIVE_LAYER_RE = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def llm_to_original(backbone: Backbone, sd: dict[str, torch.Tensor], h: Heads) -> dict[str, torch.Tensor]:
    """Original LLM weights (names after ``language_model.``) for the native ones.

    Args:
        sd: ``model.language_model.*`` and ``lm_head.weight`` tensors only.
    """
    out: dict[str, torch.Tensor] = {}
    if not backbone.renamed:
        for key, value in sd.items():
            out[
                "lm_head.weight"
                if key == "lm_head.weight"
                else "model." + key[len("model.language_model.") :]
            ] = value
        return out
    inv_top = {v: k for k, v in _INTERNLM2_TOP.items()}
    inv_layer = {v: k for k, v in _INTERNLM2_LAYER.items()}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        short = (
            "lm_head.weight" if key == "lm_head.weight" else "model." + key[len("model.language_model.") :]
        )
        m = _NATIVE_LAYER_RE.match(key)
        if short in inv_top:
            out[inv_top[short]] = value
        elif short == "model.norm.weight":
            out[short] = value
        elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)[len("self_attn.")]] = value
        elif m and m.group(2) in inv_layer:
            out[f"model.layers.{m.group(1)}.{inv_layer[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise BackboneError(f"weight '{key}': no InternLM2 counterpart")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise BackboneError(f"LLM layer {i}: {kind} of q/k/v incomplete ({sorted(parts)})")
        out[f"model.layers.{i}.attention.wqkv.{kind}"] = fuse_wqkv(parts["q"], parts["k"], parts["v"], h)
    return out


# ---- LoRA ------------------------------------------------------------------------------------------
# Original InternLM2 module names users know from InternVL's own LoRA settings -> what they are
# called once the model is in memory (Llama names).
ORIGINAL_LORA_NAMES = {
    "wqkv": ("q_proj", "k_proj", "v_proj"),
    "wo": ("o_proj",),
    "w1": ("gate_proj",),
    "w3": ("up_proj",),
    "w2": ("down_proj",),
}
