"""Reading MMPR meta files, JSONL and HF datasets sources; repeat_time; tile budgets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpo.config import DataConfig
from mpo.data.mmpr import DataError, JsonlFile, MixedSource, read_meta
from mpo.data.pairs import PairDataset
from mpo.data.tiling import VisionSpec

VISION = VisionSpec(image_size=28, tokens_per_tile=2)


def lines_for(tag: str, n: int, image: str | list[str] | None = None) -> list[dict]:
    out = []
    for i in range(n):
        row = {
            "question": f"{tag} q{i}",
            "chosen": f"{tag} good {i}",
            "rejected": f"{tag} bad {i}",
            "extra": [i],
        }
        if image is not None:
            row["image"] = image
        out.append(row)
    return out


def write_jsonl(path, rows, trailing_newline=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(r) for r in rows) + ("\n" if trailing_newline else "")
    path.write_text(text)
    return path


@pytest.fixture
def mixed(tmp_path):
    """Two datasets under data/, a meta file in meta/ with relative roots."""
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    Image.new("RGB", (56, 28), (1, 2, 3)).save(data / "imgs" / "wide.png")
    write_jsonl(data / "a.jsonl", lines_for("A", 10, "wide.png"))
    write_jsonl(data / "b.jsonl", lines_for("B", 4))
    meta = {
        "A": {
            "root": "../data/imgs",
            "annotation": "../data/a.jsonl",
            "repeat_time": 0.5,
            "max_dynamic_patch": 1,
        },
        "B": {"root": "../data", "annotation": "../data/b.jsonl", "repeat_time": 3, "data_augment": False},
    }
    (tmp_path / "meta").mkdir()
    path = tmp_path / "meta" / "meta.json"
    path.write_text(json.dumps(meta))
    return path


def test_meta_mixing_relative_root_and_repeat_time(mixed, tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path / "data")  # roots must resolve against the meta file, not the cwd
    specs = read_meta(mixed)
    assert [s.root.resolve() for s in specs] == [
        (tmp_path / "data" / "imgs").resolve(),
        (tmp_path / "data").resolve(),
    ]
    ds = PairDataset(mixed, tokenizer, VISION, DataConfig(max_dynamic_patch=4))
    assert ds.source.counts() == {"A": 5, "B": 12} and len(ds) == 17
    items = [ds[i][0] for i in range(len(ds))]
    a_lines = [it["line"] for it in items if it["dataset"] == "A"]
    assert len(set(a_lines)) == 5 and set(a_lines) <= set(range(1, 11))  # a subsample, no repeats
    b_lines = Counter(it["line"] for it in items if it["dataset"] == "B")
    assert b_lines == {1: 3, 2: 3, 3: 3, 4: 3}
    # Per-dataset max_dynamic_patch: A's 2:1 image would be 2 tiles + thumbnail at 4, is 1 at 1.
    assert all(it["num_tiles"] == [1] for it in items if it["dataset"] == "A")
    # The text of a B line matches its line number.
    it = next(it for it in items if it["dataset"] == "B" and it["line"] == 3)
    assert "B good 2<|im_end|>" in tokenizer.decode(it["chosen_input_ids"].tolist())


def test_fractional_repeat_is_seeded_and_keeps_whole_repeats(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", lines_for("X", 10))
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"X": {"root": ".", "annotation": "x.jsonl", "repeat_time": 1.5}}))
    src = MixedSource(read_meta(meta), seed=3)
    rows = [src.locate(i)[1] for i in range(len(src))]
    assert len(rows) == 15 and rows[:10] == list(range(10)) and len(set(rows[10:])) == 5
    assert rows == [MixedSource(read_meta(meta), seed=3).locate(i)[1] for i in range(15)]
    assert JsonlFile(f).offsets.nbytes == 8 * 11  # 8 bytes per line (+1 end offset)


def test_multi_image_tile_budget(tmp_path, tokenizer):
    Image.new("RGB", (56, 28)).save(tmp_path / "w.png")
    rows = [
        {"image": ["w.png"] * 2, "question": "<image><image>", "chosen": "a", "rejected": "b"},
        {"image": ["w.png"] * 5, "question": "<image>" * 5, "chosen": "a", "rejected": "b"},
    ]
    ds = PairDataset(
        write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, VISION, DataConfig(max_dynamic_patch=6)
    )
    assert ds[0][0]["num_tiles"] == [3, 3]  # 6 // 2 = 3 per image: 2x1 grid + thumbnail
    assert ds[1][0]["num_tiles"] == [1] * 5  # max(1, 6 // 5) = 1 per image


def test_plain_jsonl_blank_lines_and_no_trailing_newline(tmp_path, tokenizer):
    path = tmp_path / "plain.jsonl"
    rows = lines_for("P", 3)
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]))
    ds = PairDataset(path, tokenizer, VISION, DataConfig())
    assert len(ds) == 3 and ds.source.counts() == {"plain": 3}
    assert [ds[i][0]["line"] for i in range(3)] == [1, 3, 4]


def _hf_sources(tmp_path, rows):
    import datasets

    table = datasets.Dataset.from_list(rows)
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "rows.parquet"))
    # A direct source's media root is its own folder, so the .arrow file sits beside the images.
    arrow = tmp_path / "rows.arrow"
    arrow.write_bytes(next((tmp_path / "saved").glob("*.arrow")).read_bytes())
    return {"saved": tmp_path / "saved", "parquet": tmp_path / "rows.parquet", "arrow": arrow}


def test_hf_datasets_sources_match_jsonl(tmp_path, tokenizer):
    Image.new("RGB", (56, 28), (9, 9, 9)).save(tmp_path / "w.png")
    rows = lines_for("H", 3, "w.png")
    jsonl = PairDataset(write_jsonl(tmp_path / "h.jsonl", rows), tokenizer, VISION, DataConfig())
    for kind, path in _hf_sources(tmp_path, rows).items():
        meta = tmp_path / f"meta_{kind}.json"
        meta.write_text(json.dumps({"H": {"root": ".", "annotation": str(path.relative_to(tmp_path))}}))
        for source in (path, meta):  # directly, and through a meta file
            ds = PairDataset(source, tokenizer, VISION, DataConfig())
            assert len(ds) == 3, (kind, source)
            table = ds.source.files[0].table
            assert table.cache_files, f"{kind}: not memory-mapped from an Arrow file"
            for i in range(3):
                a, b = ds[i][0], jsonl[i][0]
                assert a["line"] == b["line"] == i + 1
                for key in (
                    "chosen_input_ids",
                    "chosen_labels",
                    "rejected_input_ids",
                    "rejected_labels",
                    "pixel_values",
                ):
                    assert torch.equal(a[key], b[key]), (kind, key)


def test_hf_source_missing_column_is_reported(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_list([{"question": "q", "chosen": "a"}]).save_to_disk(str(tmp_path / "s"))
    ds = PairDataset(tmp_path / "s", tokenizer, VISION, DataConfig())
    with pytest.raises(DataError, match=r"s:1: missing field 'rejected'"):
        ds[0]


@pytest.mark.parametrize(
    "meta,message",
    [
        ({"X": {"root": "."}}, "dataset 'X': missing field 'annotation'"),
        ({"X": {"annotation": "nope.jsonl"}}, "field 'annotation': file not found"),
        ({"X": {"annotation": "x.jsonl", "repeat_time": 0}}, "field 'repeat_time' must be a positive number"),
        (
            {"X": {"annotation": "x.jsonl", "max_dynamic_patch": 0}},
            "field 'max_dynamic_patch' must be a positive integer",
        ),
        ([], "a meta file maps dataset names"),
    ],
)
def test_bad_meta_files(tmp_path, meta, message):
    write_jsonl(tmp_path / "x.jsonl", lines_for("X", 1))
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=message):
        read_meta(path)


def test_offsets_index_matches_python_lines(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"question": "é" * int(rng.integers(0, 50)), "chosen": "x", "rejected": "y"} for _ in range(300)]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    from mpo.data.mmpr import line_offsets

    f = JsonlFile(path)
    # Small chunks put line breaks on chunk edges.
    assert np.array_equal(line_offsets(path, chunk_bytes=7), f.offsets)
    assert [f.record(i)[1] for i in range(300)] == rows


def _augment_meta(tmp_path, augment: bool) -> Path:
    Image.linear_gradient("L").convert("RGB").resize((56, 28)).save(tmp_path / "g.png")  # 2 tiles + thumbnail
    rows = [{"image": "g.png", "question": "q", "chosen": "a", "rejected": "b"}] * 2
    write_jsonl(tmp_path / "x.jsonl", rows)
    meta = tmp_path / f"m{augment}.json"
    meta.write_text(
        json.dumps({"X": {"root": str(tmp_path), "annotation": "x.jsonl", "data_augment": augment}})
    )
    return meta


def test_data_augment_is_seeded_by_sample_and_epoch(tmp_path, tokenizer):
    """InternVL's data_augment: every tile goes through a JPEG round trip at a quality in 75..100.
    The draw depends on (data.seed, sample, epoch) only: the same index gives the same pixels (in
    any process, so resume is exact), another epoch other pixels; evaluation is never augmented."""
    from mpo.data.tiling import JPEG_QUALITIES, dynamic_tiles, jpeg_degrade, normalize_tiles

    meta = _augment_meta(tmp_path, True)
    train = PairDataset(meta, tokenizer, VISION, DataConfig(), train=True)
    n = len(train)
    epoch0, again, epoch1 = (
        train[0][0]["pixel_values"],
        train[0][0]["pixel_values"],
        train[n][0]["pixel_values"],
    )
    assert torch.equal(epoch0, again) and not torch.equal(epoch0, epoch1)
    assert not torch.equal(epoch0, train[1][0]["pixel_values"])  # same image, other sample: other draw
    # An independent computation of sample 0, epoch 0: the generator the dataset documents.
    rng = np.random.default_rng([DataConfig().seed, 0, 0])
    tiles = dynamic_tiles(Image.open(tmp_path / "g.png").convert("RGB"), 1, 12, 28, True)
    expected = normalize_tiles([jpeg_degrade(t, int(rng.choice(JPEG_QUALITIES))) for t in tiles], 28)
    assert torch.equal(epoch0, expected)
    clean = PairDataset(meta, tokenizer, VISION, DataConfig(), train=False)[0][0]["pixel_values"]
    assert not torch.equal(epoch0, clean)
    assert (epoch0 - clean).abs().max() < 0.5  # a JPEG round trip at quality >= 75, not other pixels
    # data_augment: false in the meta: training pixels are the clean ones, in every epoch.
    off = PairDataset(_augment_meta(tmp_path, False), tokenizer, VISION, DataConfig(), train=True)
    assert torch.equal(off[0][0]["pixel_values"], clean) and torch.equal(off[n][0]["pixel_values"], clean)


def test_forked_dataloader_workers_read_their_own_lines(tmp_path, tokenizer):
    """The parent opens the file first; forked workers must not share its file offset."""
    path = write_jsonl(tmp_path / "f.jsonl", lines_for("F", 200))
    ds = PairDataset(path, tokenizer, VISION, DataConfig())
    assert ds[0][0]["line"] == 1  # opens the file in the parent before the fork
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=lambda items: items, multiprocessing_context="fork"
    )
    items = [pair for batch in loader for pair, _ in batch]
    assert [it["line"] for it in items] == list(range(1, 201))
    for it in items:
        text = tokenizer.decode(it["chosen_input_ids"].tolist())
        assert f"F good {it['line'] - 1}<|im_end|>" in text


def test_table_images_are_decoded_like_files_no_exif_rotation(tmp_path, tokenizer):
    """An EXIF-rotated JPEG gives the same tiles from JSONL and from a datasets Image column
    (InternVL opens images with PIL and no EXIF transpose; datasets' decoder would rotate)."""
    import datasets

    img = Image.new("RGB", (56, 28), (200, 30, 30))
    img.paste((20, 40, 220), (0, 0, 20, 28))  # not symmetric, so a rotation changes the tiles
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    row = {"image": "rot.jpg", "question": "<image>\nq", "chosen": "a", "rejected": "b"}
    from_file = PairDataset(write_jsonl(tmp_path / "f.jsonl", [row]), tokenizer, VISION, DataConfig())[0][0]
    table_row = {**row, "image": {"bytes": (tmp_path / "rot.jpg").read_bytes(), "path": None}}
    table = datasets.Dataset.from_list([table_row]).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "t"))
    from_table = PairDataset(tmp_path / "t", tokenizer, VISION, DataConfig())[0][0]
    assert from_file["num_tiles"] == from_table["num_tiles"] == [3]  # 56x28: a 2x1 grid + thumbnail
    assert torch.equal(from_file["pixel_values"], from_table["pixel_values"])


