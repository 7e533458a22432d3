"""Per-pair lengths of a data set, computed once, in parallel, and cached as memory-mapped arrays.

Length-grouped batching (``data.group_by_length``) and packing need every pair's length before
the first step. Tokenizing MMPR's ~3 million pairs and reading their image headers takes minutes;
here it is done once per annotation file, split over worker processes and ranks, and stored as a
memory-mapped numpy array that later starts (and resumes) reopen in seconds.

Stored, one row per record of an annotation file (JSONL line or table row), ``LENGTH_DTYPE``::

    prompt     tokens of the system and user turns, image/frame spans included
    chosen     tokens of the chosen answer's assistant turn (``<|im_start|>assistant\\n`` ... ``<|im_end|>\\n``)
    rejected   the same for the rejected answer
    tiles      image tiles of the pair (all its images; a video counts data.video_max_frames frames)
    status     0: measured; 1: cannot be measured (lengths 0): an unreadable line, a missing or
               non-text field, placeholders that do not fit the images, an unreadable image header.
               The dataset skips or reports these; records it rejects for other reasons
               (identical answers, reserved tokens, a pixel decode error) keep their lengths.

so the encoder's ``full_lengths`` are ``prompt + chosen`` and ``prompt + rejected``, untruncated:
``data.max_length`` applies when the lengths are read (``pair_tokens``), so changing it reuses
the index.

These are the encoder's numbers, not estimates. The texts are built by the template's own
functions, each image span written as ``<img></img>`` (no context tokens): ``<img>``,
``<IMG_CONTEXT>`` and ``</img>`` are added tokens, which a tokenizer splits out before it
tokenizes the text between them, so the full span adds exactly ``tokens_per_tile x tiles``.
Tiles come from the image header (PIL reads the size without decoding pixels) through InternVL's
grid rule (``mpo.data.tiling.count_tiles``). Every chunk checks its first records against the
template's encoding of the full text, and a chunk that disagrees (a tokenizer that does not split
added tokens that way) is recomputed with that slower, exact path and counted in the manifest.
Videos are not opened: ``data.video_max_frames`` frames is an upper bound, exact for videos with
at least that many frames.

Cache: ``<data.length_cache_dir>/<annotation stem>-<key>/{lengths.npy, manifest.json}``, the
manifest written last (a folder without one is unfinished). The key is the sha256 of

* the annotation's content: its size and the sha256 of every byte (a HF ``datasets`` folder: of
  each file). A full hash reads about 1 GB/s, a few seconds for MMPR's 2.1 GB, and catches any
  edit, whatever the file's size or modification time;
* the settings that change tokens or tiles, compared as the reference cache compares them
  (``mpo.refcache.data_settings``: tokenizer, system message, tile size and tokens per tile, tile
  budget, fewest tiles, thumbnail, video frames), less ``max_length`` and ``truncation``;
* the dataset's image root and tile budget (a meta entry's ``max_dynamic_patch``).

Image files are identified by their path: an image replaced in place by one of other dimensions
is not detected (``mpo data index --rebuild`` recomputes). A changed key builds a new folder; old
ones stay until deleted. The default folder is ``$MPO_CACHE/lengths`` (``~/.cache/mpo/lengths``
without it): the data folder is never written to, and content keys make a shared cache safe.

Parallel: the rows are cut into chunks of ``CHUNK_ROWS``; chunk ``c`` belongs to rank
``c mod world`` under a launcher and is computed in one of that rank's ``data.length_workers``
DataLoader worker processes. A single process writes each chunk straight into the memory-mapped
file. Ranks gather their shares (``all_gather_object``, about 17 bytes per pair, held only while
building), rank 0 writes the index, and a node that cannot see rank 0's folder (a node-local
cache) writes its own copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mpo.data.mmpr import DataError, DatasetSpec
from mpo.data.pairs import SampleError, media_entries, media_fields, media_source, resolve_media, tile_budget
from mpo.data.template import (
    TemplateError,
    assistant_turn,
    expand_image_placeholders,
    expand_video_placeholder,
    user_turn,
)
from mpo.data.tiling import count_tiles, per_image_budget
from mpo.files import sha256_file
from mpo.refcache import data_settings

logger = logging.getLogger(__name__)

FORMAT = 1
LENGTH_DTYPE = np.dtype(
    [("prompt", "<i4"), ("chosen", "<i4"), ("rejected", "<i4"), ("tiles", "<i4"), ("status", "u1")]
)
ARRAY_NAME = "lengths.npy"
MANIFEST_NAME = "manifest.json"
CHUNK_ROWS = 8192  # rows per work item: ~1 s of work, small enough to balance 16 workers on 100k rows
CHECKED_PER_CHUNK = 2  # records per chunk compared with the template's full encoding
_EXAMPLES = 3  # messages kept per skip reason
_MAX_REMEMBERED = 1 << 16  # image tile counts kept per worker (pairs of one image are usually adjacent)


class LengthIndexError(DataError):
    """The length index cannot be built or read (ranks see different files, a bad cache folder)."""


# ---- where, how many, who ----------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$MPO_CACHE/lengths``, else ``$XDG_CACHE_HOME/mpo/lengths``, else ``~/.cache/mpo/lengths``."""
    if os.environ.get("MPO_CACHE"):
        return Path(os.environ["MPO_CACHE"]) / "lengths"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mpo" / "lengths"


