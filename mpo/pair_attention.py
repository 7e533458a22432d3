"""Attention for packed pairs (``mpo.packing``), by kernel: the same mask, three ways to compute it.

In a packed row each pair is ``[prefix | chosen suffix | rejected suffix]``. A token attends to the
earlier tokens of its own pair only, and a rejected-suffix token never to the chosen suffix:

    allowed(q, k) = pair(q) == pair(k)  and  k <= q  and  not (branch(q) == rejected and branch(k) == chosen)

(the same idea as "prefix sharing" for preference pairs: Wang et al. 2024, "Accelerating Direct
Preference Optimization with Prefix Sharing", arXiv:2410.20305). Kernels, by the LLM's
``attn_implementation`` (``model.attn_implementation``; ``auto`` picks per device):

- ``sdpa`` / ``eager`` (CPU, or anywhere): each pair's block on its own with its ``(n, n)`` mask
  (``pair_block_mask``): work Σ n², not (Σ n)².
- ``flex_attention`` (CUDA): one ``torch.nn.attention.flex_attention`` call with a block-sparse
  mask from per-token pair and branch ids (``pair_mask_mod``); fully masked tiles are skipped.
- ``flash_attention_2`` (CUDA, flash-attn installed): ``flash_attn_varlen_func``. Its
  ``cu_seqlens`` describe block-diagonal causal segments, which ``[prefix | chosen | rejected]`` is
  not (rejected sees the prefix but not chosen); so each pair is two segments: queries
  ``prefix + chosen`` over the same keys, and queries ``rejected suffix`` over keys gathered as
  ``prefix + rejected suffix``. flash-attn (≥ 2.1) aligns the causal mask of a segment with more
  keys than queries to the bottom-right corner, which is exactly "the whole prefix, then causal".
  The prefix's projections and MLP still run once; only its keys are read twice.

How it plugs into transformers: ``install`` points the LLM config's ``_attn_implementation`` at a
registered function (``mpo_pairs+<kernel>``) that runs our kernel when the forward passes one
(``mpo_pairs=...``) and otherwise the base implementation, so generation and the plain path are
unchanged. It stays installed: gradient checkpointing re-runs the attention during backward, after
the forward has returned. The name is not saved with the model (transformers drops
``_attn_implementation`` from saved configs).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

PREFIX = "mpo_pairs+"
CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
PREFIX_BRANCH, CHOSEN_BRANCH, REJECTED_BRANCH = 0, 1, 2


def resolve_attn_implementation(name: str) -> str:
    """``auto``: flash_attention_2 on CUDA with flash-attn installed, else flex_attention on CUDA,
    else sdpa. Any other name is returned as is."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "flex_attention"
    return "sdpa"


