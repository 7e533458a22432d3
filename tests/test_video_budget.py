"""The frame budget (as many frames as leave the answers whole inside data.max_length), random
frame sampling seeded per sample and epoch, and what `mpo data check` / `inspect` report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from videos import write_clip

from mpo.cli import main
from mpo.config import DataConfig
from mpo.data.pairs import PairDataset
from mpo.data.tiling import VisionSpec

SMALL = VisionSpec(image_size=28, tokens_per_tile=2)
INTERNVL_448 = VisionSpec(image_size=448, tokens_per_tile=256)  # InternVL2.5's 448 px tiles
QUESTION = "<video>\nWhat happens?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The issue's clip (3 s, 90 frames, 30 fps), a 5-frame clip and a 900-frame one."""
    out = tmp_path_factory.mktemp("budget")
    write_clip(out / "v", 90, 30, "h264")
    write_clip(out / "short", 5, 1, "mpeg4")
    write_clip(out / "long", 900, 60, "h264", gop=60)
    return out


def write_lines(folder, name: str, lines: list[dict]):
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def line(video="v.mp4", question=QUESTION, chosen="It gets brighter.", rejected="Nothing.", **extra):
    return {"video": video, "question": question, "chosen": chosen, "rejected": rejected, **extra}


def real_prompt_length(pairs: PairDataset, question: str, n: int) -> int:
    """Brute force: the full prompt with n frames of real context tokens, tokenized."""
    enc = pairs.encoder
    spans = enc._expand(enc._video_question(question, n, ""), [enc.vision.tokens_per_tile] * n, "")
    return len(enc.template.encode_prompt(spans))


@pytest.mark.parametrize("question", [QUESTION, "What happens?", "Before <video> after", "<video>"])
def test_prompt_length_of_empty_spans_equals_the_real_prompt(folder, tokenizer, question):
    pairs = PairDataset(write_lines(folder, "q", [line()]), tokenizer, INTERNVL_448, DataConfig())
    for n in (1, 2, 9, 10, 11, 32):
        assert pairs.encoder.video_prompt_length(question, n) == real_prompt_length(pairs, question, n)


def test_issue_clip_gets_the_most_frames_that_fit_8192(folder, tokenizer):
    """The 90-frame, 3 s clip at 448 px and max_length 8192: no longer skipped, and the frame count
    is the largest whose real prompt plus the longer answer fits (brute force over 8..32)."""
    path = write_lines(folder, "issue", [line()])
    pairs = PairDataset(path, tokenizer, INTERNVL_448, DataConfig(max_length=8192))
    pair, events = pairs[0]
    assert pair is not None and not events.skipped and not events.truncated
    answers = [pairs.encoder.template.encode_answer(t)[0] for t in ("It gets brighter.", "Nothing.")]
    longest = max(len(a) for a in answers)
    brute = max(n for n in range(8, 33) if real_prompt_length(pairs, QUESTION, n) + longest <= 8192)
    assert pair["video"]["frames"] == brute == pair["video"]["fit"] and 8 < brute < 32
    assert max(pair["full_lengths"].values()) <= 8192
    assert real_prompt_length(pairs, QUESTION, brute + 1) + longest > 8192  # one more would not fit
    assert len(pair["chosen_input_ids"]) == pair["full_lengths"]["chosen"]  # nothing truncated
    assert pair["pixel_values"].shape == (brute, 3, 448, 448)
    # Evenly spread over the clip: segment middles, 90/brute frames apart.
    assert pair["video"]["frame_numbers"] == [int((k + 0.5) * 90 / brute) for k in range(brute)]


