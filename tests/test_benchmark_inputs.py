"""scripts/benchmark.py and scripts/gpu_check.py: TRL gets the same tokens and pixels our trainer sees,
both are measured by the same counts, and the scripts' configurations are valid (no timing here)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """A module of scripts/ (not a package), imported by path with scripts/ on sys.path."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(f"mpo_{name}", ROOT / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return mod


def test_trl_batch_matches_our_pair(tokenizer, demo_data, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.tiny import build_config

    bench = _script("benchlib")
    vision = VisionSpec.from_config(build_config(tokenizer))
    meta = demo_data["train"]
    ours = PairDataset(meta, tokenizer, vision, DataConfig(max_dynamic_patch=4))
    root = meta.parent
    # Line 5 of the demo data is a wide image: 2x1 tiles + thumbnail.
    (tmp_path / "pairs.jsonl").write_text((root / "train.jsonl").read_text().splitlines()[4] + "\n")
    shutil.copytree(root / "images", tmp_path / "images")  # a symlink out of the root is refused
    trl_rows = bench.trl_dataset(tmp_path / "meta.json", None)
    proc = bench.processor_class()(tokenizer, vision.image_size, vision.tokens_per_tile, 4)
    batch = DataCollatorForVisionPreference(processor=proc)([trl_rows[0]])
    item, _ = ours[4]
    assert json.loads((root / "train.jsonl").read_text().splitlines()[4])["chosen"] in tokenizer.decode(
        batch["input_ids"][0]
    )
    # TRL trains the answer + <|im_end|>; ours also has the template's final "\n" (masked) after it.
    for row, key in ((0, "chosen"), (1, "rejected")):
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == item[f"{key}_input_ids"][:-1].tolist()
        trained = batch["completion_mask"][row, :n].bool()
        assert (
            batch["input_ids"][row, :n][trained].tolist()
            == item[f"{key}_labels"][item[f"{key}_labels"] != -100].tolist()
        )
    # TRL repeats the image for the rejected row: the peers' second vision pass.
    assert item["num_tiles"] == [3]
    torch.testing.assert_close(batch["pixel_values"], torch.cat([item["pixel_values"], item["pixel_values"]]))


def test_batch_stats_count_the_same_pair_alike_in_every_layout(tokenizer, demo_data, tmp_path):
    """One pair as ours (padded and packed) and TRL's collators batch it: same pair, tiles and
    trained tokens; the packed row computes each token once, the padded rows the prompt twice."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from mpo.config import DataConfig
    from mpo.data.collate import PackedPairCollator, PairCollator
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.tiny import build_config

    lib = _script("benchlib")
    vision = VisionSpec.from_config(build_config(tokenizer))
    root = demo_data["train"].parent
    (tmp_path / "pairs.jsonl").write_text((root / "train.jsonl").read_text().splitlines()[4] + "\n")
    (tmp_path / "images").symlink_to(root / "images")
    item = PairDataset(demo_data["train"], tokenizer, vision, DataConfig(max_dynamic_patch=4))[4]
    pad = tokenizer.pad_token_id
    plain = lib.batch_stats(PairCollator(pad)([item])[0], pad)
    packed = lib.batch_stats(PackedPairCollator(pad)([item])[0], pad)
    proc = lib.processor_class()(tokenizer, vision.image_size, vision.tokens_per_tile, 4)
    trl = lib.batch_stats(
        DataCollatorForVisionPreference(processor=proc)([lib.trl_dataset(tmp_path / "meta.json")[0]]), pad
    )
    pair, _ = item
    lc, lr = len(pair["chosen_input_ids"]), len(pair["rejected_input_ids"])
    assert plain["seqs"] == packed["seqs"] == [(lc, lr)]
    assert trl["seqs"] == [(lc - 1, lr - 1)]  # TRL's rows lack the template's final "\n" (untrained)
    assert plain["pairs"] == packed["pairs"] == trl["pairs"] == 1
    assert plain["tiles"] == packed["tiles"] == trl["tiles"] == 3
    assert plain["trained"] == packed["trained"] == trl["trained"]
    assert packed["real"] == packed["computed"] < plain["real"] == lc + lr  # the prompt once, no padding


def test_gpu_check_configs_are_valid_and_peaks_by_device_name(tmp_path):
    gpu = _script("gpu_check")
    for row, extra in gpu.ROWS.items():
        if row != "trl":
            cfg = gpu.ours_config(tmp_path, tmp_path / "out", extra)  # validated on load
            assert cfg.data.max_tokens_per_batch >= cfg.data.max_length
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0 and gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and gpu.peak_tflops("NVIDIA L40S") == 362.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.0 and gpu.peak_tflops("Tesla T4") is None


def test_pair_flops_by_hand(tokenizer):
    """One tile of the tiny model's shapes, worked by hand: ViT 2 layers, hidden 64, MLP 128, 17
    tokens (16 patches + CLS); LLM 2 layers, hidden 96, 2 KV heads of 24, MLP 192."""
    from mpo.model.tiny import build_config

    lib = _script("benchlib")
    cfg = build_config(tokenizer)
    n, h = 17, 64
    vit = 2 * (2 * n * (4 * h * h + 2 * h * 128) + 4 * n * n * h) + 2 * 16 * 3 * 16 * 16 * h
    per_token = 2 * (2 * 96 * 96 + 2 * 96 * 48 + 3 * 96 * 192)
    llm = 2 * (per_token * 10 + 4 * 10 * 10 * 96) + 2 * (per_token * 12 + 4 * 12 * 12 * 96)
    got = lib.pair_flops(cfg, 1, (10, 12), 5)
    assert got == {"vision": vit, "llm": llm, "head": 2 * 96 * cfg.text_config.vocab_size * 5}
