"""Independent implementations the tests compare the optimised paths against."""

from __future__ import annotations

import torch

from mpo.data.template import IGNORE_INDEX
from mpo.logprobs import SequenceLogps


def token_logps_brute_force(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Full ``log_softmax`` + ``gather`` over every position; summed per row, ``(N,)``."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != ignore_index
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def naive_batch_logps(model, batch: dict) -> SequenceLogps:
    """The peers' path: a full forward per half with its own vision pass and full logits."""
    half = batch["input_ids"].shape[0] // 2
    results = []
    for rows in (slice(0, half), slice(half, None)):
        out = model(
            input_ids=batch["input_ids"][rows],
            attention_mask=batch["attention_mask"][rows],
            pixel_values=batch.get("pixel_values"),
            use_cache=False,
        )
        results.append(token_logps_brute_force(out.logits, batch["labels"][rows]))
    labels = batch["labels"]
    return SequenceLogps(logps=torch.cat(results), num_tokens=(labels[:, 1:] != IGNORE_INDEX).sum(-1))


def pair_allowed_brute_force(spans, rows: int, width: int) -> torch.Tensor:
    """``(R, P, P)`` bool: may packed token q attend to k? From the definition, not the layout
    code: each token belongs to the chosen and/or the rejected sequence of its pair (prefix
    tokens to both) at a position in it; q may attend to k when some sequence holds both and k
    comes no later than q there. Padding tokens attend to earlier padding of their row."""
    where: dict[tuple[int, int], dict[str, int]] = {}
    for r, s, p, c, j in spans:
        for t in range(p + c):
            where[(r, s + t)] = {"chosen": t}
        for t in range(p):
            where[(r, s + t)]["rejected"] = t
        for t in range(j):
            where[(r, s + p + c + t)] = {"rejected": p + t}
        for t in range(p + c + j):
            where[(r, s + t)]["pair"] = s  # the pair's start identifies it within the row
    allowed = torch.zeros(rows, width, width, dtype=torch.bool)
    for r in range(rows):
        for q in range(width):
            for k in range(q + 1):
                a, b = where.get((r, q)), where.get((r, k))
                if a is None or b is None:
                    allowed[r, q, k] = a is None and b is None
                elif a["pair"] == b["pair"]:
                    allowed[r, q, k] = any(
                        seq in a and seq in b and b[seq] <= a[seq] for seq in ("chosen", "rejected")
                    )
    return allowed


def varlen_attention_reference(
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=True
):
    """What ``flash_attn_varlen_func`` computes, in plain torch: q ``(Tq, H, D)``, k/v ``(Tk, Hkv, D)``;
    segment i holds queries ``cu_q[i]:cu_q[i+1]`` over keys ``cu_k[i]:cu_k[i+1]``; causal masks
    align to the bottom-right corner (query j of n sees keys ``0..m-n+j`` of m: flash-attn ≥ 2.1)."""
    assert dropout_p == 0.0 and causal
    heads = q.shape[1]
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ks = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1).repeat_interleave(heads // k.shape[1], 0)
        vs = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1).repeat_interleave(heads // v.shape[1], 0)
        n, m = qs.shape[1], ks.shape[1]
        mask = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
        scores = (qs @ ks.transpose(-1, -2)) * softmax_scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out[cu_q[i] : cu_q[i + 1]] = (torch.softmax(scores, -1) @ vs).transpose(0, 1)
    return out


def length_grouped_indices_lists(
    lengths, batch_size: int, generator: torch.Generator, mega_batch_mult: int = 50
):
    """transformers' ``get_length_grouped_indices`` recipe on Python lists (the sampler's earlier
    form): shuffle, sort each mega-batch by length (stable), longest batch first."""
    n = len(lengths)
    perm = torch.randperm(n, generator=generator).tolist()
    mega = max(batch_size, batch_size * mega_batch_mult)
    groups = [sorted(perm[i : i + mega], key=lambda j: -int(lengths[j])) for i in range(0, n, mega)]
    batches = [g[i : i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    if not batches:
        return []
    longest = max(range(len(batches)), key=lambda b: int(lengths[batches[b][0]]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return [i for b in batches for i in b]