def test_earlier_turns_and_system_prompt_take_their_room_from_the_frames(folder, tokenizer):
    """A multi-turn record (read from another format) with the video in its first user turn and its
    own system prompt: the frame count is the largest whose whole prompt, every turn and the system
    prompt tokenized for real, leaves the longer answer whole (brute force), and it is smaller than
    the single-turn record's."""
    history = [[QUESTION, "The light changes. " * 40]]
    system = "You watch videos carefully. " * 20
    path = write_lines(folder, "turns", [line(question="And then?", history=history, system=system), line()])
    pairs = PairDataset(path, tokenizer, INTERNVL_448, DataConfig(max_length=8192))
    (pair, events), (single, _) = pairs[0], pairs[1]
    assert pair is not None and not events.skipped and not events.truncated
    enc = pairs.encoder
    longest = max(len(enc.template.encode_answer(t)[0]) for t in ("It gets brighter.", "Nothing."))

    def whole_prompt(n: int) -> int:
        first = enc._expand(enc._video_question(QUESTION, n, ""), [enc.vision.tokens_per_tile] * n, "")
        return len(enc.template.encode_prompt("And then?", [(first, history[0][1])], system))

    brute = max(n for n in range(1, 33) if whole_prompt(n) + longest <= 8192)
    assert pair["video"]["frames"] == brute < single["video"]["frames"]
    assert len(pair["chosen_input_ids"]) == pair["full_lengths"]["chosen"] <= 8192


def test_bounds_clip_length_and_video_max_frames(folder, tokenizer):
    path = write_lines(folder, "bounds", [line("short.avi"), line("long.mp4")])
    pairs = PairDataset(path, tokenizer, SMALL, DataConfig(video_min_frames=8, video_max_frames=32))
    short, long = pairs[0][0], pairs[1][0]
    # 5 frames < video_min_frames: each frame once, no padding with repeats.
    assert short["video"]["frame_numbers"] == [0, 1, 2, 3, 4] and short["num_tiles"] == [1] * 5
    assert long["video"]["frames"] == 32  # 2 tokens a frame: video_max_frames is the bound


def test_prompt_too_long_only_when_the_fewest_frames_leave_no_answer_token(folder, tokenizer):
    """max_length between "8 frames + 1 answer token" and "8 frames + whole answer": 8 frames and
    a truncated answer; below it: the only prompt_too_long skip. truncation=skip skips both."""
    path = write_lines(folder, "tight", [line(chosen="It gets brighter and brighter until the end.")])
    probe = PairDataset(path, tokenizer, INTERNVL_448, DataConfig())
    prompt8 = probe.encoder.video_prompt_length(QUESTION, 8)
    prefix = len(probe.encoder.template.prefix_ids)
    base = dict(video_min_frames=8, on_bad_sample="skip")

    fits_min = PairDataset(path, tokenizer, INTERNVL_448, DataConfig(max_length=prompt8 + prefix + 1, **base))
    pair, events = fits_min[0]
    assert pair["video"]["frames"] == 8 and events.truncated == {"chosen": 1, "rejected": 1}
    assert len(pair["chosen_input_ids"]) == prompt8 + prefix + 1

    too_long = PairDataset(path, tokenizer, INTERNVL_448, DataConfig(max_length=prompt8 + prefix, **base))
    pair, events = too_long[0]
    assert pair is None and events.skipped == {"prompt_too_long": 1} and events.bad == 0

    skip = DataConfig(max_length=prompt8 + prefix + 1, truncation="skip", **base)
    pair, events = PairDataset(path, tokenizer, INTERNVL_448, skip)[0]
    assert pair is None and events.skipped == {"too_long": 1}


def test_frames_give_way_to_a_long_answer(folder, tokenizer):
    """A 9 frame budget for a short answer shrinks for a long one, which stays whole."""
    short = line()
    long = line(chosen=" ".join(["It gets brighter."] * 60))
    path = write_lines(folder, "answers", [short, long])
    probe = PairDataset(path, tokenizer, INTERNVL_448, DataConfig())
    max_length = probe.encoder.video_prompt_length(QUESTION, 9) + 40
    pairs = PairDataset(path, tokenizer, INTERNVL_448, DataConfig(max_length=max_length, video_min_frames=2))
    (a, ev_a), (b, ev_b) = pairs[0], pairs[1]
    assert a["video"]["frames"] == 9 and b["video"]["frames"] < 9
    assert not ev_a.truncated and not ev_b.truncated
    assert max(b["full_lengths"].values()) <= max_length