def spans_of(pairs: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """The rows of a packed batch's ``pairs`` table: (row, start, prefix, chosen, rejected)."""
    return [tuple(int(x) for x in r) for r in pairs.tolist()]


# ---- the mask, two ways ---------------------------------------------------------------------
def pair_block_mask(prefix: int, chosen: int, rejected: int, device=None) -> torch.Tensor:
    """``(n, n)`` bool, True = attend, for one pair of ``n = prefix + chosen + rejected`` tokens."""
    n = prefix + chosen + rejected
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    allowed[prefix + chosen :, prefix : prefix + chosen] = False
    return allowed


def token_ids(spans, rows: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token pair number (-1 on padding) and branch (prefix 0, chosen 1, rejected 2), ``(R, P)``."""
    pair = torch.full((rows, width), -1, dtype=torch.long)
    branch = torch.full((rows, width), PREFIX_BRANCH, dtype=torch.long)
    for k, (r, s, p, c, j) in enumerate(spans):
        pair[r, s : s + p + c + j] = k
        branch[r, s + p : s + p + c] = CHOSEN_BRANCH
        branch[r, s + p + c : s + p + c + j] = REJECTED_BRANCH
    return pair.to(device), branch.to(device)


def pair_mask_mod(pair: torch.Tensor, branch: torch.Tensor):
    """The mask as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``. Padding (pair -1) attends
    causally to the row's other padding, so no query row is empty."""

    def mask_mod(b, h, q_idx, kv_idx):
        same = pair[b, q_idx] == pair[b, kv_idx]
        hidden = (branch[b, q_idx] == REJECTED_BRANCH) & (branch[b, kv_idx] == CHOSEN_BRANCH)
        return same & (kv_idx <= q_idx) & ~hidden

    return mask_mod


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _eager(q, k, v, mask, scaling, dropout, training):
    """Softmax attention written out (transformers' ``eager``; softmax in float32 or better), ``(B, H, n, D)``.
    ``mask``: bool (True = attend) or additive float, broadcastable to ``(B, H, n, m)``."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-1, -2)) * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask[..., : k.shape[-2]]
    exact = scores.dtype if scores.dtype in (torch.float32, torch.float64) else torch.float32
    probs = F.dropout(torch.softmax(scores, dim=-1, dtype=exact).to(q.dtype), p=dropout, training=training)
    return probs @ v


# ---- kernels: called per layer with q (R, H, P, D), k and v (R, Hkv, P, D); return (R, P, H, D)
class DenseBlocks:
    """Each pair's block with its own mask: ``sdpa`` (fused where the device has a kernel) or ``eager``."""

    def __init__(self, spans, rows: int, width: int, device, eager: bool = False):
        self.rows, self.width, self.eager = rows, width, eager
        self.blocks: list[list[tuple[int, int, torch.Tensor]]] = [[] for _ in range(rows)]
        for r, s, p, c, j in spans:
            self.blocks[r].append((s, p + c + j, pair_block_mask(p, c, j, device)))

    def __call__(self, q, k, v, scaling: float, dropout: float, training: bool) -> torch.Tensor:
        out = []
        for r, blocks in enumerate(self.blocks):
            parts, end = [], 0
            for s, n, mask in blocks:
                qs, ks, vs = (
                    q[r : r + 1, :, s : s + n],
                    k[r : r + 1, :, s : s + n],
                    v[r : r + 1, :, s : s + n],
                )
                if self.eager:
                    parts.append(_eager(qs, ks, vs, mask, scaling, dropout, training))
                else:
                    # K/V repeated per query head: sdpa's enable_gqa with a mask has a CPU backward
                    # 10-50x slower (torch 2.13), so do what transformers' sdpa path does.
                    ks, vs = _repeat_kv(ks, q.shape[1]), _repeat_kv(vs, q.shape[1])
                    p = dropout if training else 0.0
                    parts.append(F.scaled_dot_product_attention(qs, ks, vs, mask, p, scale=scaling))
                end = s + n
            if end < self.width:  # the row's padded tail: never attended to, never scored
                parts.append(q.new_zeros(1, q.shape[1], self.width - end, q.shape[3]))
            out.append(torch.cat(parts, dim=2))
        return torch.cat(out).transpose(1, 2).contiguous()


@functools.cache
def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


class FlexBlocks:
    """One FlexAttention call with a block mask from the pair/branch ids (compiled on CUDA)."""

    def __init__(self, spans, rows: int, width: int, device, compiled: bool | None = None):
        from torch.nn.attention.flex_attention import create_block_mask

        self.compiled = torch.device(device).type == "cuda" if compiled is None else compiled
        pair, branch = token_ids(spans, rows, width, device)
        self.block_mask = create_block_mask(
            pair_mask_mod(pair, branch), rows, None, width, width, device=device, _compile=self.compiled
        )

    def __call__(self, q, k, v, scaling: float, dropout: float, training: bool) -> torch.Tensor:
        if dropout and training:
            raise ValueError("flex_attention has no attention dropout; set the LLM's attention_dropout to 0")
        heads = q.shape[1]
        gqa = heads & (heads - 1) == 0  # like transformers: repeat K/V when the head count is not 2^n
        if not gqa:
            k, v = _repeat_kv(k, heads), _repeat_kv(v, heads)
        out = _flex_attention(self.compiled)(
            q, k, v, block_mask=self.block_mask, scale=scaling, enable_gqa=gqa
        )
        return out.transpose(1, 2).contiguous()


def flash_varlen_function():
    """flash-attn's ``flash_attn_varlen_func``, or a clear error when flash-attn is missing."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        raise ImportError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package (pip install flash-attn); "
            "or use model.attn_implementation=flex_attention (CUDA) or sdpa"
        ) from exc
    return flash_attn_varlen_func


class FlashVarlen:
    """Two varlen segments per pair with gathered keys (module docstring); ``varlen`` is
    ``flash_attn_varlen_func`` or anything with its signature and bottom-right causal alignment."""

    def __init__(self, spans, rows: int, width: int, device, varlen=None):
        self.rows, self.width = rows, width
        self.varlen = varlen
        q_idx, kv_idx, q_lens, k_lens = [], [], [], []
        for r, s, p, c, j in spans:
            base = r * width + s
            head = list(range(base, base + p + c))  # prefix + chosen: queries and keys alike
            q_idx += head
            kv_idx += head
            q_lens.append(p + c)
            k_lens.append(p + c)
            if j:
                tail = list(range(base + p + c, base + p + c + j))
                q_idx += tail
                kv_idx += head[:p] + tail
                q_lens.append(j)
                k_lens.append(p + j)
        self.q_idx = torch.tensor(q_idx, dtype=torch.long, device=device)
        self.kv_idx = torch.tensor(kv_idx, dtype=torch.long, device=device)
        self.cu_q = torch.tensor(
            [0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device
        )
        self.cu_k = torch.tensor(
            [0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32, device=device
        )
        self.max_q, self.max_k = max(q_lens), max(k_lens)

    def __call__(self, q, k, v, scaling: float, dropout: float, training: bool) -> torch.Tensor:
        if q.dtype not in (torch.float16, torch.bfloat16) and self.varlen is None:
            raise ValueError(
                f"flash_attention_2 runs in bfloat16 or float16, not {q.dtype}: set model.torch_dtype or bf16"
            )
        varlen = self.varlen or flash_varlen_function()
        rows, heads, width, dim = q.shape

        def flat(x):
            return x.transpose(1, 2).reshape(rows * width, x.shape[1], dim)

        out = varlen(
            flat(q).index_select(0, self.q_idx), flat(k).index_select(0, self.kv_idx),
            flat(v).index_select(0, self.kv_idx), self.cu_q, self.cu_k, self.max_q, self.max_k,
            dropout_p=dropout if training else 0.0, softmax_scale=scaling, causal=True,
        )  # fmt: skip
        full = q.new_zeros(rows * width, heads, dim).index_copy(0, self.q_idx, out)
        return full.view(rows, width, heads, dim)


def make_kernel(base: str, pairs: torch.Tensor, rows: int, width: int, device):
    """The kernel for a packed batch under the LLM's ``base`` attention implementation."""
    spans = spans_of(pairs)
    if base in ("sdpa", "eager"):
        return DenseBlocks(spans, rows, width, device, eager=base == "eager")
    if base == "flex_attention":
        return FlexBlocks(spans, rows, width, device)
    if base.startswith("flash_attention"):
        return FlashVarlen(spans, rows, width, device)
    raise ValueError(
        f"packed pairs have no kernel for attn_implementation {base!r} (one of {', '.join(CHOICES[1:])})"
    )


# ---- transformers glue ----------------------------------------------------------------------
def _forward(module, query, key, value, attention_mask, *, base: str, **kwargs):
    """The registered attention function: our kernel when the forward passes one, else ``base``."""
    kernel = kwargs.pop("mpo_pairs", None)
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    dropout = kwargs.get("dropout", 0.0)
    if kernel is not None:
        if kwargs.get("sliding_window") is not None:
            raise ValueError("packed pairs do not support sliding-window attention layers")
        return kernel(query, key, value, scaling, dropout, module.training), None
    if base == "eager":
        out = _eager(query, key, value, attention_mask, scaling, dropout, module.training)
        return out.transpose(1, 2).contiguous(), None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)


def install(model) -> str:
    """Route the LLM's attention through ``_forward`` (idempotent); returns the base implementation."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    text = model.config.get_text_config()
    current = text._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return current[len(PREFIX) :]
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, functools.partial(_forward, base=current))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    text._attn_implementation = name
    return current
