"""An independent forward pass of an ORIGINAL-format InternVL checkpoint, for the tiny test sizes.

Written from the original modeling code's equations (OpenGVLab/InternVL ``modeling_intern_vit.py``,
``modeling_internvl_chat.py``'s ``pixel_shuffle``/``mlp1``, ``modeling_internlm2.py``, the Phi-3 and
Qwen/Llama decoders), reading the original weight names directly, in float64, with no transformers
module and no code of ``mpo.model``. The converted native model is compared against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def linear(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    bias = sd.get(f"{name}.bias")
    return x @ sd[f"{name}.weight"].T + (bias if bias is not None else 0)


def vit_features(sd: dict, vc: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """InternViT last hidden state ``(tiles, 1 + patches, C)`` (select_layer -1, no final norm)."""
    c, heads, p = vc["hidden_size"], vc["num_attention_heads"], vc["patch_size"]
    eps = vc["layer_norm_eps"]
    pre = "vision_model.embeddings."
    x = F.conv2d(pixel_values, sd[pre + "patch_embedding.weight"], sd[pre + "patch_embedding.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)
    cls = sd[pre + "class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd[pre + "position_embedding"]  # same grid: no interpolation

    def norm(t: torch.Tensor, name: str) -> torch.Tensor:
        if vc["norm_type"] == "rms_norm":
            return rms_norm(t, sd[f"{name}.weight"], eps)
        return F.layer_norm(t, (c,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    for i in range(vc["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        h = norm(x, pre + "norm1")
        b, n, _ = h.shape
        qkv = linear(h, sd, pre + "attn.qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if vc["qk_normalization"]:  # RMSNorm over all heads at once (InternAttention._naive_attn)
            q = rms_norm(q.transpose(1, 2).flatten(-2), sd[pre + "attn.q_norm.weight"], eps)
            k = rms_norm(k.transpose(1, 2).flatten(-2), sd[pre + "attn.k_norm.weight"], eps)
            q = q.view(b, n, heads, -1).transpose(1, 2)
            k = k.view(b, n, heads, -1).transpose(1, 2)
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd, pre + "attn.proj")
        x = x + sd[pre + "ls1"] * h
        h = linear(F.gelu(linear(norm(x, pre + "norm2"), sd, pre + "mlp.fc1")), sd, pre + "mlp.fc2")
        x = x + sd[pre + "ls2"] * h
    return x


def image_embeds(sd: dict, config: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image tokens ``(tiles · tokens per tile, H)``: CLS dropped, pixel shuffle v2, mlp1."""
    x = vit_features(sd, config["vision_config"], pixel_values)[:, 1:]
    n, hw, c = x.shape
    side = int(hw**0.5)
    x = x.reshape(n, side, side, c)
    s = config["downsample_ratio"]
    # InternVLChatModel.pixel_shuffle, ps_version v2 (h and w swapped back).
    x = x.view(n, side, int(side * s), int(c / s)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(side * s), int(side * s), int(c / (s * s))).permute(0, 2, 1, 3)
    x = x.reshape(n, -1, x.shape[-1])
    x = F.layer_norm(
        x, (x.shape[-1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5
    )  # nn.LayerNorm default eps
    x = linear(F.gelu(linear(x, sd, "mlp1.1")), sd, "mlp1.3")
    return x.reshape(-1, x.shape[-1])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(lc: dict, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, D)`` cos/sin. Phi-3's "su" scaling (short factors below the original context, and the
    attention factor sqrt(1 + ln s / ln L0)); InternLM2's dynamic NTK leaves positions below
    ``max_position_embeddings`` unscaled, so plain rope applies at the tiny lengths."""
    theta = float(lc.get("rope_theta", 10000.0))
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / theta**exponent
    scale = 1.0
    rope = lc.get("rope_scaling") or {}
    if rope.get("type") == "su":
        l0 = lc["original_max_position_embeddings"]
        assert length <= l0
        inv_freq = 1.0 / (torch.tensor(rope["short_factor"], dtype=torch.float64) * theta**exponent)
        ratio = lc["max_position_embeddings"] / l0
        scale = math.sqrt(1 + math.log(ratio) / math.log(l0)) if ratio > 1 else 1.0
    else:
        assert length <= lc["max_position_embeddings"]
    freqs = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def qkv_heads(
    sd: dict, lc: dict, pre: str, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``(heads, T, D)``, k and v ``(kv_heads, T, D)`` of one decoder layer, per backbone."""
    arch = lc["architectures"][0]
    heads, kv = lc["num_attention_heads"], lc["num_key_value_heads"]
    d = lc.get("head_dim") or lc["hidden_size"] // heads
    if arch == "InternLM2ForCausalLM":
        # InternLM2Attention.forward: 'b q (h gs d) -> b q h gs d' with gs = groups + 2.
        qkv = rearrange(
            linear(x, sd, pre + "attention.wqkv"), "q (h gs d) -> q h gs d", gs=2 + heads // kv, d=d
        )
        q = rearrange(qkv[..., : heads // kv, :], "q h gs d -> q (h gs) d")
        k, v = qkv[..., -2, :], qkv[..., -1, :]
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if arch == "Phi3ForCausalLM":  # Phi3Attention: q | k | v along the output rows
        qkv = linear(x, sd, pre + "self_attn.qkv_proj")
        q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
    else:
        q, k, v = (linear(x, sd, f"{pre}self_attn.{n}_proj") for n in "qkv")
    q, k, v = (t.reshape(t.shape[0], -1, d).transpose(0, 1) for t in (q, k, v))
    if arch == "Qwen3ForCausalLM":  # RMSNorm over each head's D channels
        q = rms_norm(q, sd[pre + "self_attn.q_norm.weight"], lc["rms_norm_eps"])
        k = rms_norm(k, sd[pre + "self_attn.k_norm.weight"], lc["rms_norm_eps"])
    return q, k, v


def mlp(sd: dict, arch: str, pre: str, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU: down(silu(gate x) * up x) under each backbone's names."""
    if arch == "InternLM2ForCausalLM":
        w1, w3, w2 = (f"{pre}feed_forward.{n}" for n in ("w1", "w3", "w2"))
        return linear(F.silu(linear(x, sd, w1)) * linear(x, sd, w3), sd, w2)
    if arch == "Phi3ForCausalLM":
        gate, up = linear(x, sd, pre + "mlp.gate_up_proj").chunk(2, dim=-1)
        return linear(up * F.silu(gate), sd, pre + "mlp.down_proj")
    gate, up = linear(x, sd, pre + "mlp.gate_proj"), linear(x, sd, pre + "mlp.up_proj")
    return linear(F.silu(gate) * up, sd, pre + "mlp.down_proj")


def reference_logits(
    sd: dict, config: dict, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Logits ``(T, V)`` in float64 for one sequence ``input_ids`` ``(T,)`` with its image tiles."""
    sd = {k: v.double() for k, v in sd.items()}
    lc = config["llm_config"]
    arch = lc["architectures"][0]
    names = {
        "InternLM2ForCausalLM": (
            "model.tok_embeddings",
            "attention_norm",
            "ffn_norm",
            "attention.wo",
            "output",
        ),
    }.get(
        arch,
        ("model.embed_tokens", "input_layernorm", "post_attention_layernorm", "self_attn.o_proj", "lm_head"),
    )
    embed, norm1, norm2, wo, head = names
    lm = {k[len("language_model.") :]: v for k, v in sd.items() if k.startswith("language_model.")}
    x = lm[f"{embed}.weight"][input_ids]
    mask = input_ids == image_token_id
    x[mask] = image_embeds(sd, config, pixel_values.double())
    t = x.shape[0]
    heads, kv = lc["num_attention_heads"], lc["num_key_value_heads"]
    d = lc.get("head_dim") or lc["hidden_size"] // heads
    cos, sin = rope_cos_sin(lc, d, t)
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    eps = lc["rms_norm_eps"]
    for i in range(lc["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        q, k, v = qkv_heads(lm, lc, pre, rms_norm(x, lm[f"{pre}{norm1}.weight"], eps))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # Grouped-query attention: query head j reads KV head j // (heads / kv).
        k, v = k.repeat_interleave(heads // kv, dim=0), v.repeat_interleave(heads // kv, dim=0)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d) + causal).softmax(-1)
        x = x + linear((attn @ v).transpose(0, 1).reshape(t, heads * d), lm, pre + wo)
        x = x + mlp(lm, arch, pre, rms_norm(x, lm[f"{pre}{norm2}.weight"], eps))
    x = rms_norm(x, lm["model.norm.weight"], eps)
    head_weight = lm.get(f"{head}.weight", lm[f"{embed}.weight"])  # tied: the embeddings
    return x @ head_weight.T
