"""Reference log-prob cache: values, sharding, training equivalence and refusals.

Tolerance: float32 forwards with other batch padding: summed log-probs agree within C·ε·|L|
(``tolerances.logp_close``), training with the cache and with the reference model within the
per-step bounds of ``tolerances.assert_same_training``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tolerances import assert_same_training, logp_close  # tests/ is on sys.path under pytest

from mpo.refcache import (
    MANIFEST_NAME,
    RefCache,
    RefCachedDataset,
    RefCacheError,
    compute_shard,
    data_settings,
    model_identity,
    open_ref_cache,
    pair_key,
    precompute_ref,
    write_manifest,
    write_shard,
)


@pytest.fixture(scope="module")
def small_data(demo_data, tmp_path_factory):
    """The first 12 demo training pairs (images shared with the demo folder) and 4 eval pairs."""
    root = demo_data["train"].parent
    out = tmp_path_factory.mktemp("small")
    paths = {}
    for split, n in (("train", 12), ("eval", 4)):
        lines = (root / f"{split}.jsonl").read_text().splitlines()[:n]
        (root / f"small_{split}.jsonl").write_text("\n".join(lines) + "\n")
        meta = {
            f"small_{split}": {
                "root": str(root),
                "annotation": str(root / f"small_{split}.jsonl"),
                "max_dynamic_patch": 4,
            }
        }
        paths[split] = out / f"meta_{split}.json"
        paths[split].write_text(json.dumps(meta))
    return paths


@pytest.fixture(scope="module")
def cache_dir(tiny_model_dir, small_data, tmp_path_factory):
    from mpo.config import load_config

    folder = tmp_path_factory.mktemp("refcache")
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.meta_path={small_data['train']}",
            f"data.eval_meta_path={small_data['eval']}",
            f"model.ref_cache={folder}",
            "training.per_device_eval_batch_size=3",
        ],
    )
    precompute_ref(cfg)
    return folder


def _pairs(tiny_model_dir, meta, **data):
    from transformers import AutoConfig

    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    vision = VisionSpec.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    return PairDataset(meta, tok, vision, DataConfig(**{"max_dynamic_patch": 12, **data}))


def test_manifest_and_cli(cache_dir, tiny_model_dir, small_data, tmp_path, capsys):
    m = json.loads((cache_dir / MANIFEST_NAME).read_text())
    assert m["num_pairs"] == 16 and m["num_unique_pairs"] == 16
    assert m["model_identity"] == model_identity(str(tiny_model_dir), "float32")
    assert m["data_settings"]["tokens_per_tile"] == 4 and m["data_settings"]["max_length"] == 8192
    # The CLI command writes the same values (precompute-ref is loaded from mpo.refcache).
    from mpo.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        f"model:\n  path: {tiny_model_dir}\n  ref_cache: {tmp_path / 'cli-cache'}\n"
        f"data:\n  meta_path: {small_data['train']}\n"
    )
    assert main(["precompute-ref", "--config", str(cfg_file), "--batch-size", "5"]) == 0
    assert "12 unique pairs of 12" in capsys.readouterr().out
    a, b = RefCache(cache_dir), RefCache(tmp_path / "cli-cache")
    for key, (c, r) in b.values.items():
        assert logp_close(a.values[key][0], c) and logp_close(a.values[key][1], r)


def test_cached_values_equal_live_reference(cache_dir, tiny_model_dir, small_data):
    from mpo.data.collate import PairCollator
    from mpo.logprobs import batch_logps
    from mpo.model.loading import load_model

    model = load_model(str(tiny_model_dir))
    cache = RefCache(cache_dir)
    pairs = _pairs(tiny_model_dir, small_data["train"])
    collator = PairCollator(pairs.encoder.template.tokenizer.pad_token_id)
    ds = RefCachedDataset(pairs, cache)
    seen = 0
    for i in range(len(ds)):
        item, _ = ds[i]
        with torch.no_grad():
            live_c, live_r = batch_logps(model, collator([pairs[i]])[0]).split()
        assert logp_close(item["ref_chosen_logps"], live_c.item())
        assert logp_close(item["ref_rejected_logps"], live_r.item())
        seen += 1
    assert seen == 12
    # The collator turns the cached floats into batch tensors.
    batch, _ = collator([ds[0], ds[1]])
    assert batch["ref_chosen_logps"].shape == (2,) and batch["ref_chosen_logps"].dtype == torch.float64


def test_two_rank_shards_equal_one(tiny_model_dir, small_data, tmp_path):
    from mpo.model.loading import load_model

    model = load_model(str(tiny_model_dir))
    pairs = _pairs(tiny_model_dir, small_data["train"])
    whole, events, videos = compute_shard(model, [pairs], 0, 1, 4, 4096, "cpu")
    assert videos == [0]
    assert events.seen == 12
    parts = [compute_shard(model, [pairs], r, 2, 4, 4096, "cpu")[0] for r in (0, 1)]
    assert len(parts[0]) == 6 and len(parts[1]) == 6 and not set(parts[0]) & set(parts[1])
    identity = model_identity(str(tiny_model_dir), "float32")
    for r, part in enumerate(parts):
        write_shard(tmp_path, r, 2, part)
    write_manifest(tmp_path, 2, identity, data_settings(pairs), len(pairs))
    merged = RefCache(tmp_path)
    assert set(merged.values) == set(whole)
    for k, v in whole.items():
        assert logp_close(merged.values[k][0], v[0]) and logp_close(merged.values[k][1], v[1])


def _train_rows(trainer) -> dict[int, dict]:
    trainer.train()
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h}


def test_training_with_cache_equals_training_with_reference(
    tiny_config, cache_dir, small_data, tiny_model_dir, tmp_path
):
    from mpo.run import build_trainer

    common = [
        f"data.meta_path={small_data['train']}",
        "data.eval_meta_path=null",
        "training.max_steps=3",
        'training.save_strategy="no"',
    ]
    ref_trainer, _ = build_trainer(tiny_config(*common, f"training.output_dir={tmp_path / 'a'}"))
    assert ref_trainer.ref_model is not None
    with_ref = _train_rows(ref_trainer)
    cached_cfg = tiny_config(
        *common,
        "model.reference=cache",
        f"model.ref_cache={cache_dir}",
        f"training.output_dir={tmp_path / 'b'}",
    )
    trainer, _ = build_trainer(cached_cfg)
    assert trainer.ref_model is None  # no reference model is loaded
    assert isinstance(trainer.train_dataset, RefCachedDataset)  # build_trainer wrapped the data
    with_cache = _train_rows(trainer)
    assert sorted(with_ref) == [1, 2, 3]
    assert_same_training(with_cache, with_ref)
    assert with_ref[1]["loss"] != with_ref[3]["loss"]  # the model did train


def test_refuses_other_reference_weights(cache_dir, tiny_model_dir, small_data, tmp_path):
    from mpo.model.tiny import save_tiny_internvl

    other = save_tiny_internvl(tmp_path / "other", seed=1)  # same config.json, other weights
    pairs = _pairs(tiny_model_dir, small_data["train"])
    with pytest.raises(RefCacheError, match=r"model\.weights"):
        open_ref_cache(cache_dir, pairs, str(other), "float32")
    with pytest.raises(RefCacheError, match=r"model\.torch_dtype"):
        open_ref_cache(cache_dir, pairs, str(tiny_model_dir), "bfloat16")


def test_refuses_other_data_settings(cache_dir, tiny_model_dir, small_data):
    pairs = _pairs(tiny_model_dir, small_data["train"], system_message="You are a helpful assistant.")
    with pytest.raises(RefCacheError, match=r"data\.system_message"):
        open_ref_cache(cache_dir, pairs, str(tiny_model_dir), "float32")
    pairs = _pairs(tiny_model_dir, small_data["train"], max_length=512, use_thumbnail=False)
    with pytest.raises(RefCacheError, match=r"data\.max_length.*\n.*data\.use_thumbnail"):
        open_ref_cache(cache_dir, pairs, str(tiny_model_dir), "float32")


def test_refuses_missing_pair_and_changed_image(cache_dir, tiny_model_dir, small_data, tmp_path):
    meta = json.loads(small_data["train"].read_text())
    entry = next(iter(meta.values()))
    lines = [json.loads(x) for x in open(entry["annotation"]).read().splitlines()]
    lines[3]["chosen"] = lines[3]["chosen"] + " Surely."
    ann = tmp_path / "edited.jsonl"
    ann.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    edited = tmp_path / "meta.json"
    edited.write_text(json.dumps({"edited": {**entry, "annotation": str(ann)}}))
    pairs = _pairs(tiny_model_dir, edited)
    ds = RefCachedDataset(pairs, RefCache(cache_dir))
    # An unchanged line still finds its value: the live reference's log-prob of that pair.
    from mpo.data.collate import PairCollator
    from mpo.logprobs import batch_logps
    from mpo.model.loading import load_model

    with torch.no_grad():
        live, _ = batch_logps(load_model(str(tiny_model_dir)), PairCollator(0)([pairs[2]])[0]).split()
    assert logp_close(ds[2][0]["ref_chosen_logps"], live.item())
    with pytest.raises(RefCacheError, match=r"edited\.jsonl:4 is not in the reference cache"):
        ds[3]
    with pytest.raises(RefCacheError, match="not in the reference cache"):
        open_ref_cache(cache_dir, pairs, str(tiny_model_dir), "float32")
    # Same text, different image bytes: a different key.
    root = tmp_path / "imgs"
    shutil.copytree(entry["root"], root, ignore=shutil.ignore_patterns("*.jsonl", "*.json"))
    img = root / lines[0]["image"]
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(img)
    (tmp_path / "meta2.json").write_text(json.dumps({"img": {**entry, "root": str(root)}}))
    pairs2 = _pairs(tiny_model_dir, tmp_path / "meta2.json")
    assert pair_key(pairs2, 0) != pair_key(pairs, 0) and pair_key(pairs2, 1) == pair_key(pairs, 1)


def test_refuses_unfinished_cache(tmp_path):
    (tmp_path / "shard-00000-of-00001.safetensors").write_bytes(b"")
    with pytest.raises(RefCacheError, match="did not finish"):
        RefCache(tmp_path)


@pytest.mark.slow
def test_precompute_two_processes_gloo(cache_dir, tiny_model_dir, small_data, tmp_path):
    """`torchrun --nproc_per_node 2 -m mpo.cli precompute-ref`: two shards, same values as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        f"model:\n  path: {tiny_model_dir}\n  ref_cache: {tmp_path / 'dist'}\n"
        f"data:\n  meta_path: {small_data['train']}\n  eval_meta_path: {small_data['eval']}\n"
    )
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mpo.cli",
        "precompute-ref",
        "--config",
        str(cfg_file),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = RefCache(tmp_path / "dist")
    assert dist.manifest["shards"] == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    single = RefCache(cache_dir)
    assert set(dist.values) == set(single.values)
    for k, v in single.values.items():
        assert logp_close(dist.values[k][0], v[0]) and logp_close(dist.values[k][1], v[1])


