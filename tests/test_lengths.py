"""The length index: equal to what the encoder produces, cache hit and miss rules, the same
numbers from worker processes, ranks and nodes as from one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_data_video import write_video  # tests/ is on sys.path under pytest

import mpo.data.lengths as lengths_module
from mpo.config import DataConfig
from mpo.data.lengths import length_index
from mpo.data.pairs import PairDataset
from mpo.data.tiling import VisionSpec, tile_image

ROOT = Path(__file__).resolve().parents[1]

IMAGES = {
    "a.png": (64, 64),
    "wide.png": (200, 64),
    "tall.png": (50, 300),
    "big.jpg": (400, 300),
    "dot.png": (10, 7),
}
LONG = "The shape is a red circle on a white background, drawn with a thin black outline. " * 6
# (record, the encoder's skip reason or None)
RECORDS = [
    ({"question": "What is 2+2?", "chosen": "4", "rejected": "5"}, None),
    ({"image": "a.png", "question": "What colour is it?", "chosen": "Red.", "rejected": "Blue."}, None),
    ({"image": "big.jpg", "question": "Look: <image>\nWhat?", "chosen": "A shape.", "rejected": "No."}, None),
    (
        {
            "image": ["wide.png", "tall.png"],
            "question": "<image> vs <image>",
            "chosen": "Left.",
            "rejected": "Right.",
        },
        None,
    ),
    (
        {
            "image": ["a.png", "big.jpg", "dot.png"],
            "question": "<image><image><image> which?",
            "chosen": "The second one.",
            "rejected": "x",
        },
        None,
    ),
    (
        {
            "video": "long.mkv",
            "question": "<video>\nWhat happens?",
            "chosen": "It gets lighter.",
            "rejected": "Nothing.",
        },
        None,
    ),
    (
        {
            "video": "short.mkv",
            "question": "What happens?",
            "chosen": "It gets lighter.",
            "rejected": "Dark.",
        },
        None,
    ),
    ({"image": "big.jpg", "question": "Describe the image.", "chosen": LONG, "rejected": "A circle."}, None),
    ({"question": "Indent?", "chosen": "\n\n  indented answer", "rejected": "\nno"}, None),
    ({"question": "这是什么？", "chosen": "一个圆。", "rejected": "一个方块。", "answer_gt": "圆"}, None),
    ("{not json", "invalid_json"),
    ({"image": "nope.png", "question": "q", "chosen": "a", "rejected": "b"}, "missing_image"),
    ({"question": "q", "chosen": 3, "rejected": "b"}, "bad_chosen"),
    ({"question": "<image>\nq", "chosen": "a", "rejected": "b"}, "placeholder_mismatch"),
    (
        {"image": "a.png", "video": "long.mkv", "question": "q", "chosen": "a", "rejected": "b"},
        "image_and_video",
    ),
]
MAX_LENGTH = 220
VIDEO_MAX_FRAMES = 4


def _lines(records) -> str:
    return "".join(
        (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r, _ in records
    )


@pytest.fixture(scope="module")
def vision(tokenizer):
    from mpo.model.tiny import build_config

    return VisionSpec.from_config(build_config(tokenizer))  # 64 px tiles, 4 tokens per tile


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lengths")
    for name, size in IMAGES.items():
        Image.new("RGB", size, (40, 90, 200)).save(root / name)
    write_video(root / "long.mkv", num_frames=6)  # more frames than video_max_frames: exact
    write_video(root / "short.mkv", num_frames=3)  # fewer: the header's count keeps it exact
    (root / "p.jsonl").write_text(_lines(RECORDS))
    return root


def _config(**changes) -> DataConfig:
    base = dict(
        max_dynamic_patch=6,
        max_length=MAX_LENGTH,
        on_bad_sample="skip",
        video_min_frames=2,
        video_max_frames=VIDEO_MAX_FRAMES,
    )
    return DataConfig(**{**base, **changes})


def _pairs(path, tokenizer, vision, **changes) -> PairDataset:
    return PairDataset(path, tokenizer, vision, _config(**changes))


def test_lengths_equal_what_the_encoder_produces(data_dir, tokenizer, vision, tmp_path):
    """Every usable pair: prompt + answer = the encoder's untruncated lengths, tiles = its tiles,
    pair_tokens(max_length) = its longer (truncated) sequence; unusable ones have status 1 and the
    encoder's skip reason. Text-only, one image, several, a Chinese prompt, a prefix-merging
    answer; videos are priced at the frames their header announces (at most video_max_frames):
    exact here, an upper bound where the encoder's budget drops frames to fit max_length."""
    pairs = _pairs(data_dir / "p.jsonl", tokenizer, vision)
    index = length_index(pairs, cache_dir=tmp_path, workers=0)
    capped = index.pair_tokens(MAX_LENGTH)
    truncated = 0
    for i, (record, reason) in enumerate(RECORDS):
        pair, events = pairs[i]
        if reason is not None:
            assert pair is None and set(events.skipped) == {reason}
            assert index.status[i] == 1 and capped[i] == 0
            continue
        assert index.status[i] == 0
        full = pair["full_lengths"]
        longest = max(len(pair["chosen_input_ids"]), len(pair["rejected_input_ids"]))
        truncated += max(full.values()) > MAX_LENGTH
        assert index.prompt[i] + index.chosen[i] == full["chosen"], record
        assert index.prompt[i] + index.rejected[i] == full["rejected"], record
        assert index.tiles[i] == sum(pair["num_tiles"]), record
        assert capped[i] == longest, record
    assert truncated == 1  # the long answer is cut at max_length, and pair_tokens caps it the same way
    assert index.files[0].manifest["skipped"] == {r: 1 for _, r in RECORDS if r}
    assert index.files[0].manifest["exact_fallback_chunks"] == 0
    assert isinstance(index.prompt, np.memmap)  # one dataset read once: the mapped file itself


