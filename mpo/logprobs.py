"""Batch -> per-sequence response log-probs, with one vision pass per pair.

Two things the public MPO trainers (InternVL's ``trainer_dpo.py``, TRL's ``DPOTrainer``) do not do:
- the vision encoder and projector run once per pair; the features go into both the chosen and
  the rejected sequence;
- only hidden states at trained (response) positions go through the LM head, in chunks, so no
  ``(batch, seq, vocab)`` logits tensor is ever built for the image and prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpo.data.template import IGNORE_INDEX


@dataclass
class SequenceLogps:
    """Per-sequence results for the ``2B`` rows of a pair batch (chosen rows first)."""

    logps: torch.Tensor  # (2B,) summed log-prob of the trained tokens
    num_tokens: torch.Tensor  # (2B,) trained tokens per row

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.logps.shape[0] // 2
        return self.logps[:half], self.logps[half:]


def trained_positions(batch: dict) -> int:
    """Positions of a pair batch whose next token is trained: one LM-head row each. Plain batches
    (``PairCollator``) count them from ``labels``, packed ones (``mpo.packing``) from ``scored``."""
    if "scored" in batch:
        return int(batch["scored"].shape[0])
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def lm_head_calls(positions: int, chunk_size: int) -> int:
    """LM-head calls for ``positions`` trained positions: one per ``chunk_size``, at least one (so
    even a batch without trained tokens keeps a gradient path)."""
    return max(1, -(-positions // chunk_size))


def lockstep_lm_head_calls(positions: int, chunk_size: int, device: torch.device) -> int:
    """The most LM-head calls any rank needs for its batch (one all-reduce).

    ZeRO-3 gathers a module's weights at each call, a collective, so every rank must call the LM
    head the same number of times or the ranks with fewer calls hang.
    """
    import torch.distributed as dist

    t = torch.tensor([lm_head_calls(positions, chunk_size)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def scored_logps(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    targets: torch.Tensor,
    owners: torch.Tensor,
    num_sequences: int,
    lm_head: torch.nn.Module,
    chunk_size: int = 4096,
    calls: int | None = None,
) -> SequenceLogps:
    """Summed log-probs per sequence of the tokens scored at given hidden-state positions.

    Args:
        hidden: ``(N, L, H)`` last hidden states.
        rows, cols, targets, owners: ``(T,)`` each: the hidden state at ``[rows, cols]`` predicts
            token ``targets``, a trained token of sequence ``owners`` (in ``[0, num_sequences)``).
        lm_head: the output projection, applied to ``chunk_size`` positions per call (bounds the
            logits buffer to ``chunk x vocab``); from its output on, float32 (float64 stays).
        calls: LM-head calls to make (empty chunks included), at least ``lm_head_calls(T,
            chunk_size)``; data-parallel ranks pass ``lockstep_lm_head_calls`` so they match.
    Returns:
        ``SequenceLogps`` of ``num_sequences`` sequences (float32 sums, or float64 for a float64
        model; token counts).
    """
    selected = hidden[rows, cols]  # (T, H)
    needed = lm_head_calls(selected.shape[0], chunk_size)
    if calls is not None and calls < needed:
        raise ValueError(
            f"{calls} LM-head calls cannot cover {selected.shape[0]} positions in chunks of {chunk_size}"
        )
    parts = []
    for k in range(calls or needed):
        start = k * chunk_size
        logits = lm_head(selected[start : start + chunk_size])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> float32
        # log p(token) = logit[token] - logsumexp(logits): avoids a second (chunk, vocab) buffer.
        tok = targets[start : start + chunk_size]
        parts.append(logits.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1))
    token_lp = torch.cat(parts)
    logps = torch.zeros(num_sequences, dtype=token_lp.dtype, device=hidden.device).index_add(
        0, owners, token_lp
    )
    counts = torch.bincount(owners, minlength=num_sequences)
    return SequenceLogps(logps=logps, num_tokens=counts)


def response_logps(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    chunk_size: int = 4096,
    calls: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> SequenceLogps:
    """Log-probs of trained tokens from final hidden states, LM head applied only there.

    Args:
        hidden: ``(N, L, H)`` last hidden states. labels: ``(N, L)``, ``ignore_index`` where untrained.
        lm_head, chunk_size, calls: as in ``scored_logps``.
    """
    targets = labels[:, 1:]
    rows, cols = (targets != ignore_index).nonzero(as_tuple=True)  # positions t whose next token is trained
    return scored_logps(
        hidden, rows, cols, targets[rows, cols], rows, labels.shape[0], lm_head, chunk_size, calls
    )


def image_features_once(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision tower + projector over each pair's tiles once: ``(tiles, tokens_per_tile, H)``."""
    out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    return out.pooler_output


def idle_vision_term(model, like: torch.Tensor) -> torch.Tensor:
    """``0 *`` the vision tower + projector on one blank tile, as a scalar of ``like``'s dtype.

    Added to a text-only batch's embeddings under ``lockstep``: every rank then runs (and
    back-propagates through) the same modules, which ZeRO-3's per-module gathers and the gradient
    reduction need; InternVL's own trainer feeds a dummy image for the same reason.
    """
    size = model.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    dtype = next(model.model.vision_tower.parameters()).dtype
    blank = torch.zeros(1, 3, size, size, dtype=dtype, device=like.device)
    return image_features_once(model, blank).sum().to(like.dtype) * 0


def embed_with_images(
    model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, copies: int, lockstep: bool = False
) -> torch.Tensor:
    """Token embeddings ``(N, L, H)`` with the image features at the image-token positions.

    The vision tower runs once over ``pixel_values`` (every pair's tiles, in pair order); the
    features are placed ``copies`` times in row-major order: a plain batch holds each pair's image
    tokens twice (chosen rows, then rejected rows), a packed one once. ``lockstep``: a batch
    without images still runs the vision tower (``idle_vision_term``).
    """
    core = model.model
    embeds = core.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        feats = image_features_once(model, pixel_values).to(embeds.dtype).reshape(-1, embeds.shape[-1])
        feats = feats.repeat(copies, 1) if copies > 1 else feats
        mask = input_ids == model.config.image_token_id
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(
                f"image tokens ({int(mask.sum())}) and image features ({feats.shape[0]}) disagree: "
                "the tile count or tokens per tile do not match the model's vision config"
            )
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats)
    elif lockstep:
        embeds = embeds + idle_vision_term(model, embeds)
    return embeds


def pair_hidden_states(model, batch: dict, lockstep: bool = False) -> torch.Tensor:
    """Last hidden states ``(2B, L, H)`` for a pair batch, the vision pass shared by both halves.

    Chosen rows ``[0, B)`` and rejected rows ``[B, 2B)`` hold the same image tokens in the same
    order, so the row-major placeholder order is: every pair's features, then again.
    """
    embeds = embed_with_images(model, batch["input_ids"], batch.get("pixel_values"), 2, lockstep)
    out = model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False
    )
    return out.last_hidden_state


def batch_logps(
    model, batch: dict, chunk_size: int = 4096, lockstep: bool = False, calls: int | None = None
) -> SequenceLogps:
    """Summed response log-probs of every row of a pair batch (see ``PairCollator``).

    ``lockstep`` (data-parallel training): a batch without images still runs the vision tower
    (``idle_vision_term``); ``calls``: LM-head calls to make (``response_logps``).
    """
    hidden = pair_hidden_states(model, batch, lockstep)
    return response_logps(hidden, batch["labels"], model.get_output_embeddings(), chunk_size, calls)