@pytest.mark.parametrize("decode", [False, True])
def test_keys_of_images_held_in_a_datasets_table(tiny_model_dir, small_data, tmp_path, decode):
    """Image bytes in a HF ``datasets`` table key like the files they came from (so a cache made
    from JSONL serves its parquet copy), and follow the content."""
    import datasets

    files = _pairs(tiny_model_dir, small_data["train"])
    spec = files.source.specs[0]
    rows = []
    for i in range(4):
        _, _, obj = files.source.get(i)
        rows.append({**obj, "image": {"bytes": (spec.root / obj["image"]).read_bytes(), "path": None}})
    rows[3]["image"] = rows[2]["image"]  # same question/answers as line 4, another image
    rows[3].update({k: rows[2][k] for k in ("question", "chosen", "rejected")})
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image(decode=decode))
    table.save_to_disk(str(tmp_path / "t"))
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps(
            {spec.name: {"root": str(spec.root), "annotation": str(tmp_path / "t"), "max_dynamic_patch": 4}}
        )
    )
    in_table = _pairs(tiny_model_dir, meta)
    keys = [pair_key(in_table, i) for i in range(4)]
    assert keys[2] == keys[3] and len(set(keys[:3])) == 3
    # Rows are read as stored (bytes), whatever the column's decode flag, so keys follow the file bytes.
    assert keys[:3] == [pair_key(files, i) for i in range(3)]
    changed = datasets.Dataset.from_list(rows[:1]).cast_column("image", datasets.Image(decode=decode))
    other = tmp_path / "other.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(other)
    changed = (
        changed.cast_column("image", datasets.Image(decode=False))
        .map(lambda r: {"image": {"bytes": other.read_bytes(), "path": None}})
        .cast_column("image", datasets.Image(decode=decode))
    )
    changed.save_to_disk(str(tmp_path / "c"))
    meta.write_text(
        json.dumps(
            {spec.name: {"root": str(spec.root), "annotation": str(tmp_path / "c"), "max_dynamic_patch": 4}}
        )
    )
    assert pair_key(_pairs(tiny_model_dir, meta), 0) != keys[0]


def test_pair_keys_are_the_same_in_another_process(tiny_model_dir, small_data):
    """Keys must not depend on anything per-process (hash seeds, dict order, object ids): a cache
    is written by one job and read by another."""
    import os
    import subprocess
    import sys

    pairs = _pairs(tiny_model_dir, small_data["train"])
    here = [pair_key(pairs, i).hex() for i in range(len(pairs))]
    code = (
        "import sys; sys.path.insert(0, sys.argv[3]); from test_refcache import _pairs; "
        "from mpo.refcache import pair_key; p = _pairs(sys.argv[1], sys.argv[2]); "
        "print(' '.join(pair_key(p, i).hex() for i in range(len(p))))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    tests_dir = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir), str(small_data["train"]), tests_dir],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert out.stdout.split() == here and len(set(here)) == len(here)