def test_random_frames_are_seeded_by_sample_and_epoch(folder, tokenizer):
    path = write_lines(folder, "rand", [line(), line("long.mp4")])
    cfg = DataConfig(video_min_frames=4, video_max_frames=16)
    train = PairDataset(path, tokenizer, SMALL, cfg, train=True)
    fit = PairDataset(path, tokenizer, SMALL, cfg)[0][0]["video"]["fit"]
    assert fit == 16
    n = len(train)
    views = [train[i + e * n][0] for e in range(12) for i in range(n)]
    again = train[0][0]  # sample 0, epoch 0 read a second time: the same draw
    assert again["video"]["frame_numbers"] == views[0]["video"]["frame_numbers"]
    assert torch.equal(again["pixel_values"], views[0]["pixel_values"])
    assert torch.equal(again["chosen_input_ids"], views[0]["chosen_input_ids"])
    clip0 = [v["video"] for v in views[0::2]]  # sample 0 in epochs 0..11
    assert len({tuple(v["frame_numbers"]) for v in clip0}) == 12  # a new draw every epoch
    assert all(v["sampling"] == "rand" and 4 <= v["frames"] <= fit for v in clip0)
    assert len({v["frames"] for v in clip0}) > 3  # the count is drawn too
    # Another sample in the same epoch draws independently (its own clip, its own frames).
    assert views[1]["video"]["frame_numbers"] != views[0]["video"]["frame_numbers"]
    # video_sampling=middle: training sees evaluation's frames.
    middle = PairDataset(
        path, tokenizer, SMALL, DataConfig(video_max_frames=16, video_sampling="middle"), train=True
    )
    assert middle[n][0]["video"]["frames"] == fit and middle[n][0]["video"]["sampling"] == "middle"


def test_sampler_estimates_video_lengths(folder, tokenizer):
    from mpo.sampler import pair_lengths

    lines = [line(), line("short.avi"), line("long.mp4", chosen=" ".join(["It gets brighter."] * 40))]
    path = write_lines(folder, "est", lines)
    pairs = PairDataset(path, tokenizer, INTERNVL_448, DataConfig(max_length=8192))
    est = pair_lengths(pairs)
    per_frame = INTERNVL_448.tokens_per_tile + 8  # a frame's image tokens and its "FrameN: <img></img>\n"
    for i in range(len(lines)):
        pair = pairs[i][0]
        real = max(pair["full_lengths"].values())
        # The length index (mpo.data.lengths) prices each video at the frames its header announces
        # (at most video_max_frames), capped at max_length: an upper bound, exact for short clips,
        # within one frame of the real length when the budget drops frames to fit max_length.
        assert real <= int(est[i]) <= real + per_frame, (i, est.tolist(), real)


def write_cli_config(folder, model_dir, rows, **data):
    path = write_lines(folder, "cli", rows)
    cfg = {"model": {"path": str(model_dir)}, "data": {"meta_path": str(path), **data}}
    out = folder / "cli.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture(scope="module")
def model_448(tmp_path_factory):
    """A tiny InternVL whose vision side is InternVL2.5's: 448 px tiles, 14 px patches, 256 tokens."""
    from mpo.model.tiny import save_tiny_internvl

    return save_tiny_internvl(
        tmp_path_factory.mktemp("tiny448"), vision={"image_size": 448, "patch_size": 14}
    )