@pytest.mark.parametrize("size", [(64, 64), (128, 64), (64, 200), (300, 290), (500, 60), (20, 15)])
@pytest.mark.parametrize("budget", [1, 4, 12])
def test_header_tiles_equal_real_tiling(tmp_path, tokenizer, vision, size, budget):
    """Tiles from the image header (no decoding) equal the tiles InternVL's tiling cuts."""
    Image.new("RGB", size, (10, 20, 30)).save(tmp_path / "x.png")
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"image": "x.png", "question": "q", "chosen": "a", "rejected": "b"})
    )
    index = length_index(
        _pairs(tmp_path / "p.jsonl", tokenizer, vision, max_dynamic_patch=budget), tmp_path / "c", 0
    )
    with Image.open(tmp_path / "x.png") as im:
        assert index.tiles[0] == tile_image(im, budget, vision.image_size, 1, True).shape[0]


def test_fast_path_equals_the_template_encoding(data_dir, tokenizer, vision, tmp_path):
    """The batched counts (spans as <img></img>, Rust batch tokenizer) equal the template's full
    encoding of every record, field by field."""
    pairs = _pairs(data_dir / "p.jsonl", tokenizer, vision)
    measurer = lengths_module._Measurer(pairs, 0)
    fast, _ = measurer.measure(0, len(RECORDS))
    exact, stats = measurer.measure(0, len(RECORDS), exact=True)
    assert stats["exact_fallback"] == 1
    assert fast.tolist() == exact.tolist()


def test_a_disagreeing_tokenizer_falls_back_to_the_template(data_dir, tokenizer, vision, monkeypatch):
    """When the batched counts differ from the template's (a tokenizer that does not split added
    tokens out), the chunk is recomputed with the template's full encoding."""
    pairs = _pairs(data_dir / "p.jsonl", tokenizer, vision)
    measurer = lengths_module._Measurer(pairs, 0)
    exact, _ = measurer.measure(0, len(RECORDS), exact=True)
    real = measurer._tokenize

    def one_token_more(texts, ids=True):
        out = real(texts, ids)
        return [x + [0] for x in out] if ids else [x + 1 for x in out]

    monkeypatch.setattr(measurer, "_tokenize", one_token_more)
    got, stats = measurer.measure(0, len(RECORDS))
    assert stats["exact_fallback"] == 1 and got.tolist() == exact.tolist()


