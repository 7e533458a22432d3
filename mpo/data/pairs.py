"""One MMPR line -> one encoded preference pair (images tiled once, shared by both answers).

Follows ``LazySupervisedDataset`` in OpenGVLab/InternVL ``internvl_chat/internvl/train/
internvl_chat_mpo.py`` for what the model sees (single image with ``<image>\\n`` auto-prefix,
multi-image with a tile budget of ``max(1, max_dynamic_patch // num_images)`` per image, video
frames as one tile each, text-only pairs) but not for failures: InternVL prints the exception and
trains on a random other line instead; here a bad line raises a ``SampleError`` naming file, line
and field, or (``on_bad_sample=skip``) is counted, reported and returned as None, with
``max_bad_fraction`` as the limit.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mpo.data.events import DataEvents
from mpo.data.mmpr import DataError, DatasetSpec, MixedSource, read_meta
from mpo.data.template import (
    IGNORE_INDEX,
    TemplateEncoder,
    TemplateError,
    expand_image_placeholders,
    expand_placeholders_in_turns,
    expand_video_placeholder,
)
from mpo.data.tiling import VisionSpec, count_tiles, per_image_budget, tile_image

logger = logging.getLogger(__name__)


class SampleError(DataError):
    """A sample that cannot be used; ``reason`` is a short category for skip reports.

    ``policy`` marks length skips asked for by ``data.truncation``/``max_length``: they are
    counted and reported like bad lines but are not bad data, so they neither raise under
    ``on_bad_sample=error`` nor count towards ``max_bad_fraction``.
    """

    def __init__(self, message: str, reason: str = "invalid_sample", policy: bool = False):
        super().__init__(message)
        self.reason = reason
        self.policy = policy


def _text_field(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise SampleError(f"{where}: missing field '{key}'", f"missing_{key}")
    value = obj[key]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise SampleError(f"{where}: field '{key}' must be a string, got {kind}", f"bad_{key}")
    if key != "question" and not value.strip():
        raise SampleError(f"{where}: field '{key}' is empty", f"empty_{key}")
    return value


def _prompt_context(obj: dict, where: str) -> tuple[list[tuple[str, str]], str | None]:
    """A record's optional earlier turns and own system prompt (``history``, ``system``).

    ``history`` is ``[[user, assistant], ...]``, oldest first (multi-turn prompts read from other
    formats, ``mpo.data.formats``); ``system`` replaces ``data.system_message`` for this pair.
    """
    history, system = obj.get("history"), obj.get("system")
    if system is not None and not isinstance(system, str):
        raise SampleError(
            f"{where}: field 'system' must be a string, got {type(system).__name__}", "bad_system"
        )
    if history is None:
        return [], system
    if not isinstance(history, list) or not all(
        isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
        for turn in history
    ):
        raise SampleError(
            f"{where}: field 'history' must be a list of [user, assistant] string pairs", "bad_history"
        )
    return [(user, answer) for user, answer in history], system


def resolve_media(root: Path, rel: Any, where: str, field: str, follow_symlinks: bool = False) -> Path:
    """Join ``rel`` to ``root``, refusing paths that leave the root: ``..``, absolute paths, and
    (unless ``follow_symlinks``, ``data.follow_symlinks_outside_root``) symlinks inside the root
    that point outside it. The root itself may be a symlink."""
    if not isinstance(rel, str) or not rel:
        raise SampleError(
            f"{where}: field '{field}' must be a non-empty path string", f"bad_{field.split('[')[0]}"
        )
    base = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.join(base, rel))
    if os.path.commonpath([base, path]) != base:
        raise SampleError(
            f"{where}: field '{field}': path '{rel}' escapes the dataset root {root}", "path_escapes_root"
        )
    if not follow_symlinks and os.path.exists(path):
        real_base, real = os.path.realpath(base), os.path.realpath(path)
        if os.path.commonpath([real_base, real]) != real_base:
            raise SampleError(
                f"{where}: field '{field}': path '{rel}' is a symlink to {real}, outside the dataset root "
                f"{root} (set data.follow_symlinks_outside_root=true to allow it)",
                "path_escapes_root",
            )
    return Path(path)


def media_source(
    root: Path, value: Any, where: str, field: str, follow_symlinks: bool = False
) -> Path | bytes:
    """What one image/video value of a record points at: a file under ``root``, or the bytes a HF
    ``datasets`` Image column holds (``{"bytes": ..., "path": ...}``, bytes first)."""
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
        if isinstance(value, str) and os.path.isabs(value):
            # A HF Image column stores where datasets found the file, as an absolute path; other
            # formats' absolute paths arrive the same way (mpo.data.formats). MMPR's own strings
            # stay relative to the root.
            return Path(value)
    return resolve_media(root, value, where, field, follow_symlinks)


def load_image(source: Path | bytes, where: str, field: str) -> Image.Image:
    """Decode an image file (or bytes) to RGB; SampleError naming the line and field otherwise."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise SampleError(f"{where}: field '{field}': image not found: {source}", "missing_image") from exc
    except Image.DecompressionBombError as exc:
        raise SampleError(
            f"{where}: field '{field}': image is too large to decode safely ({exc})", "image_too_large"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        shown = source if isinstance(source, Path) else "<embedded bytes>"
        raise SampleError(
            f"{where}: field '{field}': cannot decode image {shown}: {exc}", "corrupt_image"
        ) from exc


def media_entries(obj: dict, where: str) -> tuple[str, list[Any]]:
    """('image' | 'video' | 'text', the media entries) of a record; InternVL's dispatch order."""
    image, video = obj.get("image"), obj.get("video")
    has_image = image is not None and not (isinstance(image, (str, list)) and len(image) == 0)
    has_video = video is not None and video != ""
    if has_image and has_video:
        raise SampleError(
            f"{where}: fields 'image' and 'video' are both set; one kind of media per pair", "image_and_video"
        )
    if has_video:
        return "video", [video]
    if not has_image:
        return "text", []
    if isinstance(image, list):
        return "image", image
    return "image", [image]


def media_fields(obj: dict, where: str) -> list[tuple[str, Any]]:
    """(field name as shown in messages, value) of each image or video of a record."""
    kind, media = media_entries(obj, where)
    if kind == "video":
        return [("video", media[0])]
    if isinstance(obj.get("image"), list):
        return [(f"image[{k}]", v) for k, v in enumerate(media)]
    return [("image", v) for v in media]


def tile_budget(spec: DatasetSpec, data_cfg) -> int:
    """A sample's tile budget: its dataset's ``max_dynamic_patch`` or the config's."""
    return spec.max_dynamic_patch or data_cfg.max_dynamic_patch


class PairEncoder:
    """Turns a parsed MMPR record into model inputs for the chosen and rejected answers."""

    def __init__(self, tokenizer, vision: VisionSpec, data_cfg, pixels: bool = True):
        self.template = TemplateEncoder(tokenizer, data_cfg.system_message, data_cfg.template)
        self.vision = vision
        self.cfg = data_cfg
        # pixels=False (``mpo data check``): images are fully decoded (so corrupt files are still
        # caught) and the tile count is computed, but no tiles are resized or normalised.
        self.pixels = pixels

    def images(
        self, spec: DatasetSpec, obj: dict, where: str, rng: np.random.Generator | None = None
    ) -> tuple[str, torch.Tensor | None, list[int]]:
        """(kind, tiles of every image or None for text-only, tiles per image) of an image or
        text-only record (videos: ``video``, which needs the text's length first).

        Tiles are ``(sum of tiles, 3, S, S)`` float32; each image is decoded and tiled once.
        ``rng`` (training only): the sample's random draws, for ``data_augment``.
        """
        kind, _ = media_entries(obj, where)
        if kind == "text":
            return kind, None, []
        if kind == "video":
            raise ValueError("video records go through PairEncoder.video (their frame count needs the text)")
        fields = media_fields(obj, where)
        size = self.vision.image_size
        per_image = per_image_budget(tile_budget(spec, self.cfg), len(fields))
        min_num = min(self.cfg.min_dynamic_patch, per_image)
        tiles, counts = [], []
        for field, value in fields:
            source = media_source(spec.root, value, where, field, self.cfg.follow_symlinks_outside_root)
            img = load_image(source, where, field)
            if not self.pixels:
                counts.append(count_tiles(*img.size, per_image, size, min_num, self.cfg.use_thumbnail))
                continue
            augment = rng if spec.data_augment else None
            t = tile_image(img, per_image, size, min_num, self.cfg.use_thumbnail, augment_rng=augment)
            tiles.append(t)
            counts.append(t.shape[0])
        return kind, (torch.cat(tiles) if tiles else None), counts

    def encode(
        self, spec: DatasetSpec, line_no: int, obj: dict, rng: np.random.Generator | None = None
    ) -> tuple[dict[str, Any], Counter]:
        """The encoded pair and which of its responses were truncated (``{"chosen": 1}``...).

        The pair holds ``{chosen,rejected}_{input_ids,labels}`` (1-D long), ``pixel_values``
        (``(tiles, 3, S, S)`` or None), ``num_tiles`` (per image/frame), ``full_lengths``
        (untruncated sequence lengths), ``dataset``, ``line``, and for a video ``video`` (what
        ``video`` sampled: frame count, frame numbers, timestamps). Raises ``SampleError``.
        ``rng``: the sample's random draws in training (``data_augment``, video frames); None:
        deterministic.
        """
        where = f"{spec.annotation}:{line_no}"
        question = _text_field(obj, "question", where)
        chosen = _text_field(obj, "chosen", where)
        rejected = _text_field(obj, "rejected", where)
        if chosen == rejected:
            raise SampleError(
                f"{where}: fields 'chosen' and 'rejected' are identical", "chosen_equals_rejected"
            )
        history, system = _prompt_context(obj, where)
        texts = [("question", question), ("chosen", chosen), ("rejected", rejected)]
        texts += [(f"history[{k}][{j}]", t) for k, turn in enumerate(history) for j, t in enumerate(turn)]
        texts += [("system", system)] if system is not None else []
        self._check_reserved(texts, where)
        try:
            answers = {
                "chosen": self.template.encode_answer(chosen),
                "rejected": self.template.encode_answer(rejected),
            }
        except TemplateError as exc:
            raise SampleError(f"{where}: field 'chosen'/'rejected': {exc}", "bad_answer") from exc
        longest = max(len(ids) for ids, _ in answers.values())
        prompt, pixel_values, tiles, video = self._prompt(
            spec, obj, question, history, system, longest, where, rng
        )
        out: dict[str, Any] = {
            "pixel_values": pixel_values,
            "num_tiles": tiles,
            "full_lengths": {name: len(prompt) + len(ids) for name, (ids, _) in answers.items()},
            "dataset": spec.name,
            "line": line_no,
        }
        if video is not None:
            out["video"] = video
        truncated: Counter = Counter()
        for name, (ids, labels) in answers.items():
            keep = self._fit(len(prompt), len(ids), name, where)
            if keep < len(ids):
                truncated[name] += 1
            out[f"{name}_input_ids"] = torch.tensor(prompt + ids[:keep], dtype=torch.long)
            out[f"{name}_labels"] = torch.tensor(
                [IGNORE_INDEX] * len(prompt) + labels[:keep], dtype=torch.long
            )
        return out, truncated

    def encode_prompt(self, spec: DatasetSpec, line_no: int, obj: dict, answer_room: int) -> dict[str, Any]:
        """A record's prompt exactly as training builds it, ending with the assistant prefix: what a
        model continues to answer (``mpo pairs sample``). Fields other than the prompt's are ignored.

        Args:
            answer_room: tokens left for the answer (a video gets as many frames as leave this room).

        Returns:
            ``input_ids`` (list), ``pixel_values`` (``(tiles, 3, S, S)`` or None), ``num_tiles``.

        Raises:
            SampleError: naming the file, line and field.
        """
        where = f"{spec.annotation}:{line_no}"
        question = _text_field(obj, "question", where)
        history, system = _prompt_context(obj, where)
        texts = [("question", question)] + ([("system", system)] if system is not None else [])
        texts += [(f"history[{k}][{j}]", t) for k, turn in enumerate(history) for j, t in enumerate(turn)]
        self._check_reserved(texts, where)
        prompt, pixel_values, tiles, _ = self._prompt(
            spec, obj, question, history, system, answer_room, where
        )
        return {
            "input_ids": prompt + self.template.prefix_ids,
            "pixel_values": pixel_values,
            "num_tiles": tiles,
        }

    def _check_reserved(self, texts: list[tuple[str, str]], where: str) -> None:
        for field, text in texts:
            # Structural tokens the template and the image expansion insert; never taken from the data.
            found = next((t for t in self.template.reserved_tokens if t in text), None)
            if found:
                # The tokenizer would read it as the special token: image features land in the
                # wrong place, or a turn ends early.
                raise SampleError(
                    f"{where}: field '{field}' contains the reserved token {found!r} "
                    "(the template inserts these itself)",
                    "reserved_token",
                )

    def _prompt(
        self,
        spec: DatasetSpec,
        obj: dict,
        question: str,
        history: list[tuple[str, str]],
        system: str | None,
        answer_len: int,
        where: str,
        rng: np.random.Generator | None = None,
    ) -> tuple[list[int], torch.Tensor | None, list[int], dict[str, Any] | None]:
        """(prompt ids without the assistant prefix, tiles or None, tiles per image/frame, the video's
        sampling info or None); ``answer_len``: the longest answer turn, which a video leaves room for."""
        # The user turns, oldest first: media placeholders may sit in any of them.
        users = [user for user, _ in history] + [question]
        video = None
        if media_entries(obj, where)[0] == "video":
            # The frame count depends on the room the text leaves, so the answers come first; the
            # video sits in the first user turn, the other turns and the system prompt take room too.
            others = len(self.template.encode_prompt(question, history, system)) - len(
                self.template.encode_prompt(users[0])
            )
            longest = answer_len + others
            pixel_values, users[0], video = self.video(spec, obj, users[0], longest, where, rng)
            tiles = [1] * video["frames"]
        else:
            _, pixel_values, tiles = self.images(spec, obj, where, rng)
        try:
            users = expand_placeholders_in_turns(users, [n * self.vision.tokens_per_tile for n in tiles])
        except TemplateError as exc:
            field = "question" if not history else "question'/'history"
            raise SampleError(f"{where}: field '{field}': {exc}", "placeholder_mismatch") from exc
        earlier = [(user, answer) for user, (_, answer) in zip(users, history)]
        prompt = self.template.encode_prompt(users[-1], earlier, system)
        return prompt, pixel_values, tiles, video

    @staticmethod
    def _expand(question: str, token_counts: list[int], where: str) -> str:
        """``question`` with each ``<image>`` replaced by its span (``expand_image_placeholders``)."""
        try:
            return expand_image_placeholders(question, token_counts)
        except TemplateError as exc:
            raise SampleError(f"{where}: field 'question': {exc}", "placeholder_mismatch") from exc

    def _video_question(self, question: str, num_frames: int, where: str) -> str:
        """The question with one ``Frame{i}: <image>`` line per frame in place of ``<video>``."""
        try:
            return expand_video_placeholder(question, num_frames)
        except TemplateError as exc:
            raise SampleError(f"{where}: field 'question': {exc}", "placeholder_mismatch") from exc

    def video_prompt_length(self, question: str, num_frames: int, where: str = "") -> int:
        """Tokens of the prompt (system + user turn) of a video question with ``num_frames`` frames.

        The spans are tokenized empty and their image tokens added: ``<img>``, ``</img>`` and
        ``<IMG_CONTEXT>`` are special tokens, so the text between them tokenizes the same either
        way and the count is exact without tokenizing thousands of context tokens.
        """
        text = self._expand(self._video_question(question, num_frames, where), [0] * num_frames, where)
        return len(self.template.encode_prompt(text)) + num_frames * self.vision.tokens_per_tile

    def video(
        self, spec: DatasetSpec, obj: dict, question: str, answer_len: int, where: str, rng=None
    ) -> tuple[torch.Tensor | None, str, dict[str, Any]]:
        """Frames of a video record, as many as the sequence budget allows (``mpo.data.video``).

        Args:
            answer_len: tokens of the longer answer turn; the frames leave room for it.
            rng: the sample's generator in training: frame count and frames are drawn with it
                under ``data.video_sampling=rand`` (and tiles augmented with ``data_augment``);
                None: the most frames that fit, segment middles.

        Returns:
            (tiles ``(n, 3, S, S)`` or None without pixels, the question with its ``Frame{i}:
            <image>`` lines, what was sampled: ``frames``, ``frames_in_clip``, ``fit`` (the most
            frames that fit), ``frame_numbers``, ``timestamps_s``, ``sampling``).
        """
        from mpo.data import video as vid  # PyAV only when a video appears

        vid.require_pyav(where)
        source = media_source(spec.root, obj["video"], where, "video", self.cfg.follow_symlinks_outside_root)
        index = vid.open_clip(source, obj.get("clip"), where)
        cfg = self.cfg
        lo, hi = min(cfg.video_min_frames, len(index)), min(cfg.video_max_frames, len(index))
        room = cfg.max_length - answer_len
        fit = vid.largest_fitting(lo, hi, lambda n: self.video_prompt_length(question, n, where) <= room)
        # Not even lo frames leave the answers whole: lo frames, and data.truncation decides.
        fit = lo if fit is None else fit
        draw = rng if cfg.video_sampling == "rand" else None
        n = vid.frame_count(lo, fit, draw)
        positions = vid.sample_positions(index, n, draw)
        size = self.vision.image_size
        augment = rng if spec.data_augment else None
        # InternVL's video path: each frame is one Resize((S, S)) tile, no dynamic tiling.
        convert = (
            (lambda frame: tile_image(frame.to_image(), 1, size, 1, False, augment_rng=augment))
            if self.pixels
            else (lambda frame: None)  # mpo data check: decoded (so errors show), nothing kept
        )
        tiles = vid.decode_frames(source, index, positions, where, convert)
        info = {
            "frames": n,
            "frames_in_clip": len(index),
            "fit": fit,
            "frame_numbers": [index.first + p for p in positions],
            "timestamps_s": index.seconds(positions),
            "sampling": "rand" if draw is not None else "middle",
        }
        pixels = torch.cat(tiles) if self.pixels else None
        return pixels, self._video_question(question, n, where), info

    def _fit(self, prompt_len: int, answer_len: int, name: str, where: str) -> int:
        """Answer tokens kept under ``max_length``: the prompt (holding every image span) is never cut."""
        max_len = self.cfg.max_length
        if prompt_len + answer_len <= max_len:
            return answer_len
        # At least one answer token must stay trained after the assistant prefix.
        min_keep = len(self.template.prefix_ids) + 1
        if self.cfg.truncation == "skip" or max_len - prompt_len < min_keep:
            reason = "too_long" if self.cfg.truncation == "skip" else "prompt_too_long"
            raise SampleError(
                f"{where}: {name} sequence is {prompt_len + answer_len} tokens (prompt {prompt_len}), "
                f"over data.max_length={max_len} (data.truncation={self.cfg.truncation})",
                reason,
                policy=True,
            )
        return max_len - prompt_len


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded pairs over an MMPR meta file (or JSONL / HF datasets source).

    Item ``i`` is ``(pair or None, DataEvents)``. With ``on_bad_sample=error`` a bad line raises a
    ``SampleError`` naming file, line and field; with ``skip`` it gives ``(None, events)`` with
    the reason and message, which the collator counts and drops. Length skips (``truncation=skip``
    or a prompt over ``max_length``) are skips too, never errors and never "bad". The dataset keeps
    no counters: its items carry their events, from whichever worker process read them.

    ``train=True``: random views (``data_augment``) are drawn from a generator seeded by
    ``(data.seed, sample, epoch)``, so a resumed run sees the same pixels. The training sampler
    (``mpo.sampler.EpochTaggedSampler``) passes the epoch inside the index: index ``e·N + i`` is
    sample ``i`` in epoch ``e``. With ``train=False`` (evaluation, reference caches) every view is
    the deterministic one.
    """

    def __init__(
        self,
        meta_path: str | Path,
        tokenizer,
        vision: VisionSpec,
        data_cfg,
        pixels: bool = True,
        train: bool = False,
    ):
        self.meta_path = Path(meta_path)
        self.source = MixedSource(read_meta(meta_path), seed=data_cfg.seed)
        self.encoder = PairEncoder(tokenizer, vision, data_cfg, pixels=pixels)
        self.cfg = data_cfg
        self.train = train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[dict[str, Any] | None, DataEvents]:
        epoch, i = divmod(int(index), len(self))
        rng = np.random.default_rng([self.cfg.seed, i, epoch]) if self.train else None
        return self.encode_record(lambda: self.source.get(i), rng)

    def encode_record(
        self, read, rng: np.random.Generator | None = None
    ) -> tuple[dict[str, Any] | None, DataEvents]:
        """Read and encode one record with the bad-sample policy applied.

        Args:
            read: callable returning ``(spec, line_no, obj)``; may raise ``DataError``.
            rng: the sample's random draws (training), or None.
        """
        try:
            spec, line_no, obj = read()
            pair, truncated = self.encoder.encode(spec, line_no, obj, rng)
        except DataError as exc:
            policy = getattr(exc, "policy", False)
            if getattr(exc, "fatal", False) or (self.cfg.on_bad_sample == "error" and not policy):
                raise
            return None, DataEvents.skip(getattr(exc, "reason", "invalid_sample"), str(exc), bad=not policy)
        return pair, DataEvents(seen=1, truncated=truncated)
