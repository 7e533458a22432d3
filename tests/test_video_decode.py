"""Video reading on clips the tests encode: frame index by timestamp, segment sampling, seeking
decode, clip fields, variable frame rate, broken files. Frames are identified by the number each
one carries (tests/videos.py), so every check is on which source frame came back."""

from __future__ import annotations

import struct

import av
import numpy as np
import pytest
from videos import CODECS, frame_number, write_clip

from mpo.data import video as vid

WHERE = "d.jsonl:3"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """{(frames, fps, codec): path}: 5, 32 and 900 frames; 1 and 60 fps; H.264 and MPEG-4."""
    folder = tmp_path_factory.mktemp("clips")
    out = {}
    for codec in ("h264", "mpeg4"):
        for frames, fps in ((5, 1), (32, 60), (900, 60), (90, 30)):
            out[frames, fps, codec] = write_clip(
                folder / f"{codec}_{frames}_{fps}", frames, fps, codec, gop=25
            )
    return out


def test_two_codecs_are_available_to_encode():
    """The suite's clips need these PyAV encoders; a missing one should fail here, not obscurely."""
    for name, _, _ in CODECS.values():
        assert av.codec.Codec(name, "w").name == name


@pytest.mark.parametrize("codec", ["h264", "mpeg4"])
@pytest.mark.parametrize("frames,fps", [(5, 1), (32, 60), (900, 60)])
def test_index_counts_every_frame_and_times_it(clips, codec, frames, fps):
    index = vid.index_video(clips[frames, fps, codec], WHERE)
    assert len(index) == frames
    # Display times from the first frame: k / fps (to the container's tick).
    assert index.seconds([0, frames - 1]) == pytest.approx([0.0, (frames - 1) / fps], abs=1e-3)
    assert index.keyframe[0] and index.end > index.pts[-1]


