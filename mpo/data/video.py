"""Video lines: frames found by timestamp, a frame budget that fits the sequence, InternVL's segment
sampling, and only the sampled frames decoded.

A line's ``video`` (a path under the dataset root, or ``{"bytes": ...}`` in a HF datasets table)
may come with ``clip``: ``[start, end]`` (InternVL's form, ``data_item["clip"]``) or
``{"start": s, "end": e}``, both in seconds from the first frame; ``end`` may be null (to the end
of the video). Only frames whose display time starts inside ``[start, end)`` are sampled.

Reading (``index_video``): the container is demuxed once without decoding, which gives every
frame's presentation timestamp and whether decoding can start there (keyframes). Counting packets
instead of trusting the header (Matroska stores no frame count; AVI and MP4 headers can be wrong)
costs one read of the file but no decoding. A stream without timestamps (raw H.264, ...) is counted
by decoding it once, without keeping any frame, and timed at its average frame rate.

Sampling (``sample_positions``) follows ``get_frame_indices`` in OpenGVLab/InternVL
``internvl_chat/internvl/train/dataset.py``: cut the clip into n equal segments and take one frame
from each, the middle one (``sample="middle"``) or a random one (``"rand"``, InternVL's training
default). Segments are cut in time, not in frame numbers, so a variable-frame-rate clip is
sampled evenly in time; on a constant-rate clip the middle frames are segment k's frame
``floor((k + 1/2)·N/n)``. A random frame is drawn among the frames that start inside the segment
(InternVL draws from ``range(start, end - 1)``, which never picks a segment's last frame, and
falls back to a random permutation of the whole clip when a segment holds one frame).

The frame count (``largest_fitting``, ``frame_count``): InternVL's ``read_frames_decord`` draws
n uniformly from [min, max] and then pads with the last frame when the clip is shorter, and
its MPO dataset lets the image tokens overflow ``max_seq_length`` (they are then cut). Here the
count is bounded by the clip itself (no padding: repeated frames cost tokens and show nothing new)
and by the sequence budget: ``fit`` is the largest n <= min(video_max_frames, frames in the clip)
whose prompt (n frame spans included) leaves room for the longer answer inside
``data.max_length``. Evaluation and the reference cache take ``fit`` frames (middle sampling);
training with ``data.video_sampling=rand`` draws n uniformly from [lo, fit], lo = min(video_min_frames,
frames in the clip), with the sample's generator (seeded by data seed, sample and epoch). When even
lo frames leave the answers no room, lo frames are used and ``data.truncation`` decides (a prompt
that leaves no answer token at all is the ``prompt_too_long`` skip).

Decoding (``decode_frames``): wanted frames in time order; decoding continues from the current
position when no keyframe lies before the next wanted frame, otherwise seeks to the keyframe
before it. Memory holds the decoder's reference frames and one decoded frame plus what ``convert``
keeps of each wanted one (a 448 px tile in training, nothing in ``mpo data check``), never the clip.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from mpo.data.mmpr import DataError

VIDEO_SAMPLING = ("rand", "middle")


class VideoError(DataError):
    """A video that cannot be used; ``reason`` is the skip category."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def require_pyav(where: str):
    """The ``av`` module; a fatal DataError (an environment problem, never a counted skip) without it."""
    try:
        import av
    except ImportError as exc:
        err = DataError(
            f"{where}: field 'video': reading videos needs PyAV, which is not installed (pip install av)"
        )
        err.fatal = True  # the same for every video line: stop, whatever data.on_bad_sample says
        raise err from exc
    return av


def _open(source: Path | bytes):
    import av

    return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))


def _shown(source: Path | bytes) -> str:
    return "<embedded bytes>" if isinstance(source, bytes) else str(source)


