"""Skip and truncation counts reach the run's report from DataLoader workers, ranks and resumes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_train import StopAfter  # tests/ is on sys.path under pytest

from mpo.config import DataConfig
from mpo.data.collate import PairCollator
from mpo.data.events import EXAMPLES_KEPT, DataEvents, gather_events
from mpo.data.pairs import PairDataset
from mpo.data.tiling import VisionSpec

VISION = VisionSpec(image_size=28, tokens_per_tile=2)
GOOD = {"question": "q", "chosen": "yes", "rejected": "no"}
LONG = {"question": "q", "chosen": " ".join(["word"] * 40), "rejected": "no"}


def _jsonl(tmp_path: Path) -> tuple[Path, Counter, int]:
    """12 lines: 7 good, 2 with a long chosen answer, 2 invalid JSON, 1 missing 'rejected'."""
    lines = [json.dumps(GOOD)] * 3 + ["{oops", json.dumps(LONG), json.dumps(GOOD), "[1]"]
    lines += [json.dumps({"question": "q", "chosen": "a"}), json.dumps(LONG)] + [json.dumps(GOOD)] * 3
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, Counter({"invalid_json": 2, "missing_rejected": 1}), 2


def test_events_add_and_cap_examples():
    a = DataEvents(seen=2, bad=1, skipped=Counter(x=1), truncated=Counter(chosen=1), examples={"x": ["m0"]})
    b = DataEvents(seen=3, skipped=Counter(x=2, y=1), examples={"x": [f"m{i}" for i in range(1, 40)]})
    a.add(b).add(None).add(b.to_dict())
    assert (a.seen, a.bad) == (8, 1)
    assert a.skipped == Counter(x=5, y=2) and a.truncated == Counter(chosen=1)
    assert a.examples["x"][:2] == ["m0", "m1"] and len(a.examples["x"]) == EXAMPLES_KEPT
    assert DataEvents.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_carry_every_skip_and_truncation(tmp_path, tokenizer, workers):
    """Worker processes read the data; their counts come back with the batches, all of them."""
    path, skips, long_lines = _jsonl(tmp_path)
    short = tmp_path / "one.jsonl"
    short.write_text(json.dumps(GOOD) + "\n")
    fits = len(PairDataset(short, tokenizer, VISION, DataConfig())[0][0]["chosen_input_ids"]) + 5
    cfg = DataConfig(on_bad_sample="skip", max_bad_fraction=1.0, max_length=fits)  # LONG is cut
    ds = PairDataset(path, tokenizer, VISION, cfg)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=5, num_workers=workers, collate_fn=PairCollator(tokenizer.pad_token_id)
    )
    total, pairs = DataEvents(), 0
    for _epoch in range(2):
        for batch, events in loader:
            total.add(events)
            pairs += batch["num_pairs"]
    assert total.seen == 2 * 12 and pairs == 2 * (12 - sum(skips.values()))
    assert total.skipped == Counter({k: 2 * v for k, v in skips.items()}) and total.bad == 2 * 3
    assert total.truncated == Counter(chosen=2 * long_lines)
    assert set(total.examples) == set(skips) and "d.jsonl:4" in total.examples["invalid_json"][0]


def _meta_with_bad_lines(demo_data, tmp_path) -> Path:
    """16 demo pairs (images resolved from the demo folder) of which 2 are bad."""
    demo_meta = Path(demo_data["train"])
    spec = next(iter(json.loads(demo_meta.read_text()).values()))
    root = (demo_meta.parent / spec["root"]).resolve()
    lines = (root / spec["annotation"]).read_text().splitlines()[:14]
    bad_image = {**json.loads(lines[0]), "image": "images/no_such.png"}
    lines[3:3] = ["{truncated json"]
    lines[9:9] = [json.dumps(bad_image)]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"mixed": {"root": str(root), "annotation": str(tmp_path / "mixed.jsonl"), "repeat_time": 1}}
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    return path


@pytest.mark.slow
def test_run_report_counts_workers_and_survives_resume(tiny_config, demo_data, tmp_path):
    """2 epochs over 16 pairs (2 bad) read by 2 workers: the report says 32 seen, 4 skipped, also
    when the run is interrupted and resumed from its checkpoint in the middle."""
    from mpo.run import build_trainer, run_training

    meta = _meta_with_bad_lines(demo_data, tmp_path)
    common = [
        f"data.meta_path={meta}",
        "data.eval_meta_path=null",
        "data.on_bad_sample=skip",
        "data.max_bad_fraction=0.5",
        "training.dataloader_num_workers=2",
        "training.per_device_train_batch_size=4",
        "training.max_steps=8",
        "training.save_steps=3",
    ]
    whole = run_training(tiny_config(*common, f"training.output_dir={tmp_path / 'whole'}"))
    report = json.loads((tmp_path / "whole" / "data_skips.json").read_text())
    assert report["seen"] == 32 and report["bad"] == 4
    assert report["skipped"] == {"invalid_json": 2, "missing_image": 2}
    assert whole["skipped_train_samples"] == report["skipped"]
    assert "mixed.jsonl:4" in report["examples"]["invalid_json"][0]

    part = tiny_config(*common, f"training.output_dir={tmp_path / 'part'}")
    trainer, _ = build_trainer(part)
    trainer.add_callback(StopAfter(5))  # dies after step 5; checkpoint-3 is the newest
    trainer.train()
    state = json.loads((tmp_path / "part" / "checkpoint-3" / "mpo_state.json").read_text())
    assert state["data_events"]["seen"] == 12  # 3 batches of 4
    run_training(
        tiny_config(
            *common, f"training.output_dir={tmp_path / 'part'}", "training.resume_from_checkpoint=latest"
        )
    )
    resumed = json.loads((tmp_path / "part" / "data_skips.json").read_text())
    for key in ("seen", "bad", "skipped", "truncated_responses"):
        assert resumed[key] == report[key], key


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mine = DataEvents(
        seen=10 + rank,
        bad=rank,
        skipped=Counter({f"r{rank}": 1, "both": 2}),
        examples={"both": [f"from {rank}"]},
    )
    total = gather_events(mine)
    Path(out, f"{rank}.json").write_text(json.dumps(total.to_dict()))
    dist.destroy_process_group()


def test_gather_sums_over_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["seen"] == 21 and got["bad"] == 1
        assert got["skipped"] == {"r0": 1, "both": 4, "r1": 1}
        assert got["examples"] == {"both": ["from 0", "from 1"]}
