"""scripts/benchmark.py feeds TRL the same tokens and pixels our trainer sees (no timing here)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("mpo_benchmark", ROOT / "scripts" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trl_batch_matches_our_pair(tokenizer, demo_data, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from mpo.config import DataConfig
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.tiny import build_config

    bench = _benchmark_module()
    vision = VisionSpec.from_config(build_config(tokenizer))
    meta = demo_data["train"]
    ours = PairDataset(meta, tokenizer, vision, DataConfig(max_dynamic_patch=4))
    root = meta.parent
    # Line 5 of the demo data is a wide image: 2x1 tiles + thumbnail.
    (tmp_path / "pairs.jsonl").write_text((root / "train.jsonl").read_text().splitlines()[4] + "\n")
    shutil.copytree(root / "images", tmp_path / "images")  # a symlink out of the root is refused
    trl_rows = bench.trl_dataset(tmp_path / "meta.json", None)
    proc = bench._processor_class()(tokenizer, vision.image_size, vision.tokens_per_tile, 4)
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
