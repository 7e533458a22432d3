"""Video pairs in training: a CPU MPO run on video pairs next to image pairs, exact resume with random
frame sampling on, and the reference cache's refusal of random frames."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_train import StopAfter, _train_logs
from videos import write_clip

from mpo.run import build_trainer, run_training


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Six pairs: three video (90, 32 and 5 frames), three image; a meta file over them."""
    root = tmp_path_factory.mktemp("mixed")
    write_clip(root / "a", 90, 30, "h264")
    write_clip(root / "b", 32, 60, "mpeg4")
    write_clip(root / "c", 5, 1, "h264")
    rows = []
    for k, (name, colour) in enumerate((("a.mp4", "red"), ("b.avi", "green"), ("c.mp4", "blue"))):
        rows.append(
            {
                "video": name,
                "question": "<video>\nWhat changes?",
                "chosen": f"It turns {colour}.",
                "rejected": "Nothing.",
            }
        )
        Image.new("RGB", (64 + 32 * k, 64), colour).save(root / f"{k}.png")
        rows.append(
            {
                "image": f"{k}.png",
                "question": "What color is the shape?",
                "chosen": f"The shape is {colour}.",
                "rejected": "The shape is white.",
            }
        )
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = root / "meta.json"
    meta.write_text(json.dumps({"mixed": {"root": str(root), "annotation": "train.jsonl"}}))
    return meta


def video_config(tiny_config, meta, out, *extra):
    return tiny_config(
        f"data.meta_path={meta}",
        "data.eval_meta_path=null",
        "data.video_min_frames=2",
        "data.video_max_frames=6",
        f"training.output_dir={out}",
        "training.max_steps=6",  # 3 steps an epoch: the resumed steps are in epoch 1, with new draws
        "training.save_steps=2",
        *extra,
    )


@pytest.mark.slow
def test_video_and_image_pairs_train_and_resume_exactly_with_random_frames(tiny_config, mixed_data, tmp_path):
    full_cfg = video_config(tiny_config, mixed_data, tmp_path / "full")
    assert full_cfg.data.video_sampling == "rand"
    run_training(full_cfg)
    report = json.loads((tmp_path / "full" / "data_skips.json").read_text())
    assert report["seen"] == 12 and report["skipped"] == {}  # 2 epochs of 6 pairs, none skipped

    part_cfg = video_config(tiny_config, mixed_data, tmp_path / "part")
    trainer, _ = build_trainer(part_cfg)
    # The data the trainer reads draws frames at random: a video pair's frames differ between epochs.
    views = [trainer.train_dataset[e * 6][0]["video"] for e in range(4)]
    assert all(v["sampling"] == "rand" for v in views)
    assert len({tuple(v["frame_numbers"]) for v in views}) > 1
    trainer.add_callback(StopAfter(4))
    trainer.train()
    assert trainer.state.global_step == 4
    resumed, resume = build_trainer(
        video_config(tiny_config, mixed_data, tmp_path / "part", "training.resume_from_checkpoint=latest")
    )
    assert resume.endswith("checkpoint-4")
    resumed.train(resume_from_checkpoint=resume)

    full, part = _train_logs(tmp_path / "full"), _train_logs(tmp_path / "part")
    for step in (5, 6):
        # Same frames, same pixels, same weights: the same float32 computation, so equal up to the
        # reduction-order noise the image-only resume test allows (rel 1e-5 of losses near 1).
        assert part[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5, abs=1e-6)
        assert part[step]["bco/delta"] == pytest.approx(full[step]["bco/delta"], rel=1e-6, abs=1e-9)
    assert len({round(full[s]["loss"], 6) for s in range(1, 7)}) > 1


def test_reference_cache_refuses_random_frames_and_serves_middle_ones(tiny_model_dir, mixed_data, tmp_path):
    from mpo.config import load_config
    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.loading import load_tokenizer
    from mpo.refcache import MANIFEST_NAME, RefCacheError, open_ref_cache, precompute_ref

    common = [
        f"model.path={tiny_model_dir}",
        f"data.meta_path={mixed_data}",
        "data.video_min_frames=2",
        "data.video_max_frames=4",
    ]
    cfg = load_config(None, [*common, f"model.ref_cache={tmp_path / 'cache'}"])
    folder = precompute_ref(cfg)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["video_pairs"] == [3] and manifest["num_pairs"] == 6

    tok = load_tokenizer(str(tiny_model_dir))
    vision = VisionSpec.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    rand = PairDataset(mixed_data, tok, vision, cfg.data, train=True)
    with pytest.raises(
        RefCacheError, match=r"video_sampling=rand: .*3 video pair\(s\).*video_sampling=middle"
    ):
        open_ref_cache(folder, rand, str(tiny_model_dir), "float32")

    middle_cfg = load_config(None, [*common, "data.video_sampling=middle"])
    middle = PairDataset(mixed_data, tok, vision, middle_cfg.data, train=True)
    cached = open_ref_cache(folder, middle, str(tiny_model_dir), "float32")
    pair, _ = cached[6]  # sample 0 (a video) in epoch 1: the same frames as precompute read
    assert pair["video"]["sampling"] == "middle" and isinstance(pair["ref_chosen_logps"], float)

    # A dataset that slipped past the start check (no count for it) is refused when a video is read.
    from mpo.refcache import RefCachedDataset

    with pytest.raises(RefCacheError, match="video_sampling=rand"):
        RefCachedDataset(rand, cached.cache)[0]