def test_folder_of_parquet_shards_and_unreadable_folders(tmp_path, tokenizer):
    import datasets

    rows = lines_for("S", 5)
    shards = tmp_path / "hub"
    shards.mkdir()
    datasets.Dataset.from_list(rows[:3]).to_parquet(str(shards / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(rows[3:]).to_parquet(str(shards / "train-00001-of-00002.parquet"))
    ds = PairDataset(shards, tokenizer, VISION, DataConfig())
    assert len(ds) == 5 and [ds.source.get(i)[2]["question"] for i in range(5)] == [
        r["question"] for r in rows
    ]
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DataError, match="not a readable HF datasets source"):
        PairDataset(empty, tokenizer, VISION, DataConfig())


def test_duplicate_dataset_names_in_meta_are_an_error(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "m.json").write_text(
        '{"same": {"root": ".", "annotation": "a.jsonl"}, "same": {"root": ".", "annotation": "a.jsonl"}}'
    )
    with pytest.raises(DataError, match="dataset name 'same' appears twice"):
        read_meta(tmp_path / "m.json")


def test_whitespace_only_lines_are_blank(tmp_path, tokenizer):
    rows = lines_for("W", 2)
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n   \n\t\r\n" + json.dumps(rows[1]) + "\n")
    ds = PairDataset(path, tokenizer, VISION, DataConfig())
    assert len(ds) == 2 and [ds[i][0]["line"] for i in range(2)] == [1, 4]


def test_empty_media_fields_are_text_only_everywhere(tmp_path, tokenizer):
    """``"image": ""`` / ``"video": ""`` are text-only pairs (as in InternVL) for the encoder, the
    reference-cache key and the length estimate alike."""
    from mpo.refcache import pair_key
    from mpo.sampler import pair_lengths

    rows = [
        {**lines_for("E", 1)[0], "image": ""},
        {**lines_for("F", 1)[0], "video": ""},
        lines_for("G", 1)[0],
    ]
    ds = PairDataset(write_jsonl(tmp_path / "e.jsonl", rows), tokenizer, VISION, DataConfig())
    for i in range(3):
        assert ds[i][0]["pixel_values"] is None and ds[i][0]["num_tiles"] == []
        assert len(pair_key(ds, i)) == 32
    real = [max(len(ds[i][0]["chosen_input_ids"]), len(ds[i][0]["rejected_input_ids"])) for i in range(3)]
    assert np.abs(pair_lengths(ds) - np.array(real)).max() <= 2


def test_meta_paths_relative_to_the_working_directory_as_in_internvl(tmp_path, monkeypatch):
    (tmp_path / "MMPR" / "annotations").mkdir(parents=True)
    (tmp_path / "MMPR" / "annotations" / "a.jsonl").write_text("{}\n")
    (tmp_path / "meta").mkdir()
    meta = tmp_path / "meta" / "meta.json"
    meta.write_text(json.dumps({"a": {"root": "MMPR/images", "annotation": "MMPR/annotations/a.jsonl"}}))
    monkeypatch.chdir(tmp_path)
    (spec,) = read_meta(meta)
    assert spec.annotation.resolve() == (tmp_path / "MMPR" / "annotations" / "a.jsonl").resolve()
    assert spec.root.resolve() == (tmp_path / "MMPR" / "images").resolve()
    monkeypatch.chdir(tmp_path / "meta")
    with pytest.raises(DataError, match="relative to the meta file.*relative to the working directory"):
        read_meta(meta)
