"""Shared-prompt forward: each pair's prompt (image tokens included) runs through the LLM once.

The plain path (``mpo.logprobs.batch_logps``) already runs the vision tower once per pair, but the
LLM still processes the prompt twice, once in the chosen row and once in the rejected row, and the
prompt is most of the sequence (256 tokens per tile against a few hundred answer tokens). Here
each pair becomes one packed row

    [shared prefix | chosen suffix | rejected suffix]

with a block attention mask: the prefix is causal, the chosen suffix sees the prefix and itself
(causally), the rejected suffix sees the prefix and itself but never the chosen tokens. Position
ids restart after the prefix for the rejected suffix, so every token has exactly the position,
the keys and the values it has in its own plain sequence, and the log-probs are the plain path's
up to float rounding. (The same idea as "prefix sharing" / tree attention for preference pairs,
e.g. Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing".)

The shared prefix is the longest common token prefix of the two sequences, which holds the whole
prompt and the ``<|im_start|>assistant\\n`` marker. The mask is a 4-D additive float mask
``(B, 1, L, L)`` (0 = attend, dtype minimum = blocked), which transformers passes through
unchanged to both the ``sdpa`` and ``eager`` attention of Qwen2; ``flash_attention_2`` takes no
such mask, so this path needs one of those two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpo.logprobs import SequenceLogps, idle_vision_term, image_features_once, response_logps


@dataclass
class PackedPairs:
    """One packed row per pair and where each plain position lives in it.

    input_ids, position_ids: ``(B, P)``; attention_mask: ``(B, 1, P, P)`` additive float.
    gather_index: ``(2B, L)`` packed position of every position of the plain ``(2B, L)`` batch
    (chosen rows first), 0 on padding.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    gather_index: torch.Tensor


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def pack_pairs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int, dtype: torch.dtype
) -> PackedPairs:
    """Pack a ``PairCollator`` batch (``(2B, L)``, right padded) into ``B`` prefix-shared rows."""
    if input_ids.shape[0] % 2:
        raise ValueError(f"a pair batch has an even number of rows, got {input_ids.shape[0]}")
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError("the shared-prompt forward expects right padding (PairCollator's layout)")
    half, length = input_ids.shape[0] // 2, input_ids.shape[1]
    lengths = attention_mask.sum(-1).tolist()
    rows = []
    for k in range(half):
        lc, lr = lengths[k], lengths[half + k]
        chosen, rejected = input_ids[k, :lc], input_ids[half + k, :lr]
        p = _common_prefix(chosen, rejected)
        rows.append((p, lc, lr, torch.cat([chosen, rejected[p:]])))
    packed_len = max(len(r[3]) for r in rows)
    device = input_ids.device
    ids = torch.full((half, packed_len), pad_token_id, dtype=input_ids.dtype, device=device)
    pos = torch.zeros((half, packed_len), dtype=torch.long, device=device)
    allowed = torch.zeros((half, packed_len, packed_len), dtype=torch.bool, device=device)
    gather = torch.zeros((2 * half, length), dtype=torch.long, device=device)
    for k, (p, lc, lr, seq) in enumerate(rows):
        n = len(seq)
        ids[k, :n] = seq
        pos[k, :lc] = torch.arange(lc)
        pos[k, lc:n] = torch.arange(p, lr)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        # The rejected suffix [lc, n) must not see the chosen suffix [p, lc).
        causal[lc:n, p:lc] = False
        allowed[k, :n, :n] = causal
        # Padding positions attend to themselves only, so no softmax row is empty.
        allowed[k, n:, :].fill_(False)
        allowed[k, torch.arange(n, packed_len), torch.arange(n, packed_len)] = True
        gather[k, :lc] = torch.arange(lc)
        gather[half + k, :p] = torch.arange(p)
        gather[half + k, p:lr] = torch.arange(lc, n)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
    return PackedPairs(ids, pos, mask.unsqueeze(1), gather)


def shared_prompt_hidden_states(model, batch: dict, lockstep: bool = False) -> torch.Tensor:
    """Last hidden states ``(2B, L, H)`` laid out like the plain batch, computed from packed rows."""
    core = model.model
    attn = model.config.text_config._attn_implementation
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"the shared-prompt forward needs attn_implementation sdpa or eager, not {attn}")
    embed = core.get_input_embeddings()
    packed = pack_pairs(
        batch["input_ids"],
        batch["attention_mask"],
        model.config.text_config.pad_token_id or 0,
        embed.weight.dtype,
    )
    embeds = embed(packed.input_ids)
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None:
        # Each pair's image tokens sit once, in its shared prefix, in pair order: one copy of the features.
        feats = image_features_once(model, pixel_values).to(embeds.dtype).reshape(-1, embeds.shape[-1])
        mask = packed.input_ids == model.config.image_token_id
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(
                f"image tokens in the shared prefixes ({int(mask.sum())}) and image features ({feats.shape[0]}) disagree"
            )
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats)
    elif lockstep:
        embeds = embeds + idle_vision_term(model, embeds)
    out = core.language_model(
        inputs_embeds=embeds,
        attention_mask=packed.attention_mask,
        position_ids=packed.position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state  # (B, P, H)
    half = hidden.shape[0]
    rows = torch.arange(2 * half, device=hidden.device) % half
    return hidden[rows.unsqueeze(1), packed.gather_index]


def shared_prompt_batch_logps(
    model, batch: dict, chunk_size: int = 4096, lockstep: bool = False, calls: int | None = None
) -> SequenceLogps:
    """Same result as ``mpo.logprobs.batch_logps``, the prompt computed once per pair."""
    hidden = shared_prompt_hidden_states(model, batch, lockstep)
    return response_logps(hidden, batch["labels"], model.get_output_embeddings(), chunk_size, calls)