# ---- the clip field ------------------------------------------------------------------------------


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def parse_clip(value: Any, where: str) -> tuple[float, float | None] | None:
    """A line's ``clip`` as ``(start, end or None)`` in seconds; None when the line has none.

    Raises:
        VideoError: (reason ``bad_clip``) not ``[start, end]`` / ``{"start", "end"}`` numbers
            with ``0 <= start < end``.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        start, end = value.get("start", 0), value.get("end")
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        start, end = value
    else:
        start, end = None, None
        value = repr(value)
    s, e = _seconds(start), (None if end is None else _seconds(end))
    if s is None or s < 0 or (end is not None and (e is None or e <= s)):
        raise VideoError(
            f"{where}: field 'clip' must be [start, end] or {{'start': s, 'end': e}} in seconds with "
            f"0 <= start < end (end may be null), got {value}",
            "bad_clip",
        )
    return s, e


# ---- finding the frames --------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoIndex:
    """The frames a video (or its clip) offers, in display order.

    Attributes:
        pts: ``(N,)`` int64, increasing: when each frame starts being shown, in ``time_base``
            units (frame numbers when ``timed`` is False).
        keyframe: ``(N,)`` bool: decoding can start at this frame.
        start, end: the time range sampled, ``[start, end)``; ``start == pts[0]``.
        origin: the video's first frame time (timestamps are reported from it).
        first: the absolute frame number of ``pts[0]`` (0 unless a clip starts later).
        time_base: seconds per unit, or None (no timestamps and no frame rate).
        seek_back: ``max(pts - dts)`` over the packets (B-frame reordering): a seek to
            ``pts - seek_back`` lands on a keyframe shown no later than ``pts``.
        timed: False for a stream without timestamps: it is decoded from the start, counting.
    """

    pts: np.ndarray
    keyframe: np.ndarray
    start: int
    end: int
    origin: int
    first: int
    time_base: Fraction | None
    seek_back: int = 0
    timed: bool = True

    def __len__(self) -> int:
        return len(self.pts)

    def seconds(self, positions: list[int]) -> list[float] | None:
        """Display time of the frames at ``positions``, in seconds from the video's first frame."""
        if self.time_base is None:
            return None
        return [round(float((int(self.pts[p]) - self.origin) * self.time_base), 4) for p in positions]


def index_video(source: Path | bytes, where: str) -> VideoIndex:
    """Every frame of the first video stream of ``source``, found by demuxing (no decoding).

    Raises:
        VideoError: reasons ``no_video_stream`` and ``corrupt_video`` (unreadable, no frames);
            the message names the annotation line and the field.
    """
    av = require_pyav(where)
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise VideoError(
                    f"{where}: field 'video': {_shown(source)} has no video stream", "no_video_stream"
                )
            stream = container.streams.video[0]
            # Read while the container is open: PyAV's stream objects do not outlive it.
            rate = stream.average_rate or stream.guessed_rate
            time_base = Fraction(stream.time_base) if stream.time_base else None
            pts, key, delay = [], [], 0
            last, last_duration = None, 0  # the latest frame and how long it is shown
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:  # end-of-stream flush / edit-list discard
                    continue
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None:  # no timestamps: count by decoding, from the start
                    return _untimed_index(source, rate, where)
                if packet.dts is not None:
                    delay = max(delay, t - packet.dts)
                pts.append(t)
                key.append(bool(packet.is_keyframe))
                if last is None or t >= last:
                    last, last_duration = t, packet.duration or 0
    except av.error.FFmpegError as exc:
        raise VideoError(
            f"{where}: field 'video': cannot decode video {_shown(source)}: {exc}", "corrupt_video"
        ) from exc
    if not pts:
        raise VideoError(f"{where}: field 'video': {_shown(source)} has no frames", "corrupt_video")
    order = np.asarray(pts, dtype=np.int64)
    unique = np.unique(order)  # sorted display order; a duplicated timestamp once
    keyframe = np.zeros(len(unique), dtype=bool)
    np.logical_or.at(keyframe, np.searchsorted(unique, order), np.asarray(key, dtype=bool))
    step = int(np.median(np.diff(unique))) if len(unique) > 1 else 1
    end = int(unique[-1]) + (last_duration or step or 1)
    origin = int(unique[0])
    return VideoIndex(unique, keyframe, origin, end, origin, 0, time_base, int(delay))


def _untimed_index(source: Path | bytes, rate, where: str) -> VideoIndex:
    """Frames numbered by decoding the whole stream once (nothing kept), timed at ``rate``."""
    with _open(source) as container:
        count = sum(1 for _ in container.decode(container.streams.video[0]))
    if count <= 0:
        raise VideoError(f"{where}: field 'video': {_shown(source)} has no frames", "corrupt_video")
    keyframe = np.zeros(count, dtype=bool)
    keyframe[0] = True
    time_base = 1 / Fraction(rate) if rate else None
    return VideoIndex(np.arange(count, dtype=np.int64), keyframe, 0, count, 0, 0, time_base, 0, timed=False)