@pytest.mark.parametrize("codec", ["h264", "mpeg4"])
@pytest.mark.parametrize("frames,fps", [(5, 1), (32, 60), (900, 60)])
def test_decoded_frames_are_the_wanted_ones_in_any_order(clips, codec, frames, fps):
    """Seeking and decoding on: random positions (repeats, both directions of travel) come back as
    exactly those source frames."""
    path = clips[frames, fps, codec]
    index = vid.index_video(path, WHERE)
    rng = np.random.default_rng(frames)
    positions = [int(p) for p in rng.integers(0, frames, size=12)] + [frames - 1, 0, frames // 2, frames // 2]
    got = vid.decode_frames(path, index, positions, WHERE)
    assert [frame_number(img) for img in got] == positions


def test_middle_sampling_takes_each_segments_middle_frame(clips):
    """Constant rate: segment k of n over N frames gives frame floor((k + 1/2)·N/n) (hand-worked)."""
    index = vid.index_video(clips[900, 60, "h264"], WHERE)
    assert vid.sample_positions(index, 8, None) == [56, 168, 281, 393, 506, 618, 731, 843]
    index = vid.index_video(clips[32, 60, "mpeg4"], WHERE)
    assert vid.sample_positions(index, 32, None) == list(range(32))
    assert vid.sample_positions(index, 5, None) == [3, 9, 16, 22, 28]  # 3.2, 9.6, 16, 22.4, 28.8


def test_random_sampling_draws_one_frame_inside_each_segment(clips):
    index = vid.index_video(clips[90, 30, "h264"], WHERE)
    seen = set()
    for seed in range(50):
        pos = vid.sample_positions(index, 8, np.random.default_rng(seed))
        # Segment k holds the frames starting in [k·90/8, (k+1)·90/8): ceil(11.25k) .. ceil(11.25(k+1)) - 1.
        for k, p in enumerate(pos):
            assert np.ceil(11.25 * k) <= p < np.ceil(11.25 * (k + 1)), (seed, pos)
        seen.add(tuple(pos))
    assert len(seen) == 50  # the draws differ from seed to seed
    first = [vid.sample_positions(index, 8, np.random.default_rng(seed))[0] for seed in range(200)]
    assert set(first) == set(range(12))  # every frame of segment 0 (0..11) gets drawn, its last too


def test_variable_frame_rate_is_sampled_evenly_in_time(tmp_path):
    """Ten frames in the first 0.1 s, then one a second: segments cut in time, not in frame numbers."""
    times = [10 * k for k in range(10)] + [1000 * k for k in range(1, 11)]
    path = write_clip(tmp_path / "vfr", 20, 30, "h264", times_ms=times)
    index = vid.index_video(path, WHERE)
    assert index.seconds(list(range(20))) == pytest.approx([t / 1000 for t in times], abs=1e-3)
    # The clip lasts 11 s (last frame shown for the 1 s median step): middles 1.375, 4.125, 6.875, 9.625 s.
    pos = vid.sample_positions(index, 4, None)
    assert pos == [10, 13, 15, 18]  # frames shown at 1 s, 4 s, 6 s and 9 s
    assert [frame_number(f) for f in vid.decode_frames(path, index, pos, WHERE)] == pos
    # Frame numbers would have sampled 2, 7, 12, 17: half the frames from the first 0.1 s.


def test_clip_field_restricts_frames_to_its_time_range(clips):
    path = clips[900, 60, "h264"]
    index = vid.open_clip(path, [2.5, 4.0], WHERE)
    assert len(index) == 90 and index.first == 150  # frames starting in [2.5 s, 4.0 s) at 60 fps
    assert index.seconds([0, 89]) == pytest.approx([2.5, 4.0 - 1 / 60], abs=1e-3)
    pos = vid.sample_positions(index, 3, None)
    assert [index.first + p for p in pos] == [165, 195, 225]  # middles of 0.5 s segments
    got = vid.decode_frames(path, index, pos, WHERE)
    assert [frame_number(f) for f in got] == [165, 195, 225]
    assert len(vid.open_clip(path, {"start": 14.0, "end": None}, WHERE)) == 60  # to the end
    assert len(vid.open_clip(path, {"start": 14.0, "end": 99.0}, WHERE)) == 60  # end past the video


@pytest.mark.parametrize(
    "clip,message",
    [
        ([3.0, 2.0], "0 <= start < end"),
        ([-1, 2], "0 <= start < end"),
        ("1-2", "must be [start, end]"),
        ([1, 2, 3], "must be [start, end]"),
        ([True, 2], "0 <= start < end"),
        ([20.0, 30.0], "holds no frame (the video is 15.000 s long)"),
    ],
)
def test_bad_clip_is_a_bad_clip_error(clips, clip, message):
    with pytest.raises(vid.VideoError, match=r"d.jsonl:3: field 'clip'") as err:
        vid.open_clip(clips[900, 60, "h264"], clip, WHERE)
    assert message in str(err.value) and err.value.reason == "bad_clip"


def test_missing_frame_count_in_the_container_is_counted(tmp_path):
    """Matroska stores no frame count; the index counts the packets."""
    path = write_clip(tmp_path / "c", 37, 25, "ffv1")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    assert vid.header_frame_count(path) is not None  # estimated from the duration for length grouping
    index = vid.index_video(path, WHERE)
    assert len(index) == 37
    assert [frame_number(f) for f in vid.decode_frames(path, index, [36, 0, 20], WHERE)] == [36, 0, 20]


def test_wrong_frame_count_in_the_container_is_not_trusted(tmp_path):
    """An AVI whose headers claim 999 frames (avih dwTotalFrames and strh dwLength rewritten) holds 40."""
    path = write_clip(tmp_path / "c", 40, 30, "mpeg4")
    data = bytearray(path.read_bytes())
    avih, strh = data.find(b"avih"), data.find(b"strh")
    struct.pack_into("<I", data, avih + 8 + 16, 999)
    struct.pack_into("<I", data, strh + 8 + 32, 999)
    path.write_bytes(bytes(data))
    assert vid.header_frame_count(path) == 999
    index = vid.index_video(path, WHERE)
    assert len(index) == 40
    assert vid.sample_positions(index, 4, None) == [5, 15, 25, 35]
    assert [frame_number(f) for f in vid.decode_frames(path, index, [39], WHERE)] == [39]


def test_stream_without_timestamps_is_counted_by_decoding(tmp_path):
    """A raw H.264 elementary stream has no timestamps: frames are numbered by decoding."""
    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 80, 48, "yuv420p"
        from videos import frame_pattern

        for k in range(30):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_pattern(k), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    index = vid.index_video(path, WHERE)
    assert not index.timed and len(index) == 30
    assert index.seconds([25]) == [1.0]  # at the stream's 25 fps
    pos = vid.sample_positions(index, 3, None)
    assert pos == [5, 15, 25]
    assert [frame_number(f) for f in vid.decode_frames(path, index, pos, WHERE)] == pos
    clip = vid.open_clip(path, [0.4, 0.8], WHERE)
    assert clip.first == 10 and len(clip) == 10


def test_corrupt_truncated_and_audio_only_files(tmp_path, clips):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(vid.VideoError, match=r"d.jsonl:3: field 'video': cannot decode video") as err:
        vid.index_video(garbage, WHERE)
    assert err.value.reason == "corrupt_video"

    # An MP4 cut in half loses its index (moov is written last): unreadable, not zero frames.
    whole = clips[90, 30, "h264"].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(vid.VideoError) as err:
        vid.index_video(cut, WHERE)
    assert err.value.reason == "corrupt_video"

    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(vid.VideoError, match="has no video stream") as err:
        vid.index_video(audio, WHERE)
    assert err.value.reason == "no_video_stream"


def test_matroska_cut_short_keeps_the_frames_it_holds(tmp_path):
    """An interrupted download: the index counts the frames still in the file, all decodable."""
    path = write_clip(tmp_path / "m", 60, 30, "ffv1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    index = vid.index_video(path, WHERE)
    assert 20 < len(index) < 40
    last = len(index) - 1
    assert [frame_number(f) for f in vid.decode_frames(path, index, [last, 0], WHERE)] == [last, 0]


def test_largest_fitting_equals_brute_force():
    for limit in range(0, 40):
        for lo, hi in ((1, 1), (1, 32), (8, 32), (5, 5), (8, 9)):
            fits = lambda n, limit=limit: 263 * n <= 263 * limit  # noqa: E731
            brute = max((n for n in range(lo, hi + 1) if fits(n)), default=None)
            assert vid.largest_fitting(lo, hi, fits) == brute, (limit, lo, hi)


def test_frame_count_draws_uniformly_between_lo_and_fit():
    assert vid.frame_count(8, 30, None) == 30
    draws = [vid.frame_count(8, 30, np.random.default_rng(s)) for s in range(2000)]
    assert min(draws) == 8 and max(draws) == 30 and len(set(draws)) == 23
    assert vid.frame_count(8, 5, np.random.default_rng(0)) == 5  # fewer fit than lo: lo is the fit