def test_inspect_shows_the_frame_count_chosen(folder, model_448, capsys):
    cfg = write_cli_config(folder, model_448, [line()], max_length=8192)
    assert main(["data", "inspect", "--config", str(cfg), "--index", "0", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    video = shown["video"]
    assert video["frames"] == video["fit"] and 8 < video["frames"] < 32 and video["frames_in_clip"] == 90
    assert shown["num_image_tokens"] == 256 * video["frames"]
    assert shown["chosen"]["num_tokens"] <= 8192 and shown["chosen"]["text"].count("Frame") == video["frames"]
    assert main(["data", "inspect", "--config", str(cfg), "--index", "0", "--epoch", "3", "--json"]) == 0
    drawn = json.loads(capsys.readouterr().out)["video"]
    assert drawn["sampling"] == "rand" and 8 <= drawn["frames"] <= video["fit"]


def test_check_reports_frames_per_video_and_what_capped_them(folder, model_448, capsys):
    rows = [line(), line("short.avi"), line("long.mp4"), line("missing.mp4")]
    cfg = write_cli_config(
        folder, model_448, rows, max_length=8192, on_bad_sample="skip", max_bad_fraction=0.5
    )
    assert main(["data", "check", "--config", str(cfg), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    frames = res["video_frames"]
    fit = frames["max"]
    assert 8 < fit < 32 and frames["min"] == 5 and frames["videos"] == 3
    assert frames["p50"] == fit  # v.mp4 and long.mp4 both get the most that fit 8192
    assert frames["capped_by"] == {"max_length": 2, "clip_length": 1}
    assert res["skipped"] == {"missing_video": 1}
    assert res["datasets"]["cli"]["videos"] == 3 and res["datasets"]["cli"]["tiles"] == 2 * fit + 5
    assert main(["data", "check", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert (
        "frames per video (the most that fit data.max_length" in text
        and f"min 5, p50 {fit}, max {fit}" in text
    )


def test_clip_field_and_bytes_source_through_the_encoder(folder, tokenizer):
    rows = [line(clip=[1.0, 2.0]), line(clip={"start": 2.5}), line(clip=[5, 6])]
    pairs = PairDataset(
        write_lines(folder, "clip", rows),
        tokenizer,
        SMALL,
        DataConfig(on_bad_sample="skip", max_bad_fraction=1.0),
    )
    assert pairs[0][0]["video"]["frame_numbers"] == list(range(30, 60))  # 30 frames in [1 s, 2 s)
    assert pairs[1][0]["video"]["frame_numbers"] == list(range(75, 90))
    pair, events = pairs[2]
    assert (
        pair is None and events.skipped == {"bad_clip": 1} and "holds no frame" in events.first_examples()[0]
    )
    # A HF datasets row holding the video's bytes reads the same frames as the file.
    record = line(video={"bytes": (folder / "v.mp4").read_bytes(), "path": None}, clip=[1.0, 2.0])
    spec = pairs.source.specs[0]
    from_bytes, _ = pairs.encode_record(lambda: (spec, 1, record))
    assert from_bytes["video"]["frame_numbers"] == list(range(30, 60))
    assert torch.equal(from_bytes["pixel_values"], pairs[0][0]["pixel_values"])


def test_data_augment_applies_to_video_frames(folder, tokenizer):
    meta = folder / "aug.json"
    write_lines(folder, "aug", [line()])
    meta.write_text(
        json.dumps({"aug": {"root": str(folder), "annotation": "aug.jsonl", "data_augment": True}})
    )
    cfg = DataConfig(video_sampling="middle", video_max_frames=4)
    plain = PairDataset(meta, tokenizer, SMALL, cfg)[0][0]["pixel_values"]
    augmented = PairDataset(meta, tokenizer, SMALL, cfg, train=True)[0][0]["pixel_values"]
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    # A JPEG round trip at quality >= 75 moves normalised pixels a little, not a lot (std units).
    assert float((augmented - plain).abs().mean()) < 0.2
    np.testing.assert_array_equal(
        plain.numpy(), PairDataset(meta, tokenizer, SMALL, cfg)[0][0]["pixel_values"].numpy()
    )
