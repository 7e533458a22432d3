"""Length-grouped pair batching: lengths from the index, grouping, determinism, distributed split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mpo.sampler import LengthGroupedPairSampler, length_grouped_indices, pair_lengths


@pytest.fixture(scope="module")
def mixed_pairs(tokenizer, tmp_path_factory):
    """Pairs with 0, 1, 3, 5 tiles and short or long answers."""
    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.tiny import build_config

    root = tmp_path_factory.mktemp("mixed")
    lines = []
    sizes = [None, (64, 64), (128, 64), (128, 128)]
    for i in range(16):
        rec = {
            "question": "What shape is shown?" if i % 3 else "<image>\nWhat color is it?",
            "chosen": "It is a circle." * (1 + i % 4),
            "rejected": "It is a square.",
        }
        size = sizes[i % 4]
        if size is not None:
            Image.new("RGB", size, (i * 10, 50, 90)).save(root / f"{i}.png")
            rec["image"] = f"{i}.png"
        else:
            rec["question"] = "What shape is shown?"
        lines.append(json.dumps(rec))
    (root / "p.jsonl").write_text("\n".join(lines) + "\n")
    vision = VisionSpec.from_config(build_config(tokenizer))
    return PairDataset(root / "p.jsonl", tokenizer, vision, DataConfig(max_dynamic_patch=4))


def test_pair_lengths_match_encoded_lengths(mixed_pairs):
    got = pair_lengths(mixed_pairs)
    real = []
    for i in range(len(mixed_pairs)):
        it, _ = mixed_pairs[i]
        real.append(max(len(it["chosen_input_ids"]), len(it["rejected_input_ids"])))
    assert got.tolist() == real
    assert len(set(real)) > 4


@pytest.mark.parametrize("decode", [True, False])
def test_pair_lengths_read_images_held_in_a_datasets_table(mixed_pairs, tmp_path, decode):
    """A HF ``datasets`` source holds images as bytes (decoded to PIL by default): the length
    estimate reads their size there, as it does from files."""
    import datasets

    from mpo.data.pairs import PairDataset

    root = mixed_pairs.source.specs[0].root
    rows = []
    for i in range(len(mixed_pairs)):
        _, _, obj = mixed_pairs.source.get(i)
        row = dict(obj)
        row["image"] = (
            {"bytes": (root / obj["image"]).read_bytes(), "path": None} if obj.get("image") else None
        )
        rows.append(row)
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image(decode=decode))
    table.save_to_disk(str(tmp_path / "t"))
    in_table = PairDataset(
        tmp_path / "t", mixed_pairs.encoder.template.tokenizer, mixed_pairs.encoder.vision, mixed_pairs.cfg
    )
    assert pair_lengths(in_table).tolist() == pair_lengths(mixed_pairs).tolist()
    assert len(set(pair_lengths(in_table).tolist())) > 4


def _padding_waste(order, lengths, bs):
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    return sum(len(b) * max(lengths[j] for j in b) - sum(lengths[j] for j in b) for b in batches)


def test_grouping_is_a_permutation_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 3400, size=1000)
    g = torch.Generator().manual_seed(3)
    order = length_grouped_indices(lengths, 8, g, mega_batch_mult=10)
    assert sorted(order) == list(range(1000))
    random_order = torch.randperm(1000, generator=torch.Generator().manual_seed(3)).tolist()
    assert _padding_waste(order, lengths, 8) < 0.2 * _padding_waste(random_order, lengths, 8)
    # The longest pair is in the first batch (out-of-memory shows at step 1).
    assert int(np.argmax(lengths)) in order[:8]


@pytest.mark.parametrize(
    "n,bs,mult,spread,last_longest",
    [
        (1000, 8, 10, 3000, False),
        (963, 8, 10, 3000, True),  # 963 = 12 x 80 + 3: the last mega-batch is one short batch
        (37, 4, 2, 5, False),  # few distinct lengths: ties keep their shuffled order
        (5, 8, 50, 9, False),
        (1, 1, 50, 3, False),
        (0, 4, 50, 3, False),
    ],
)
def test_grouping_equals_the_list_recipe(n, bs, mult, spread, last_longest):
    """The numpy grouping gives exactly the list recipe's order, including a longest batch that is
    the short last one (swapped to the front)."""
    from oracles import length_grouped_indices_lists  # tests/ is on sys.path under pytest

    for seed in range(5):
        lengths = np.random.default_rng(seed).integers(1, spread, size=n).astype(np.int32)
        if last_longest:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
            lengths[perm[-(n % (bs * mult)) :]] = spread + 1
        got = length_grouped_indices(lengths, bs, torch.Generator().manual_seed(seed), mult)
        want = length_grouped_indices_lists(lengths, bs, torch.Generator().manual_seed(seed), mult)
        assert got.tolist() == want
        if last_longest:
            assert sorted(got[:3].tolist()) == sorted(perm[-3:].tolist()) and len(got) == n


def test_sampler_deterministic_per_epoch():
    lengths = np.arange(100) % 17
    a = LengthGroupedPairSampler(lengths, 4, seed=7)
    b = LengthGroupedPairSampler(lengths, 4, seed=7)
    assert list(a) == list(b) == list(a)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    assert list(LengthGroupedPairSampler(lengths, 4, seed=8)) != first
    assert len(a) == 100


@pytest.mark.parametrize("n", [96, 101])
def test_sampler_distributed_split(n):
    lengths = (np.arange(n) * 37) % 211
    ranks = [LengthGroupedPairSampler(lengths, 4, seed=1, num_replicas=3, rank=r) for r in range(3)]
    parts = [list(s) for s in ranks]
    # Same number of batches on every rank (only a final short batch may differ in size).
    assert len({-(-len(p) // 4) for p in parts}) == 1 and all(len(p) == len(s) for p, s in zip(parts, ranks))
    everything = [i for p in parts for i in p]
    assert set(everything) == set(range(n))
    if n % 12 == 0:
        assert len(everything) == n  # no repeats when batches divide evenly
    # Each rank's batches are consecutive slices of the single-process order.
    whole = list(LengthGroupedPairSampler(lengths, 4, seed=1))
    whole_batches = [whole[i : i + 4] for i in range(0, n, 4)]
    assert parts[1][:4] == whole_batches[1] and parts[2][4:8] == whole_batches[5]


def test_sampler_with_dataloader_groups_real_pairs(mixed_pairs):
    from mpo.data.collate import PairCollator

    lengths = pair_lengths(mixed_pairs)
    sampler = LengthGroupedPairSampler(lengths, 4, seed=0)
    loader = torch.utils.data.DataLoader(
        mixed_pairs, batch_size=4, sampler=sampler, collate_fn=PairCollator(0)
    )
    widths = [b["input_ids"].shape[1] for b, _ in loader]
    real = sorted(
        max(len(mixed_pairs[i][0]["chosen_input_ids"]), len(mixed_pairs[i][0]["rejected_input_ids"]))
        for i in range(16)
    )
    # With one mega-batch the batches are exactly the sorted length quartiles.
    assert sorted(widths) == sorted(real[3::4])
