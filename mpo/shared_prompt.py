"""Shared-prompt forward: each pair's prompt (image tokens included) runs through the LLM once.

The plain path (``mpo.logprobs.batch_logps``) already runs the vision tower once per pair, but the
LLM still processes the prompt twice, once in the chosen row and once in the rejected row, and the
prompt is most of the sequence (256 tokens per tile against a few hundred answer tokens). Here
each pair is laid out as

    [shared prefix | chosen suffix | rejected suffix]

the prefix being the two sequences' longest common token prefix (the prompt and
``<|im_start|>assistant\\n``). The chosen suffix sees the prefix and itself, the rejected suffix
the prefix and itself, never the chosen tokens; position ids restart at the prefix length for the
rejected suffix, so every token has exactly the position, keys and values it has in its own
sequence, and the log-probs are the plain path's up to float rounding (the idea of "prefix
sharing", Wang et al. 2024, arXiv:2410.20305).

Two entry points, one forward:
- a plain ``PairCollator`` batch (``model.shared_prompt``): each pair becomes a row of its own;
- a packed batch (``data.packing``, ``mpo.data.collate.PackedPairCollator``): several pairs in a
  row, block-diagonal.
Attention runs through ``mpo.pair_attention`` (per-pair blocks with sdpa/eager, FlexAttention or
flash-attn varlen, by the model's ``attn_implementation``). Each trained token is scored at the
hidden state that predicts it (``packing.pack_pairs``'s ``scored`` table): the last prefix
position predicts the first token of both answers.
"""

from __future__ import annotations

import torch

from mpo import pair_attention
from mpo.logprobs import SequenceLogps, embed_with_images, scored_logps
from mpo.packing import pack_pairs, unpack_plain_batch

PACKED_KEYS = ("input_ids", "position_ids", "attention_mask", "pairs", "scored")


def pack_plain_batch(batch: dict, pad_token_id: int) -> dict:
    """A ``PairCollator`` batch in the packed layout, one pair per row (``pack_pairs``), on its device."""
    device = batch["input_ids"].device
    plain = {k: batch[k].cpu() for k in ("input_ids", "attention_mask", "labels")}
    pairs = unpack_plain_batch(plain)
    packed = pack_pairs(pairs, pad_token_id, rows=range(len(pairs)))
    return {**batch, **{k: v.to(device) for k, v in packed.items()}}


def packed_hidden_states(model, batch: dict, lockstep: bool = False) -> torch.Tensor:
    """Last hidden states ``(R, P, H)`` of a packed batch (``PACKED_KEYS``, ``pixel_values``)."""
    base = pair_attention.install(model)
    input_ids = batch["input_ids"]
    rows, width = input_ids.shape
    kernel = pair_attention.make_kernel(base, batch["pairs"], rows, width, input_ids.device)
    embeds = embed_with_images(model, input_ids, batch.get("pixel_values"), 1, lockstep)
    # A 4-D mask is passed through by transformers' mask builders untouched; the kernel ignores it.
    no_mask = torch.zeros((rows, 1, 0, 0), dtype=torch.bool, device=input_ids.device)
    out = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=no_mask,
        position_ids=batch["position_ids"],
        use_cache=False,
        mpo_pairs=kernel,
    )
    return out.last_hidden_state


def packed_batch_logps(
    model, batch: dict, chunk_size: int = 4096, lockstep: bool = False, calls: int | None = None
) -> SequenceLogps:
    """Summed response log-probs ``(2K,)`` (chosen answers first) of a packed or plain pair batch.

    The same values as ``mpo.logprobs.batch_logps`` on the plain batch, the prompt computed once.
    ``lockstep``, ``calls``: as in ``batch_logps``.
    """
    if "pairs" not in batch:
        batch = pack_plain_batch(batch, model.config.get_text_config().pad_token_id or 0)
    hidden = packed_hidden_states(model, batch, lockstep)
    scored = batch["scored"]
    return scored_logps(
        hidden, scored[:, 0], scored[:, 1], scored[:, 2], scored[:, 3], 2 * batch["pairs"].shape[0],
        model.get_output_embeddings(), chunk_size, calls,
    )  # fmt: skip