def clip_index(index: VideoIndex, clip: tuple[float, float | None] | None, where: str) -> VideoIndex:
    """The frames of ``index`` whose display starts inside ``clip`` (seconds); all when None.

    Raises:
        VideoError: (reason ``bad_clip``) the clip holds no frame, or the video has no time base.
    """
    if clip is None:
        return index
    if index.time_base is None:
        raise VideoError(
            f"{where}: field 'clip': the video has neither timestamps nor a frame rate", "bad_clip"
        )
    start_s, end_s = clip
    lo = index.origin + round(Fraction(start_s) / index.time_base)
    hi = (
        index.end
        if end_s is None
        else min(index.end, index.origin + round(Fraction(end_s) / index.time_base))
    )
    a, b = np.searchsorted(index.pts, [lo, hi], side="left")
    if a >= b:
        length = float((index.end - index.origin) * index.time_base)
        raise VideoError(
            f"{where}: field 'clip': {list(clip)} holds no frame (the video is {length:.3f} s long)",
            "bad_clip",
        )
    return replace(
        index,
        pts=index.pts[a:b],
        keyframe=index.keyframe[a:b],
        start=int(index.pts[a]),
        end=int(hi),
        first=index.first + int(a),
    )


def header_frame_count(source: Path | bytes) -> int | None:
    """Frames the container's header announces (or duration x rate); None when it says nothing
    or cannot be read. Cheap (no demuxing): for length estimates only, never for sampling."""
    try:
        import av
    except ImportError:
        return None  # the dataset stops with the install hint when it reads the line
    try:
        with _open(source) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            rate = stream.average_rate or stream.guessed_rate
            if stream.duration and stream.time_base and rate:
                return max(1, int(stream.duration * stream.time_base * rate))
            if container.duration and rate:
                return max(1, int(container.duration / av.time_base * rate))
    except (av.error.FFmpegError, OSError):
        return None
    return None


# ---- how many frames, and which -------------------------------------------------------------------


def largest_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """The largest n in ``[lo, hi]`` with ``fits(n)``, for ``fits`` true up to some n and false
    after (a prompt grows with every frame); None when ``fits(lo)`` is false. Binary search:
    about log2(hi - lo) calls."""
    if hi < lo or not fits(lo):
        return None
    good, bad = lo, hi + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def frame_count(lo: int, fit: int, rng: np.random.Generator | None) -> int:
    """``fit`` (deterministic), or uniform in ``[min(lo, fit), fit]`` with ``rng`` (training)."""
    if rng is None:
        return fit
    return int(rng.integers(min(lo, fit), fit + 1))