def default_workers() -> int:
    """This machine's CPUs divided by the ranks on it; 0 (in-process) when that leaves one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    per_rank = cpus // max(1, int(local))
    return per_rank if per_rank >= 2 else 0


class _Ranks:
    """This process's place under a launcher (one rank when torch.distributed is not set up)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        # Without LOCAL_RANK every rank counts as its node's first: a missing folder is then
        # written by each rank that cannot see it, never by none.
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank)) if self.on else 0

    def gather(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        parts: list[Any] = [None] * self.world
        self.dist.all_gather_object(parts, obj)
        return parts

    def barrier(self) -> None:
        if self.on:
            self.dist.barrier()


@contextmanager
def launched_group():
    """A gloo process group for a command started by torchrun/deepspeed (``WORLD_SIZE`` > 1), torn
    down on exit; nothing when there is no launcher or a group already exists."""
    import torch.distributed as dist

    start = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if start:
        dist.init_process_group(backend="gloo")
    try:
        yield
        if start:
            dist.barrier()  # every rank done before the group goes (a failed rank: the launcher stops all)
    finally:
        if start:
            dist.destroy_process_group()


# ---- identity ----------------------------------------------------------------------------------


def content_identity(path: Path) -> dict[str, Any]:
    """Size and sha256 of every byte of an annotation file, or of each file of a ``datasets``
    folder (hidden files and ``cache-*`` files that ``datasets`` may write beside the data left out)."""
    path = Path(path)
    if not path.is_dir():
        return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "cache-")))
    return {str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def length_settings(pairs) -> dict[str, Any]:
    """The reference cache's data settings (``mpo.refcache.data_settings``) that change a pair's
    token or tile counts: all but ``max_length`` and ``truncation``, which apply when reading."""
    settings = data_settings(pairs)
    for name in ("max_length", "truncation"):
        settings.pop(name)
    return settings


def file_key(pairs, k: int, settings: dict[str, Any]) -> dict[str, Any]:
    """What dataset ``k``'s lengths depend on (its digest names the cache folder)."""
    spec = pairs.source.specs[k]
    return {
        "format": FORMAT,
        "content": content_identity(spec.annotation),
        "settings": settings,
        "dataset": {
            "root": os.path.normpath(os.path.abspath(spec.root)),
            "tile_budget": tile_budget(spec, pairs.cfg),
        },
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of what differs between two keys (``content.sha256``, ``settings.tokenizer_sha256``)."""
    a, b = _flatten(old), _flatten(new)
    return sorted(name for name in set(a) | set(b) if a.get(name) != b.get(name))


# ---- one record --------------------------------------------------------------------------------


class _Measurer:
    """Lengths of the rows of dataset ``k`` of a ``PairDataset``; runs in worker processes."""

    def __init__(self, pairs, k: int):
        self.spec: DatasetSpec = pairs.source.specs[k]
        self.file = pairs.source.files[k]
        self.template = pairs.encoder.template
        self.tokens_per_tile = pairs.encoder.vision.tokens_per_tile
        self.image_size = pairs.encoder.vision.image_size
        self.cfg = pairs.cfg
        self.budget = tile_budget(self.spec, self.cfg)
        # (path as written, per-image budget, fewest tiles) -> tiles; skips path checks, the header
        # and the grid search for the other pairs of an image. Lives as long as one build.
        self._tiles: dict[tuple[str, int, int], int] = {}

    def __len__(self) -> int:
        return len(self.file)

    @staticmethod
    def header_size(source: Path | bytes, where: str, field: str) -> tuple[int, int]:
        """(width, height) read from the image header; SampleError with the encoder's reasons."""
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                return im.size
        except FileNotFoundError as exc:
            raise SampleError(
                f"{where}: field '{field}': image not found: {source}", "missing_image"
            ) from exc
        except Image.DecompressionBombError as exc:
            raise SampleError(f"{where}: field '{field}': {exc}", "image_too_large") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise SampleError(f"{where}: field '{field}': cannot read image: {exc}", "corrupt_image") from exc

    def image_tiles(self, value: Any, per_image: int, min_num: int, where: str, field: str) -> int:
        """Tiles of one image of a record (``value`` as the record holds it: a path or bytes)."""
        key = (value, per_image, min_num) if isinstance(value, str) else None
        if key is not None and key in self._tiles:
            return self._tiles[key]
        source = media_source(self.spec.root, value, where, field, self.cfg.follow_symlinks_outside_root)
        width, height = self.header_size(source, where, field)
        tiles = count_tiles(width, height, per_image, self.image_size, min_num, self.cfg.use_thumbnail)
        if key is not None:
            if len(self._tiles) >= _MAX_REMEMBERED:
                self._tiles.clear()
            self._tiles[key] = tiles
        return tiles

    def layout(self, obj: dict, where: str) -> tuple[str, list[int], str, str]:
        """(question, tiles per image or frame, chosen, rejected); SampleError when unusable."""
        texts = []
        for key in ("question", "chosen", "rejected"):
            value = obj.get(key)
            if not isinstance(value, str):
                reason = f"missing_{key}" if value is None else f"bad_{key}"
                raise SampleError(f"{where}: field '{key}' must be a string", reason)
            texts.append(value)
        question, chosen, rejected = texts
        kind, _ = media_entries(obj, where)
        fields = media_fields(obj, where)
        if kind == "video":
            from mpo.data.video import header_frame_count

            # The encoder's path checks, then the frame count the container's header announces
            # (no demuxing): an upper bound of the frames the encoder's budget chooses.
            path = resolve_media(
                self.spec.root, fields[0][1], where, "video", self.cfg.follow_symlinks_outside_root
            )
            frames = min(self.cfg.video_max_frames, header_frame_count(path) or self.cfg.video_max_frames)
            try:
                question = expand_video_placeholder(question, frames)
            except TemplateError as exc:
                raise SampleError(f"{where}: field 'question': {exc}", "placeholder_mismatch") from exc
            return question, [1] * frames, chosen, rejected
        tiles = []
        if fields:
            per_image = per_image_budget(self.budget, len(fields))
            min_num = min(self.cfg.min_dynamic_patch, per_image)
            for field, value in fields:
                tiles.append(self.image_tiles(value, per_image, min_num, where, field))
        return question, tiles, chosen, rejected

    @staticmethod
    def expand(question: str, tiles: list[int], tokens_per_tile: int, where: str) -> str:
        """The question with one ``<img>`` + context tokens + ``</img>`` span per image or frame."""
        try:
            return expand_image_placeholders(question, [n * tokens_per_tile for n in tiles])
        except TemplateError as exc:
            raise SampleError(f"{where}: field 'question': {exc}", "placeholder_mismatch") from exc

    def answer_tokens(self, text: str, ids: list[int] | None, where: str) -> int:
        """Tokens of an assistant turn; ``ids`` from the batch tokenizer, or None to ask the template.

        The batch ids stand when they start with the assistant prefix and hold at least one answer
        token; otherwise the template's own rule decides (``TemplateEncoder.encode_answer``).
        """
        prefix = self.template.prefix_ids
        if ids is not None and ids[: len(prefix)] == prefix and len(ids) >= len(prefix) + 2:
            return len(ids)
        try:
            return len(self.template.encode_answer(text)[0])
        except TemplateError as exc:
            raise SampleError(f"{where}: field 'chosen'/'rejected': {exc}", "bad_answer") from exc

    def exact_row(self, obj: dict, where: str) -> tuple[int, int, int, int]:
        """(prompt, chosen, rejected, tiles) by the template's full encoding: the reference path."""
        question, tiles, chosen, rejected = self.layout(obj, where)
        prompt = len(self.template.encode_prompt(self.expand(question, tiles, self.tokens_per_tile, where)))
        return (
            prompt,
            self.answer_tokens(chosen, None, where),
            self.answer_tokens(rejected, None, where),
            sum(tiles),
        )

    # ---- one chunk -----------------------------------------------------------------------------

    def measure(self, start: int, end: int, exact: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
        """Rows ``[start, end)``: ``(LENGTH_DTYPE array, stats)``; stats hold skip reasons, a few
        messages per reason, and whether the chunk fell back to the exact path."""
        out = np.zeros(end - start, LENGTH_DTYPE)
        reasons: Counter = Counter()
        examples: dict[str, list[str]] = {}
        ok: list[tuple[int, str, dict, list[int], str, str, str]] = []
        for j in range(end - start):
            where = f"{self.spec.annotation}:row {start + j + 1}"
            try:
                line_no, obj = self.file.record(start + j)
                where = f"{self.spec.annotation}:{line_no}"
                if exact:
                    out[j] = (*self.exact_row(obj, where), 0)
                    continue
                question, tiles, chosen, rejected = self.layout(obj, where)
                user = user_turn(self.expand(question, tiles, 0, where))  # spans as <img></img>
                ok.append((j, where, obj, tiles, user, chosen, rejected))
            except DataError as exc:
                _skip(out, j, exc, reasons, examples)
        stats = {"skipped": reasons, "examples": examples, "exact_fallback": int(exact)}
        if exact or not ok:
            return out, stats
        users = self._tokenize([u for _, _, _, _, u, _, _ in ok], ids=False)
        answers = self._tokenize([assistant_turn(t) for r in ok for t in r[5:7]])
        fixed = len(self.template.system_ids)
        for k, (j, where, _, tiles, _, chosen, rejected) in enumerate(ok):
            try:
                out[j] = (
                    fixed + users[k] + self.tokens_per_tile * sum(tiles),
                    self.answer_tokens(chosen, answers[2 * k], where),
                    self.answer_tokens(rejected, answers[2 * k + 1], where),
                    sum(tiles),
                    0,
                )
            except DataError as exc:
                _skip(out, j, exc, reasons, examples)
        for j, where, obj, *_ in ok[:CHECKED_PER_CHUNK]:
            batched = tuple(int(out[name][j]) for name in ("prompt", "chosen", "rejected", "tiles"))
            if out["status"][j] == 0 and self.exact_row(obj, where) != batched:
                logger.warning(
                    "%s: batched token counts differ from the template's encoding; chunk recomputed exactly",
                    where,
                )
                return self.measure(start, end, exact=True)
        return out, stats

    def _tokenize(self, texts: list[str], ids: bool = True) -> list[list[int]] | list[int]:
        """Token ids (``ids=False``: counts) of each text, as ``tokenizer(text,
        add_special_tokens=False)`` gives them; each distinct text is tokenized once (MMPR pairs
        share questions and answers: N sampled answers make correct x wrong pairs).

        A fast tokenizer's Rust batch call without offsets skips the Python wrapper's per-text
        work; the per-chunk check against the template catches a wrapper that changes the text.
        """
        distinct = list(dict.fromkeys(texts))
        tokenizer = self.template.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            encodings = backend.encode_batch_fast(distinct, add_special_tokens=False)
            found = [e.ids for e in encodings] if ids else [len(e) for e in encodings]
        else:
            found = tokenizer(distinct, add_special_tokens=False)["input_ids"]
            found = found if ids else [len(x) for x in found]
        by_text = dict(zip(distinct, found))
        return [by_text[t] for t in texts]


def _skip(out: np.ndarray, j: int, exc: DataError, reasons: Counter, examples: dict[str, list[str]]) -> None:
    """Mark row ``j`` as not measurable (lengths 0) and count its reason."""
    out[j] = (0, 0, 0, 0, 1)
    reason = getattr(exc, "reason", "invalid_sample")
    reasons[reason] += 1
    if len(examples.setdefault(reason, [])) < _EXAMPLES:
        examples[reason].append(str(exc))


# ---- computing a file's lengths ----------------------------------------------------------------


class _Chunks(torch.utils.data.Dataset):
    """Work items for DataLoader workers: item ``j`` is chunk ``chunks[j]`` measured."""

    def __init__(self, measurer: _Measurer, chunks: list[tuple[int, int]]):
        self.measurer, self.chunks = measurer, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int):
        start, end = self.chunks[j]
        table, stats = self.measurer.measure(start, end)
        return start, table, stats


def _as_is(item):
    return item


def _worker_init(_: int) -> None:
    # One thread per worker: the workers are the parallelism (tokenizers' Rust pool and torch's
    # intra-op threads would oversubscribe the cores).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)


def _chunks(n: int, rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's chunks: chunk c of ``[0, n)`` (``CHUNK_ROWS`` rows each) goes to rank ``c mod world``."""
    rows = CHUNK_ROWS
    return [(s, min(n, s + rows)) for s in range(rank * rows, n, world * rows)]


def _measured(measurer: _Measurer, chunks: list[tuple[int, int]], workers: int, bar):
    """Yields ``(start, table, stats)`` for each chunk, computed by ``workers`` processes (0: here)."""
    loader = torch.utils.data.DataLoader(
        _Chunks(measurer, chunks),
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
        worker_init_fn=_worker_init if workers else None,
    )
    for start, table, stats in loader:
        bar.update(len(table))
        yield start, table, stats


def _merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    fallback = 0
    for p in parts:
        skipped.update(p["skipped"])
        fallback += p["exact_fallback"]
        for reason, msgs in p["examples"].items():
            kept = examples.setdefault(reason, [])
            kept += msgs[: _EXAMPLES - len(kept)]
    return {"skipped": dict(skipped), "examples": examples, "exact_fallback_chunks": fallback}


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / MANIFEST_NAME
    tmp = _tmp(path)
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    os.replace(tmp, path)  # last: the folder is complete once the manifest is there


def _write_table(folder: Path, table: np.ndarray) -> None:
    path = folder / ARRAY_NAME
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, table)
    os.replace(tmp, path)


def _open(folder: Path, key: dict[str, Any], rows: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The cached table and manifest in ``folder`` when complete and made for ``key``; else None."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        table = np.load(folder / ARRAY_NAME, mmap_mode="r")
    except (OSError, ValueError) as exc:  # a damaged or half-deleted folder: build it again
        logger.warning("%s: cannot read the cached index (%s); rebuilding", folder, exc)
        return None
    if manifest.get("key") != key:
        logger.warning("%s: manifest does not hold this index's key; rebuilding", folder)
        return None
    if table.dtype != LENGTH_DTYPE or table.shape != (rows,):
        logger.warning(
            "%s: %s holds %s %s, expected %d rows; rebuilding",
            folder,
            ARRAY_NAME,
            table.dtype,
            table.shape,
            rows,
        )
        return None
    return table, manifest


def _why_built(cache: Path, key: dict[str, Any], source: str) -> str:
    """Why no cached index fits: what differs from the closest cached index of the same annotation
    path (fewest changed items; the newest among equals)."""
    previous = []
    for manifest in cache.glob(f"*/{MANIFEST_NAME}"):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("source") == source and isinstance(m.get("key"), dict):
            changes = key_changes(m["key"], key)
            previous.append((len(changes), -manifest.stat().st_mtime, changes))
    if not previous:
        return "no index of this file yet"
    changes = min(previous)[2]
    return "changed: " + ", ".join(changes) if changes else "the cached index was unreadable"


def _compute(
    measurer: _Measurer, folder: Path, workers: int, ranks: _Ranks, progress: bool
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Measure every row (this rank's chunks) and write ``lengths.npy`` (rank 0).

    Returns the merged stats and, under a launcher, the whole table (for a node that cannot see
    rank 0's folder); None in one process, where chunks go straight into the mapped file.
    """
    from tqdm import tqdm

    n = len(measurer)
    mine = _chunks(n, ranks.rank, ranks.world)
    bar = tqdm(
        total=sum(e - s for s, e in mine),
        desc=f"length index {measurer.spec.name}"
        + (f" (rank 0's share of {ranks.world})" if ranks.on else ""),
        unit="pairs",
        disable=not (progress and ranks.rank == 0),
    )
    folder.mkdir(parents=True, exist_ok=True)
    stats: list[dict[str, Any]] = []
    with bar:
        if not ranks.on:
            tmp = _tmp(folder / ARRAY_NAME)
            try:
                table = np.lib.format.open_memmap(tmp, mode="w+", dtype=LENGTH_DTYPE, shape=(n,))
                for start, part, st in _measured(measurer, mine, workers, bar):
                    table[start : start + len(part)] = part
                    stats.append(st)
                table.flush()
                del table
                os.replace(tmp, folder / ARRAY_NAME)
            finally:
                tmp.unlink(missing_ok=True)  # an interrupted build leaves no partial file
            return _merge_stats(stats), None
        share = list(_measured(measurer, mine, workers, bar))
    parts = ranks.gather(share)
    table = np.zeros(n, LENGTH_DTYPE)
    for start, part, st in (item for p in parts for item in p):
        table[start : start + len(part)] = part
        stats.append(st)
    if ranks.rank == 0:
        _write_table(folder, table)
    return _merge_stats(stats), table


def _publish_manifest(folder: Path, manifest: dict[str, Any], table, ranks: _Ranks) -> None:
    """Rank 0 writes the manifest; a node that cannot see it (node-local cache) writes its own copy."""
    if ranks.rank == 0:
        _write_manifest(folder, manifest)
    if not ranks.on:
        return
    ranks.barrier()
    if ranks.local_rank == 0 and not (folder / MANIFEST_NAME).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _write_table(folder, table)
        _write_manifest(folder, manifest)
    ranks.barrier()


@dataclass
class FileLengths:
    """One annotation file's cached lengths."""

    spec: DatasetSpec
    table: np.ndarray  # (rows,) LENGTH_DTYPE, memory-mapped
    folder: Path
    manifest: dict[str, Any]
    built: bool  # computed by this call (else reused)
    reason: str | None  # why it was computed


def file_lengths(
    pairs, k: int, cache: Path, workers: int, progress: bool, rebuild: bool, settings: dict[str, Any]
) -> FileLengths:
    """Dataset ``k``'s lengths: reused from ``cache`` when its key matches, else computed and cached.

    Every rank must call it (the hit/miss decision and the build are collective).
    """
    ranks = _Ranks()
    spec = pairs.source.specs[k]
    key = file_key(pairs, k, settings)
    digest = _digest(key)
    digests = ranks.gather(digest)
    if len(set(digests)) > 1:
        raise LengthIndexError(
            f"{spec.annotation}: ranks see different content or settings for this dataset "
            f"(key digests {sorted(set(digests))}); every rank must read the same data"
        )
    folder = cache / f"{Path(spec.annotation).stem}-{digest[:16]}"
    measurer = _Measurer(pairs, k)
    found = None if rebuild else _open(folder, key, len(measurer))
    if all(ranks.gather(found is not None)):
        table, manifest = found
        return FileLengths(spec, table, folder, manifest, built=False, reason=None)
    source = os.path.abspath(spec.annotation)
    reason = "--rebuild" if rebuild else _why_built(cache, key, source)
    started = time.perf_counter()
    stats, table = _compute(measurer, folder, workers, ranks, progress)
    manifest = {
        "format": FORMAT,
        "source": source,
        "key": key,
        "rows": len(measurer),
        **stats,
        "build": {
            "seconds": round(time.perf_counter() - started, 3),
            "ranks": ranks.world,
            "workers_per_rank": workers,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": reason,
        },
    }
    _publish_manifest(folder, manifest, table, ranks)
    table = np.load(folder / ARRAY_NAME, mmap_mode="r")
    return FileLengths(spec, table, folder, manifest, built=True, reason=reason)


# ---- the index of a PairDataset ----------------------------------------------------------------


class LengthIndex:
    """Lengths of every pair of a ``PairDataset`` in its index order (after ``repeat_time``).

    Columns (``prompt``, ``chosen``, ``rejected``, ``tiles``, ``status``) are the memory-mapped
    file arrays themselves for a single dataset read once; with several datasets or repeats they
    are gathered on access (4 bytes per pair). ``files`` says, per dataset, where its index lives
    and whether this call built it.
    """

    def __init__(self, source, files: list[FileLengths]):
        self.source = source
        self.files = files
        self._direct = len(files) == 1 and files[0].spec.repeat_time == 1.0

    def __len__(self) -> int:
        return len(self.source)

    def column(self, name: str) -> np.ndarray:
        """``(N,)`` values of one column in the dataset's index order."""
        return self._per_pair(lambda table: table[name])

    def _per_pair(self, values: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``values(table)`` of every annotation file's table, one value per pair of the dataset, in
        its order (a single file read as it is: no copy)."""
        if self._direct:
            return values(self.files[0].table)
        parts = [values(f.table) for f in self.files]
        out = np.empty(len(self), dtype=parts[0].dtype)
        for k, part in enumerate(parts):
            out[self.source.bounds[k] : self.source.bounds[k + 1]] = part[self.source.rows(k)]
        return out

    @property
    def prompt(self) -> np.ndarray:
        return self.column("prompt")

    @property
    def chosen(self) -> np.ndarray:
        return self.column("chosen")

    @property
    def rejected(self) -> np.ndarray:
        return self.column("rejected")

    @property
    def tiles(self) -> np.ndarray:
        return self.column("tiles")

    @property
    def status(self) -> np.ndarray:
        return self.column("status")

    def pair_tokens(self, max_length: int | None = None) -> np.ndarray:
        """Tokens of each pair's longer sequence, ``prompt + max(chosen, rejected)``, int32 ``(N,)``.

        ``max_length``: cap each value (what ``truncation=truncate_response`` keeps). Records that
        cannot be measured give 0.
        """

        def tokens(t: np.ndarray) -> np.ndarray:
            out = t["prompt"] + np.maximum(t["chosen"], t["rejected"])
            return out if max_length is None else np.minimum(out, max_length, out=out)

        return self._per_pair(tokens)

    def packed_tokens(self, max_length: int, answer_prefix: int) -> np.ndarray:
        """Tokens of each pair in the packed layout ``[prefix | chosen | rejected]`` (``mpo.packing``),
        int32 ``(N,)``: both sequences, each capped at ``max_length``, less the shared prompt and
        assistant prefix (``answer_prefix`` tokens) counted once. An upper bound: the shared prefix
        is the sequences' longest common prefix, at least that long."""

        def tokens(t: np.ndarray) -> np.ndarray:
            prompt = t["prompt"].astype(np.int64)
            both = np.minimum(prompt + t["chosen"], max_length) + np.minimum(
                prompt + t["rejected"], max_length
            )
            out = (both - np.minimum(prompt + answer_prefix, max_length)).astype(np.int32)
            out[t["status"] != 0] = 0  # unmeasured records: the dataset skips or reports them
            return out

        return self._per_pair(tokens)


def length_index(
    pairs,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> LengthIndex:
    """The length index of a ``PairDataset``: reused when cached, else built in parallel and cached.

    Args:
        pairs: the ``PairDataset`` (its tokenizer, vision spec and ``data`` config decide the lengths).
        cache_dir: default ``data.length_cache_dir``, else ``default_cache_dir()``.
        workers: DataLoader worker processes per rank; default ``data.length_workers``, else
            ``default_workers()``; 0 computes in this process.
        progress: a progress bar on rank 0 while building.
        rebuild: recompute even when a cached index matches.

    Under a launcher every rank must call it: ranks split the work and agree on hit or miss.
    """
    cfg = pairs.cfg
    cache = Path(cache_dir or cfg.length_cache_dir or default_cache_dir())
    if workers is None:
        workers = cfg.length_workers if cfg.length_workers is not None else default_workers()
    settings = length_settings(pairs)
    files = [
        file_lengths(pairs, k, cache, workers, progress, rebuild, settings)
        for k in range(len(pairs.source.specs))
    ]
    return LengthIndex(pairs.source, files)


def index_figures(index: LengthIndex, max_length: int) -> dict[str, Any]:
    """What ``mpo data index`` prints: per dataset how it was obtained, skips, then token figures."""
    from mpo.stats import percentiles

    tokens = index.pair_tokens()
    values, counts = np.unique(tokens[index.status == 0], return_counts=True)
    datasets = {}
    for f in index.files:
        m = f.manifest
        datasets[f.spec.name] = {
            "rows": m["rows"],
            "built": f.built,
            "reason": f.reason,
            "build_seconds": m["build"]["seconds"],
            "build_processes": m["build"]["ranks"] * max(1, m["build"]["workers_per_rank"]),
            "skipped": m["skipped"],
            "examples": m["examples"],
            "exact_fallback_chunks": m["exact_fallback_chunks"],
            "folder": str(f.folder),
        }
    return {
        "pairs": len(index),
        "datasets": datasets,
        "tiles": int(index.tiles.sum(dtype=np.int64)),
        "pair_tokens": percentiles(Counter(dict(zip(values.tolist(), counts.tolist())))),
        "over_max_length": int((tokens > max_length).sum()),
        "max_length": max_length,
    }


def format_figures(fig: dict[str, Any], seconds: float) -> str:
    lines = [f"length index: {fig['pairs']} pairs (after repeat_time) in {seconds:.1f} s"]
    for name, d in fig["datasets"].items():
        how = f"built now ({d['reason']})" if d["built"] else "reused"
        lines.append(
            f"  {name}: {d['rows']} rows, {how}; first build {d['build_seconds']:.1f} s on "
            f"{d['build_processes']} process(es); {d['folder']}"
        )
        for reason, count in d["skipped"].items():
            lines.append(f"    cannot be measured: {reason} x{count}, e.g. {d['examples'][reason][0]}")
        if d["exact_fallback_chunks"]:
            lines.append(
                f"    {d['exact_fallback_chunks']} chunk(s) measured by the template's full encoding"
            )
    lines.append(f"  tiles: {fig['tiles']}")
    lines.append(f"  longer sequence per pair (tokens, untruncated): {fig['pair_tokens']}")
    lines.append(f"  pairs over data.max_length={fig['max_length']}: {fig['over_max_length']}")
    return "\n".join(lines)