def test_parallel_equals_serial_and_repeats_follow_the_meta(
    data_dir, tokenizer, vision, tmp_path, monkeypatch
):
    """2 worker processes over 20 chunks give the serial table; a meta file with repeat_time 2 and
    0.5 reads each pair's lengths at its global index."""
    monkeypatch.setattr(lengths_module, "CHUNK_ROWS", 16)
    many = [RECORDS[i % len(RECORDS)] for i in range(310)]
    (tmp_path / "many.jsonl").write_text(_lines(many))
    (tmp_path / "meta.json").write_text(
        json.dumps(
            {
                "many": {"root": str(data_dir), "annotation": "many.jsonl", "repeat_time": 2},
                "few": {"root": str(data_dir), "annotation": str(data_dir / "p.jsonl"), "repeat_time": 0.5},
            }
        )
    )
    pairs = _pairs(tmp_path / "meta.json", tokenizer, vision)
    serial = length_index(pairs, cache_dir=tmp_path / "serial", workers=0)
    parallel = length_index(pairs, cache_dir=tmp_path / "parallel", workers=2)
    assert parallel.files[0].built and parallel.files[0].manifest["build"]["workers_per_rank"] == 2
    for a, b in zip(serial.files, parallel.files):
        assert np.array_equal(a.table, b.table)
    assert len(serial) == 2 * 310 + len(RECORDS) // 2
    tokens = serial.pair_tokens()
    for i in range(len(pairs)):
        k, r = pairs.source.locate(i)  # the dataset's own per-index mapping
        row = serial.files[k].table[r]
        assert tokens[i] == row["prompt"] + max(row["chosen"], row["rejected"])
        assert serial.tiles[i] == row["tiles"] and serial.status[i] == row["status"]


def _link_media(data_dir: Path, folder: Path) -> None:
    """The images and videos beside a JSONL written in ``folder`` (its dataset root)."""
    for name in [*IMAGES, "long.mkv", "short.mkv"]:
        shutil.copy(data_dir / name, folder / name)  # copies: a symlink out of the root is refused


def test_cache_hits_and_misses(data_dir, tokenizer, vision, tmp_path):
    """Reused while nothing it depends on changes (max_length is applied when reading); rebuilt,
    naming what changed, when the file's bytes change (same size, same mtime), the tokenizer, the
    tile budget (the config's or the meta entry's), or when the cached array is damaged."""
    from mpo.model.tiny import build_tokenizer

    _link_media(data_dir, tmp_path)
    path = tmp_path / "p.jsonl"
    path.write_text(_lines(RECORDS))
    (tmp_path / "meta.json").write_text(json.dumps({"p": {"annotation": "p.jsonl", "max_dynamic_patch": 3}}))
    cache = tmp_path / "cache"

    def index(tok=tokenizer, meta=path, **changes):
        return length_index(_pairs(meta, tok, vision, **changes), cache_dir=cache, workers=0)

    first = index()
    assert first.files[0].built and first.files[0].reason == "no index of this file yet"
    again = index(max_length=64)
    assert not again.files[0].built and np.array_equal(again.files[0].table, first.files[0].table)
    assert again.pair_tokens(64).max() == 64

    # Same size and mtime, one word changed: only a content hash sees it.
    stat = path.stat()
    path.write_text(_lines(RECORDS).replace('"chosen": "Red."', '"chosen": "Rot."'))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    edited = index()
    assert edited.files[0].built and edited.files[0].reason == "changed: content.sha256"

    other_tokenizer = index(tok=build_tokenizer(vocab_size=500))
    assert other_tokenizer.files[0].reason == "changed: settings.tokenizer_sha256"
    assert not np.array_equal(other_tokenizer.chosen, edited.chosen)

    budget = index(max_dynamic_patch=2)
    assert budget.files[0].reason == "changed: dataset.tile_budget, settings.max_dynamic_patch"
    assert budget.tiles.sum() < edited.tiles.sum() and (edited.status == 0).sum() == 10
    meta_budget = index(meta=tmp_path / "meta.json")  # the entry's own max_dynamic_patch: 3
    assert meta_budget.files[0].built and "dataset.tile_budget" in meta_budget.files[0].reason

    assert not index().files[0].built
    want = np.array(edited.files[0].table)
    np.save(tmp_path / "short.npy", np.zeros(3, lengths_module.LENGTH_DTYPE))
    os.replace(tmp_path / "short.npy", edited.files[0].folder / "lengths.npy")  # open maps stay valid
    damaged = index()
    assert damaged.files[0].built and damaged.files[0].reason == "the cached index was unreadable"
    assert np.array_equal(damaged.files[0].table, want)
    (damaged.files[0].folder / "manifest.json").write_text('{"format": 1, "key": {"cont')  # cut short
    assert index().files[0].built and not index().files[0].built
    assert (
        length_index(_pairs(path, tokenizer, vision), cache, 0, rebuild=True).files[0].reason == "--rebuild"
    )