def sample_positions(index: VideoIndex, n: int, rng: np.random.Generator | None) -> list[int]:
    """Positions in ``index`` of one frame from each of ``n`` equal time segments of the clip.

    ``rng`` None: the frame shown at each segment's middle time. Otherwise a uniformly drawn frame
    among those starting inside the segment (the middle one when none starts there: a frame of a
    variable-rate clip held over the whole segment). Exact integer arithmetic: segment k of
    ``[start, end)`` is ``[start + k·span/n, start + (k+1)·span/n)``, compared scaled by 2n.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    span = index.end - index.start
    scaled = (index.pts - index.start) * (2 * n)  # frame starts, relative and scaled by 2n
    out = []
    for k in range(n):
        middle = max(0, int(np.searchsorted(scaled, (2 * k + 1) * span, side="right")) - 1)
        if rng is None:
            out.append(middle)
            continue
        a, b = np.searchsorted(scaled, [2 * k * span, 2 * (k + 1) * span], side="left")
        out.append(int(rng.integers(a, b)) if b > a else middle)
    return out


# ---- decoding the sampled frames -----------------------------------------------------------------


def decode_frames(
    source: Path | bytes,
    index: VideoIndex,
    positions: list[int],
    where: str,
    convert: Callable[[Any], Any] = lambda frame: frame.to_image(),
) -> list[Any]:
    """``convert(frame)`` for the frame at each of ``positions`` (an ``av.VideoFrame``; default: RGB PIL).

    Each distinct frame is decoded and converted once; only converted results are kept.

    Raises:
        VideoError: (``corrupt_video``) decoding fails or a wanted frame never comes out.
    """
    av = require_pyav(where)
    wanted = sorted(set(positions))
    got: dict[int, Any] = {}
    try:
        with _open(source) as container:
            stream = container.streams.video[0]
            if index.timed:
                _decode_seeking(container, stream, index, wanted, convert, got)
            else:
                _decode_counting(container, stream, index, wanted, convert, got)
    except av.error.FFmpegError as exc:
        raise VideoError(
            f"{where}: field 'video': cannot decode video {_shown(source)}: {exc}", "corrupt_video"
        ) from exc
    missing = [p for p in wanted if p not in got]
    if missing:
        at = index.seconds(missing[:1])
        raise VideoError(
            f"{where}: field 'video': frame {index.first + missing[0]}"
            + (f" (at {at[0]:.3f} s)" if at else "")
            + f" of {_shown(source)} could not be decoded ({len(missing)} of {len(wanted)} sampled frames missing)",
            "corrupt_video",
        )
    return [got[p] for p in positions]


def _decode_seeking(container, stream, index: VideoIndex, wanted: list[int], convert, got: dict) -> None:
    frames = None  # decoder output since the last seek
    last, taken = -1, None  # position and (pts, converted) of the last frame taken
    fresh = False  # nothing decoded since the last seek yet
    for w in wanted:
        target = int(index.pts[w])
        if taken is not None and taken[0] >= target:
            got[w] = taken[1]  # the frame taken for an undecodable earlier one is shown now too
            continue
        if frames is None or index.keyframe[last + 1 : w + 1].any():
            frames, fresh = _seek(container, stream, target - index.seek_back), True
        for frame in frames:
            if frame.pts is None:
                raise VideoError("decoded frame without a timestamp in a timed stream", "corrupt_video")
            if frame.pts < target:
                fresh = False
                continue
            if fresh and frame.pts > target and target - index.seek_back > index.origin:
                # The seek landed after the wanted frame (an imprecise container index): one
                # forward pass from the start of the stream instead; slow, but the right frames.
                frames = _seek(container, stream, index.origin)
                return _decode_seeking_from(frames, index, [p for p in wanted if p >= w], convert, got)
            taken = (
                int(frame.pts),
                convert(frame),
            )  # the wanted frame, or the next one when it was undecodable
            got[w], fresh = taken[1], False
            last = int(np.searchsorted(index.pts, frame.pts, side="right")) - 1
            break
        else:
            return  # the stream ended: the missing frames are reported by the caller


def _decode_seeking_from(frames, index: VideoIndex, wanted: list[int], convert, got: dict) -> None:
    """Take each wanted frame from one forward pass over ``frames``."""
    todo = iter(wanted)
    w = next(todo, None)
    for frame in frames:
        converted = False
        while w is not None and frame.pts is not None and frame.pts >= index.pts[w]:
            if not converted:
                value, converted = convert(frame), True
            got[w] = value
            w = next(todo, None)
        if w is None:
            return


def _seek(container, stream, pts: int):
    container.seek(int(pts), stream=stream, backward=True, any_frame=False)
    return container.decode(stream)


def _decode_counting(container, stream, index: VideoIndex, wanted: list[int], convert, got: dict) -> None:
    """Streams without timestamps: decode from the start, counting frames."""
    by_number = {int(index.pts[p]): p for p in wanted}
    last = max(by_number)
    for number, frame in enumerate(container.decode(stream)):
        if number in by_number:
            got[by_number[number]] = convert(frame)
        if number >= last:
            return


# ---- one video line --------------------------------------------------------------------------------


def open_clip(source: Path | bytes, clip_value: Any, where: str) -> VideoIndex:
    """The frames a line may sample: its video's, restricted to its ``clip`` field when given."""
    if isinstance(source, Path) and not source.is_file():
        raise VideoError(f"{where}: field 'video': video not found: {source}", "missing_video")
    clip = parse_clip(clip_value, where)
    return clip_index(index_video(source, where), clip, where)
