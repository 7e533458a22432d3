"""Video lines through the pair encoder: segment-middle frames, one tile per frame, Frame{i} prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mpo.config import DataConfig
from mpo.data.pairs import PairDataset, SampleError
from mpo.data.template import DEFAULT_SYSTEM_MESSAGE
from mpo.data.tiling import IMAGENET_MEAN, IMAGENET_STD, VisionSpec

VISION = VisionSpec(image_size=28, tokens_per_tile=2)


def write_video(path, num_frames: int = 20, size: int = 32) -> None:
    """Frame k is a flat grey of value 10 * k + 20 (FFV1 is lossless; only YUV rounding remains)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv444p"
        for k in range(num_frames):
            arr = np.full((size, size, 3), 10 * k + 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def grey(img) -> float:
    return float(np.asarray(img, dtype=np.float64).mean())


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    write_video(folder / "clip.mkv")
    return folder


@pytest.mark.parametrize(
    "min_frames,max_frames,expected",
    # 20 frames: all 20 when allowed; 8 segment middles; a clip shorter than video_min_frames
    # gives its own frames once each (no padding with repeats).
    [(8, 32, list(range(20))), (4, 8, [1, 3, 6, 8, 11, 13, 16, 18]), (30, 32, list(range(20)))],
)
def test_video_pairs_sample_segment_middles(video, tokenizer, min_frames, max_frames, expected):
    line = {"video": "clip.mkv", "question": "What changes?", "chosen": "a", "rejected": "b"}
    (video / "m.jsonl").write_text(json.dumps(line) + "\n")
    cfg = DataConfig(video_min_frames=min_frames, video_max_frames=max_frames)
    pair = PairDataset(video / "m.jsonl", tokenizer, VISION, cfg)[0][0]
    assert pair["video"]["frame_numbers"] == expected and pair["num_tiles"] == [1] * len(expected)
    # Which source frame each tile is: greys are 10 apart (a tile is the frame resized, normalised).
    assert pair["video"]["timestamps_s"] == pytest.approx([k / 10 for k in expected], abs=1e-3)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    raw = (pair["pixel_values"] * std + mean).mean(dim=(1, 2, 3)) * 255
    assert [round((float(g) - 20) / 10) for g in raw] == expected


def test_video_pair_prompt_and_tiles(video, tokenizer):
    line = {
        "video": "clip.mkv",
        "question": "Before <video>\nWhat changes?",
        "chosen": "It brightens.",
        "rejected": "Nothing.",
    }
    (video / "v.jsonl").write_text(json.dumps(line) + "\n")
    pair = PairDataset(
        video / "v.jsonl", tokenizer, VISION, DataConfig(video_min_frames=2, video_max_frames=4)
    )[0][0]
    assert pair["num_tiles"] == [1, 1, 1, 1] and pair["pixel_values"].shape == (4, 3, 28, 28)
    span = "<img><IMG_CONTEXT><IMG_CONTEXT></img>"
    frames = "".join(f"Frame{i}: {span}\n" for i in range(1, 5))
    expected = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\nBefore {frames}What changes?<|im_end|>\n"
        "<|im_start|>assistant\nIt brightens.<|im_end|>\n"
    )
    assert tokenizer.decode(pair["chosen_input_ids"].tolist()) == expected
    # Frames 2, 7, 12, 17 of 20 (middles of 4 segments), each one normalised tile.
    means = pair["pixel_values"].mean(dim=(1, 2, 3))
    assert means[0] < means[1] < means[2] < means[3]


def test_video_without_placeholder_is_prefixed_and_image_placeholders_refused(video, tokenizer):
    rows = [
        {"video": "clip.mkv", "question": "What changes?", "chosen": "a", "rejected": "b"},
        {"video": "clip.mkv", "question": "<image> What changes?", "chosen": "a", "rejected": "b"},
    ]
    (video / "w.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = PairDataset(video / "w.jsonl", tokenizer, VISION, DataConfig(video_min_frames=2, video_max_frames=2))
    text = tokenizer.decode(ds[0][0]["chosen_input_ids"].tolist())
    assert (
        "user\nFrame1: <img>" in text and "</img>\nFrame2: <img>" in text and "</img>\nWhat changes?" in text
    )
    with pytest.raises(SampleError, match=r"w.jsonl:2: field 'question': a video question must not contain"):
        ds[1]


def test_missing_pyav_stops_with_an_install_hint_even_when_skipping(video, tokenizer, monkeypatch):
    import sys

    from mpo.data.mmpr import DataError

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    line = {"video": "clip.mkv", "question": "What happens?", "chosen": "a", "rejected": "b"}
    path = video / "nopyav.jsonl"
    path.write_text(json.dumps(line) + "\n")
    ds = PairDataset(path, tokenizer, VISION, DataConfig(on_bad_sample="skip", max_bad_fraction=1.0))
    with pytest.raises(
        DataError, match=r"nopyav.jsonl:1: field 'video': reading videos needs PyAV.*pip install av"
    ):
        ds[0]  # raised, not returned as a counted skip: every video line would fail the same way