def test_a_datasets_folder_is_keyed_by_its_files(data_dir, tokenizer, vision, tmp_path):
    """A HF datasets folder (images held as bytes): the same lengths as the JSONL it came from;
    a changed Arrow file is a changed key."""
    import datasets

    rows = []
    for record, _ in RECORDS[:5]:
        row = dict(record)
        images = row.get("image") or []
        images = [images] if isinstance(images, str) else images
        row["image"] = [{"bytes": (data_dir / p).read_bytes(), "path": None} for p in images]
        rows.append(row)
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Sequence(datasets.Image()))
    table.save_to_disk(str(tmp_path / "t"))
    from_table = length_index(_pairs(tmp_path / "t", tokenizer, vision), tmp_path / "c", 0)
    _link_media(data_dir, tmp_path)
    (tmp_path / "p.jsonl").write_text(_lines(RECORDS[:5]))
    from_file = length_index(_pairs(tmp_path / "p.jsonl", tokenizer, vision), tmp_path / "c", 0)
    assert from_table.status.tolist() == [0] * 5
    assert np.array_equal(from_table.files[0].table, from_file.files[0].table)

    shutil.rmtree(tmp_path / "t")  # unlinked, so the first dataset's mapping stays valid
    smaller = datasets.Dataset.from_list(rows[:4]).cast_column("image", datasets.Sequence(datasets.Image()))
    smaller.save_to_disk(str(tmp_path / "t"))
    changed = length_index(_pairs(tmp_path / "t", tokenizer, vision), tmp_path / "c", 0)
    assert changed.files[0].built and changed.files[0].reason.startswith("changed: content.")


# ---- the command, ranks and nodes ---------------------------------------------------------------


