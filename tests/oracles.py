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
