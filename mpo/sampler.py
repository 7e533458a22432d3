"""Length-grouped batching for preference pairs.

A micro-batch is padded to its longest sequence, and with InternVL's dynamic tiling a pair's
length runs from a few hundred tokens (one tile) to over 3,000 (12 tiles + thumbnail), so random
batches waste most of their compute on padding. transformers' ``LengthGroupedSampler`` looks for
an ``input_ids`` column, which preference data does not have (the peers crash there); here the
length of a pair is estimated from its record without decoding any image:

    length = system + question tokens + 256 x tiles (from the image header) + max(chosen, rejected) tokens

A video's frames are estimated as the encoder's frame budget would choose them (the most that leave
the longer answer whole inside ``data.max_length``, at most ``video_max_frames`` and the frame
count the container's header announces), without demuxing the file.

The grouping follows ``get_length_grouped_indices`` in transformers (``trainer_pt_utils``): shuffle
with a seeded generator, cut into mega-batches of ``mega_batch_mult x batch_size``, sort each by
length, so consecutive ``batch_size`` slices hold similar lengths while the order stays random at
the mega-batch scale. The longest batch goes first so an out-of-memory shows at step 1.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mpo.data.mmpr import DataError
from mpo.data.pairs import media_entries, media_fields, media_source, tile_budget
from mpo.data.tiling import choose_grid, per_image_budget
from mpo.data.video import header_frame_count


def image_tiles_from_header(source, max_num: int, min_num: int, image_size: int, use_thumbnail: bool) -> int:
    """Tiles InternVL's tiling gives an image (a path or bytes); reads the size from the header
    only (PIL is lazy). Unreadable images count as one tile: the dataset reports them when it loads them.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            width, height = im.size
    except (FileNotFoundError, UnidentifiedImageError, OSError, AttributeError, TypeError, ValueError):
        return 1
    cols, rows = choose_grid(width, height, min(min_num, max_num), max_num, image_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def _record_tiles(pairs, spec, obj: dict) -> int:
    cfg, vision = pairs.cfg, pairs.encoder.vision
    try:
        kind, _ = media_entries(obj, "")  # the encoder's rules: "" and [] mean no media
        fields = media_fields(obj, "")
    except DataError:
        return 0  # a bad record: the dataset skips or reports it
    if kind == "video":  # frames are one tile each; an upper bound (the text may leave room for fewer)
        try:
            source = media_source(spec.root, fields[0][1], "", "video", cfg.follow_symlinks_outside_root)
        except DataError:
            return cfg.video_max_frames
        announced = header_frame_count(source)
        return min(cfg.video_max_frames, announced or cfg.video_max_frames)
    if kind == "text":
        return 0
    per_image = per_image_budget(tile_budget(spec, cfg), len(fields))
    total = 0
    for field, value in fields:
        try:
            source = media_source(spec.root, value, "", field, cfg.follow_symlinks_outside_root)
        except DataError:
            total += 1
            continue
        total += image_tiles_from_header(
            source, per_image, cfg.min_dynamic_patch, vision.image_size, cfg.use_thumbnail
        )
    return total


def pair_lengths(pairs, text_batch: int = 1024) -> np.ndarray:
    """Estimated tokens per pair (the longer of its two sequences) for a ``PairDataset``, ``(N,)``.

    Text is tokenized with the dataset's tokenizer in batches, the template's fixed tokens added;
    images contribute ``tokens_per_tile x tiles``, videos ``(tokens_per_tile + a frame line's
    tokens) x frames`` for the frames the budget would choose. Records that cannot be read get
    length 0 and are left to the dataset to report.
    """
    tokenizer = pairs.encoder.template.tokenizer
    tokens_per_tile = pairs.encoder.vision.tokens_per_tile
    cfg = pairs.cfg
    # System + empty user turn, and the answer's "<|im_start|>assistant\n" ... "<|im_end|>\n".
    fixed = len(pairs.encoder.template.encode_prompt("")) + len(pairs.encoder.template.prefix_ids) + 2
    per_frame = tokens_per_tile + len(
        tokenizer("Frame10: <img></img>\n", add_special_tokens=False)["input_ids"]
    )
    n = len(pairs)
    lengths = np.zeros(n, dtype=np.int64)
    frame_caps: dict[int, int] = {}  # video records: the most frames they may get
    for start in range(0, n, text_batch):
        idx, questions, answers = [], [], []
        for i in range(start, min(n, start + text_batch)):
            try:
                spec, _, obj = pairs.source.get(i)
            except DataError:
                continue
            texts = [
                obj.get(k) if isinstance(obj.get(k), str) else "" for k in ("question", "chosen", "rejected")
            ]
            idx.append(i)
            try:
                kind, media = media_entries(obj, "")
            except DataError:
                kind, media = "text", []
            questions.append(texts[0].replace("<image>", "").replace("<video>", ""))
            answers += texts[1:]
            if kind == "video":
                frame_caps[i] = _record_tiles(pairs, spec, obj)
                continue
            # Each image becomes <img> + context tokens + </img>; a missing placeholder adds "\n".
            extra = 2 * len(media) + (1 if media and "<image>" not in texts[0] else 0)
            lengths[i] = tokens_per_tile * _record_tiles(pairs, spec, obj) + extra
        if not idx:
            continue
        q = tokenizer(questions, add_special_tokens=False)["input_ids"]
        a = tokenizer(answers, add_special_tokens=False)["input_ids"]
        for k, i in enumerate(idx):
            longest = max(len(a[2 * k]), len(a[2 * k + 1]))
            text = fixed + len(q[k]) + longest
            if i in frame_caps:  # the encoder's budget: the most frames that leave the answer whole
                cap = frame_caps[i]
                frames = min(cap, max(min(cfg.video_min_frames, cap), (cfg.max_length - text) // per_frame))
                lengths[i] = frames * per_frame
            lengths[i] = min(cfg.max_length, lengths[i] + text)
    return lengths


def length_grouped_indices(
    lengths: np.ndarray, batch_size: int, generator: torch.Generator, mega_batch_mult: int = 50
) -> list[int]:
    """A permutation of ``range(len(lengths))`` whose consecutive ``batch_size`` slices have similar lengths."""
    n = len(lengths)
    perm = torch.randperm(n, generator=generator).tolist()
    mega = max(batch_size, batch_size * mega_batch_mult)
    groups = [sorted(perm[i : i + mega], key=lambda j: -int(lengths[j])) for i in range(0, n, mega)]
    batches = [g[i : i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    if not batches:
        return []
    longest = max(range(len(batches)), key=lambda b: int(lengths[batches[b][0]]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return [i for b in batches for i in b]


class EpochTaggedSampler(torch.utils.data.Sampler[int]):
    """Yields ``epoch·N + i`` for each index ``i`` of ``inner``: the dataset learns the epoch from
    the index (``PairDataset`` takes ``divmod(index, N)``), so per-sample random views are seeded
    by (sample, epoch) in DataLoader workers too and a resumed run draws the same views.

    ``set_epoch`` (called by the Trainer at every epoch, resumed ones included) is passed on.
    """

    def __init__(self, inner: torch.utils.data.Sampler, num_samples: int):
        self.inner = inner
        self.num_samples = num_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.num_samples
        return (base + int(i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class LengthGroupedPairSampler(torch.utils.data.Sampler[int]):
    """Seeded, per-epoch deterministic sampler that puts pairs of similar length in a micro-batch.

    Args:
        lengths: ``(N,)`` estimated tokens per pair (``pair_lengths``).
        batch_size: pairs per micro-batch on one process.
        seed: the order depends only on ``seed`` and the epoch (``set_epoch``).
        num_replicas, rank: leave at 1/0 under ``transformers.Trainer`` (accelerate then hands
            whole consecutive batches to each process, so every process still gets grouped
            batches); set them for a plain ``DataLoader`` loop, where this sampler yields only
            this rank's batches (batch k goes to rank k mod num_replicas, the list padded by
            repeating its start so every rank gets the same number).
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        mega_batch_mult: int = 50,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return length_grouped_indices(self.lengths, self.batch_size, g, self.mega_batch_mult)

    def _rank_batches(self, order: list[int]) -> list[list[int]]:
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        per_rank = math.ceil(len(batches) / self.num_replicas)
        batches += batches[: per_rank * self.num_replicas - len(batches)]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.num_replicas == 1:
            return iter(order)
        return iter([i for b in self._rank_batches(order) for i in b])

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return len(self.lengths)
        return sum(len(b) for b in self._rank_batches(list(range(len(self.lengths)))))