def _write_config(tmp_path, model_dir, data_dir, cache) -> Path:
    cfg = {
        "model": {"path": str(model_dir)},
        "data": {
            **{k: getattr(_config(), k) for k in ("max_dynamic_patch", "max_length", "on_bad_sample")},
            **{k: getattr(_config(), k) for k in ("video_min_frames", "video_max_frames")},
            "meta_path": str(tmp_path / "meta.json"),
            "length_cache_dir": str(cache),
            "length_workers": 1,
        },
    }
    many = [RECORDS[i % len(RECORDS)] for i in range(100)]
    (tmp_path / "many.jsonl").write_text(_lines(many))
    (tmp_path / "meta.json").write_text(
        json.dumps({"many": {"root": str(data_dir), "annotation": "many.jsonl"}})
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _serial_table(cfg_path: Path, tmp_path: Path) -> np.ndarray:
    from mpo.config import load_config
    from mpo.model.loading import load_tokenizer, load_vision_spec

    cfg = load_config(cfg_path, check=False)
    pairs = PairDataset(
        cfg.data.meta_path, load_tokenizer(cfg.model.path), load_vision_spec(cfg.model.path), cfg.data
    )
    return np.asarray(length_index(pairs, cache_dir=tmp_path / "serial", workers=0).files[0].table)


def test_data_index_command_builds_then_reuses(tiny_model_dir, data_dir, tmp_path, capsys):
    from mpo.cli import main

    cfg = _write_config(tmp_path, tiny_model_dir, data_dir, tmp_path / "cache")
    assert main(["data", "index", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "length index: 100 pairs" in out and "built now (no index of this file yet)" in out
    assert "cannot be measured: invalid_json x" in out
    assert main(["data", "index", "--config", str(cfg), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["datasets"]["many"]["built"] is False and figures["pairs"] == 100
    assert figures["pair_tokens"]["max"] > MAX_LENGTH and figures["over_max_length"] > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], env: dict, nodes: int = 1, procs: int = 2, node_rank: int = 0, port: int = 0):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={procs}"]
    cmd += [
        f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        "mpo.cli",
        *args,
    ]
    return subprocess.Popen(
        cmd, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_ranks_split_the_work_shared_and_node_local_caches(tiny_model_dir, data_dir, tmp_path):
    """2 ranks on one machine (one shared cache) and 2 single-rank "nodes" (each its own cache)
    both write the serial table; the manifest records the 2 ranks."""
    cfg = _write_config(tmp_path, tiny_model_dir, data_dir, tmp_path / "shared")
    want = _serial_table(cfg, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = _torchrun(["data", "index", "--config", str(cfg)], env, port=_free_port())
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    (folder,) = (tmp_path / "shared").iterdir()
    assert np.array_equal(np.load(folder / "lengths.npy"), want)
    assert json.loads((folder / "manifest.json").read_text())["build"]["ranks"] == 2

    # Two "nodes" whose cache folders the other cannot see: node 1 writes its own copy.
    port = _free_port()
    nodes = [
        _torchrun(
            ["data", "index", "--config", str(cfg), f"data.length_cache_dir={tmp_path / f'node{r}'}"],
            env,
            nodes=2,
            procs=1,
            node_rank=r,
            port=port,
        )
        for r in range(2)
    ]
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, out[-3000:]
    for r in range(2):
        (folder,) = (tmp_path / f"node{r}").iterdir()
        assert np.array_equal(np.load(folder / "lengths.npy"), want)


MEMORY_CHILD = """
import sys
from mpo.config import DataConfig
from mpo.model.loading import load_vision_spec
from mpo.data.lengths import length_index
from mpo.data.pairs import PairDataset
from mpo.model.loading import load_tokenizer

pairs = PairDataset(sys.argv[1], load_tokenizer(sys.argv[2]), load_vision_spec(sys.argv[2]), DataConfig())

def rss_kib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])

base = rss_kib()
index = length_index(pairs, cache_dir=sys.argv[3], progress=False)
assert not index.files[0].built
tokens = index.pair_tokens(8192)
print("GROWTH", rss_kib() - base, int(tokens.sum()))
"""


@pytest.mark.slow
def test_reusing_the_index_keeps_bytes_per_pair(tiny_model_dir, tmp_path):
    """Opening a cached index and holding every pair's length adds a few bytes per pair to the
    resident memory (the mapped file's 17 and the int32 result), not Python objects. (Hashing the
    file reads it through two 4 MiB buffers at most, a fixed peak that is freed again.)"""
    from mpo.model.loading import load_tokenizer, load_vision_spec

    tokenizer, vision = load_tokenizer(str(tiny_model_dir)), load_vision_spec(str(tiny_model_dir))
    growth = {}
    for n in (10_000, 50_000):
        path = tmp_path / f"{n}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                f.write(
                    json.dumps({"question": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."})
                )
                f.write("\n")
        pairs = PairDataset(path, tokenizer, vision, DataConfig())
        length_index(pairs, cache_dir=tmp_path / "cache", progress=False)
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(path), str(tiny_model_dir), str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        growth[n] = int(out.stdout.split("GROWTH")[1].split()[0])
    per_pair = (growth[50_000] - growth[10_000]) * 1024 / 40_000
    print(f"resident memory growth KiB {growth} -> {per_pair:.1f} B/pair")
    # 17 B mapped + 4 B result = 21 B; the bound leaves room for page rounding and the allocator.
    # A Python int per pair alone would be 28 B plus an 8 B list slot.
    assert per_pair < 32, growth
