"""Reading MMPR meta files and their annotations without loading them into Python lists.

A meta JSON maps dataset names to ``{"root", "annotation", "repeat_time", "max_dynamic_patch",
...}`` (docs/internvl-format.md §4). An annotation (or the ``meta_path`` itself, as a single dataset) may be:

* a JSONL file: indexed by the byte offset of each line (one int64 per line, a numpy array), so
  millions of lines cost megabytes, every sample keeps its exact 1-based line number for error
  messages (blank lines are skipped but still counted), one malformed line stays a per-line error,
  and a line whose ``image`` is a list next to one where it is a string is fine;
* a HF ``datasets`` source with the same columns: a folder written by ``save_to_disk``, an
  ``.arrow`` file or ``.parquet`` file(s). These are opened memory-mapped (Arrow), never copied
  into Python objects; the "line" of a row is its 1-based row number.

* a JSON array file (``.json``, LLaMA-Factory's usual layout): indexed by the byte range of each
  element (``json_array_index``, vectorised, streamed), so it is read like JSONL; an element's
  "line" is the line it starts on.

Records in other projects' preference formats (TRL, LLaMA-Factory, ms-swift) are converted to MMPR
records as they are read (``mpo.data.formats``): a meta entry may name its ``format`` (and, for
LLaMA-Factory, ``formatting``/``columns``/``tags`` as a ``dataset_info.json`` entry does), otherwise
the first readable record decides. A LLaMA-Factory ``dataset_info.json`` can itself be the meta
file: its ``ranking: true`` entries are the datasets, their media under its folder.

Why JSONL is not converted with ``datasets.load_dataset("json")``: the conversion needs one Arrow
schema for the whole file (MMPR mixes ``image`` strings and lists), a single non-JSON line aborts
the whole load instead of being reported with its line number, line numbers are lost, and every
rank would write or lock a cache copy of the file. The offset index gives the same property the
issue asks for (memory flat in the number of lines, nothing parsed until used) without those.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mpo.data.formats import FORMATS, FormatError, LlamaFactoryColumns, RecordReader, describe_fields, detect

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".arrow", ".parquet")
SHORT_LINE = 64  # lines up to this many bytes are checked for being whitespace only


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


@dataclass
class DatasetSpec:
    """One entry of an MMPR meta file."""

    name: str
    root: Path  # images/videos resolve against this folder
    annotation: Path  # JSONL file, or a HF datasets source (folder / .arrow / .parquet)
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    data_augment: bool = False
    length: int | None = None
    format: str | None = None  # one of mpo.data.formats.FORMATS; None: detected from the first record
    llamafactory: LlamaFactoryColumns | None = None  # a dataset_info.json entry's columns/tags


def is_table_source(path: Path) -> bool:
    """Whether ``path`` is a HF ``datasets`` source rather than a JSONL file."""
    return path.is_dir() or path.suffix in TABLE_SUFFIXES


def read_meta(path: str | Path) -> list[DatasetSpec]:
    """Parse an MMPR meta JSON, or treat a JSONL file / HF datasets source as one dataset.

    Relative ``root`` and ``annotation`` paths resolve against the meta file's folder, so a meta
    file and its data can be moved together; when the annotation is not found there, both resolve
    against the working directory instead (InternVL's rule, used by its published meta files).
    """
    path = Path(path)
    if path.is_dir() or (path.is_file() and path.suffix in (".jsonl", *TABLE_SUFFIXES)):
        return [DatasetSpec(name=path.stem, root=path.parent, annotation=path)]
    if not path.is_file():
        raise DataError(f"{path}: meta file not found")
    if json_file_kind(path) != "object":  # a JSON array or JSON Lines named .json: one dataset
        return [DatasetSpec(name=path.stem, root=path.parent, annotation=path)]

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                # json.loads would keep only the last one, dropping a dataset without a word.
                raise DataError(f"{path}: dataset name '{key}' appears twice; names must be unique")
            seen[key] = value
        return seen

    try:
        meta = json.loads(path.read_text(), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(meta, dict) or not meta:
        raise DataError(f"{path}: a meta file maps dataset names to {{root, annotation, ...}} entries")
    if all(isinstance(e, dict) and "annotation" not in e for e in meta.values()) and any(
        isinstance(e, dict) and ("file_name" in e or "hf_hub_url" in e) for e in meta.values()
    ):
        return dataset_info_specs(path, meta)
    return [_spec(path, name, entry) for name, entry in meta.items()]


def json_file_kind(path: Path) -> str:
    """``array``, ``lines`` or ``object``: what a ``.json`` file holds (read from its start only).

    A file whose first line is a whole JSON object with more content after it is JSON Lines (as
    ``datasets``' json loader, and with it LLaMA-Factory and ms-swift, read it); a single-line file
    is JSON Lines unless its object's values are all objects (a one-line meta file).
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        first = head.lstrip()[:1]
        if first == b"[":
            # "[]" holds no dataset; read_meta then says what a meta file should hold.
            return "object" if head.lstrip()[1:].lstrip()[:1] == b"]" else "array"
        if first != b"{":
            return "object"  # not JSON at all: read_meta reports it
        f.seek(0)
        line = f.readline()
        rest = f.read(1 << 12).strip()
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "object"  # a pretty-printed object spans lines: a meta file
    if rest:
        return "lines"
    return (
        "object"
        if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values())
        else "lines"
    )


def dataset_info_specs(path: Path, info: dict[str, Any]) -> list[DatasetSpec]:
    """The preference datasets of a LLaMA-Factory ``dataset_info.json`` (its ``ranking: true`` entries).

    Files are ``file_name`` under the file's folder, and so is media (LLaMA-Factory's ``media_dir``
    defaults to its ``dataset_dir``). Hub entries are refused: nothing is downloaded.
    """
    specs, left_out = [], []
    for name, entry in info.items():
        where = f"{path}: dataset '{name}'"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: entry must be an object")
        if not entry.get("ranking"):
            left_out.append(name)
            continue
        if "file_name" not in entry:
            hub = next(
                (k for k in ("hf_hub_url", "ms_hub_url", "script_url", "cloud_file_name") if k in entry), None
            )
            raise DataError(
                f"{where}: no 'file_name'"
                + (f" ({hub} datasets are not downloaded: download it and set file_name)" if hub else "")
            )
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt", "openai"):
            raise DataError(
                f"{where}: field 'formatting' must be alpaca, sharegpt or openai, got {formatting!r}"
            )
        for key in ("columns", "tags"):
            if key in entry and not isinstance(entry[key], dict):
                raise DataError(f"{where}: field '{key}' must be an object")
        annotation = path.parent / str(entry["file_name"])
        if not annotation.exists():
            raise DataError(f"{where}: field 'file_name': file not found: {annotation}")
        specs.append(
            DatasetSpec(
                name=name,
                root=path.parent,
                annotation=annotation,
                format="llamafactory",
                llamafactory=LlamaFactoryColumns.from_entry(entry),
            )
        )
    if not specs:
        raise DataError(
            f'{path}: no preference dataset: no entry has "ranking": true (entries: {", ".join(info)})'
        )
    if left_out:
        logger.warning(
            '%s: leaving out entries without "ranking": true (not preference data): %s',
            path,
            ", ".join(left_out),
        )
    return specs


def _spec(meta_path: Path, name: str, entry: Any) -> DatasetSpec:
    where = f"{meta_path}: dataset '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry must be an object")
    if "annotation" not in entry:
        raise DataError(f"{where}: missing field 'annotation'")
    types = {"root": str, "annotation": str, "data_augment": bool, "length": int}
    for key, kind in types.items():
        value = entry.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise DataError(
                f"{where}: field '{key}' must be {'a string' if kind is str else kind.__name__}, "
                f"got {value!r} ({type(value).__name__})"
            )
    base = meta_path.parent
    root = base / str(entry.get("root", ""))
    annotation = base / str(entry["annotation"])
    if not annotation.exists():
        # InternVL's own meta files are relative to the working directory it is launched from.
        from_cwd = Path(str(entry["annotation"]))
        if not from_cwd.exists():
            raise DataError(
                f"{where}: field 'annotation': file not found: {annotation} (relative to the meta file) "
                f"or {from_cwd.resolve()} (relative to the working directory, InternVL's rule)"
            )
        annotation, root = from_cwd.resolve(), Path(str(entry.get("root", ""))).resolve()
    repeat = entry.get("repeat_time", 1.0)
    if not isinstance(repeat, (int, float)) or isinstance(repeat, bool) or repeat <= 0:
        raise DataError(f"{where}: field 'repeat_time' must be a positive number, got {repeat!r}")
    fmt = entry.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{where}: field 'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")
    lf_keys = [k for k in ("formatting", "columns", "tags") if k in entry]
    if lf_keys and fmt != "llamafactory":
        raise DataError(f'{where}: field(s) {", ".join(lf_keys)} need "format": "llamafactory"')
    for key in ("columns", "tags"):
        if key in entry and not isinstance(entry[key], dict):
            raise DataError(f"{where}: field '{key}' must be an object")
    llamafactory = None
    if lf_keys:
        llamafactory = LlamaFactoryColumns.from_entry(entry)
        if "formatting" not in entry:  # unlike dataset_info.json, detect sharegpt vs alpaca per record
            llamafactory = LlamaFactoryColumns(None, llamafactory.columns, llamafactory.tags)
    mdp = entry.get("max_dynamic_patch")
    if mdp is not None and (not isinstance(mdp, int) or isinstance(mdp, bool) or mdp < 1):
        raise DataError(f"{where}: field 'max_dynamic_patch' must be a positive integer, got {mdp!r}")
    return DatasetSpec(
        name=name,
        root=root,
        annotation=annotation,
        repeat_time=float(repeat),
        max_dynamic_patch=mdp,
        data_augment=bool(entry.get("data_augment", False)),
        length=entry.get("length"),
        format=fmt,
        llamafactory=llamafactory,
    )


class LineError(DataError):
    """A line that cannot be read at all; carries the skip ``reason`` and the ``line`` number."""

    def __init__(self, message: str, reason: str, line: int):
        super().__init__(message)
        self.reason = reason
        self.line = line


def _json_object(raw: bytes, path, line_no: int, what: str) -> dict[str, Any]:
    """``raw`` parsed as a JSON object; a ``LineError`` naming ``path:line_no`` otherwise."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LineError(f"{path}:{line_no}: not valid JSON ({exc})", "invalid_json", line_no) from exc
    if not isinstance(obj, dict):
        raise LineError(
            f"{path}:{line_no}: {what} must be a JSON object, got {type(obj).__name__}",
            "invalid_json",
            line_no,
        )
    return obj


class RecordSource(Protocol):
    path: Path

    def __len__(self) -> int: ...

    def record(self, i: int) -> tuple[int, dict[str, Any]]: ...


def line_offsets(path: Path, chunk_bytes: int = 1 << 20) -> np.ndarray:
    """Start offset of every line of ``path`` plus the file size: int64 ``(num_lines + 1,)``.

    Line ``k`` (0-based) is ``bytes[off[k]:off[k+1]]`` including its newline. Streamed in chunks,
    so indexing needs memory for the offsets only.
    """
    starts: list[np.ndarray] = [np.zeros(1, np.int64)]
    pos = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            starts.append(newlines.astype(np.int64) + pos + 1)
            pos += len(chunk)
    offsets = np.concatenate(starts)
    if offsets[-1] != pos:  # last line has no trailing newline
        offsets = np.append(offsets, np.int64(pos))
    return offsets


class JsonlFile:
    """Random access to the non-blank lines of a JSONL file; keeps 1-based line numbers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offsets = line_offsets(self.path)
        lengths = np.diff(self.offsets)
        # A blank line is "\n", "\r\n" or only whitespace; keep it out of the samples but in the numbering. The
        # row map is only built when there are blank lines in the middle (rare), to stay 8 B/line.
        blank = lengths <= 1
        # Short lines ("\r\n", spaces, a tab) are checked by content; a JSON object needs "{}".
        short = np.flatnonzero((lengths >= 2) & (lengths <= SHORT_LINE))
        if len(short):
            with open(self.path, "rb") as f:
                for k in short:
                    start, size = int(self.offsets[k]), int(lengths[k])
                    blank[k] = os.pread(f.fileno(), size, start).strip() == b""
        self.rows = None if not blank.any() else np.flatnonzero(~blank).astype(np.int64)
        self._fh = None
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.rows is None else len(self.rows)

    def __getstate__(self):  # file handles do not cross process boundaries (dataloader workers)
        state = dict(self.__dict__)
        state["_fh"] = None
        return state

    def raw(self, i: int) -> tuple[int, bytes]:
        """(1-based line number, the line's bytes without the newline)."""
        k = i if self.rows is None else int(self.rows[i])
        # pread, not seek + read: DataLoader workers forked after the main process opened the
        # file share its offset, and interleaved seeks would hand one worker another's line.
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        start, end = int(self.offsets[k]), int(self.offsets[k + 1])
        return k + 1, os.pread(self._fh.fileno(), end - start, start).rstrip(b"\r\n")

    def record(self, i: int) -> tuple[int, dict[str, Any]]:
        """(1-based line number, parsed JSON object); DataError naming file and line otherwise."""
        line_no, raw = self.raw(i)
        obj = _json_object(raw, self.path, line_no, "a line")
        return line_no, obj


class TableFile:
    """Rows of a HF ``datasets`` source, memory-mapped Arrow; row ``i`` reports line ``i + 1``."""

    def __init__(self, path: Path):
        import datasets

        self.path = Path(path)
        try:
            if self.path.is_dir():
                shards = sorted(self.path.rglob("*.parquet"))
                if (
                    (self.path / "state.json").is_file()
                    or (self.path / "dataset_dict.json").is_file()
                    or not shards
                ):
                    ds = datasets.load_from_disk(str(self.path))
                else:  # a folder of parquet shards, as on the hub (train-00000-of-00004.parquet, ...)
                    ds = datasets.Dataset.from_parquet([str(p) for p in shards])
                if isinstance(ds, datasets.DatasetDict):
                    raise DataError(
                        f"{self.path}: a DatasetDict; point at one split's folder (one of {list(ds)})"
                    )
            elif self.path.suffix == ".arrow":
                ds = datasets.Dataset.from_file(str(self.path))  # maps the file, no copy
            else:  # parquet: converted once into the datasets cache, then memory-mapped
                ds = datasets.Dataset.from_parquet(str(self.path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(
                f"{self.path}: not a readable HF datasets source (a save_to_disk folder, a folder of "
                f".parquet files, one .parquet or .arrow file): {exc}"
            ) from exc
        self.table = ds
        # Rows as stored: Image columns stay {bytes, path} and are decoded by the pair encoder,
        # exactly as files are (datasets' own decoding would apply EXIF rotation, InternVL does not).
        self._raw = ds.with_format("arrow")

    def __len__(self) -> int:
        return len(self.table)

    def record(self, i: int) -> tuple[int, dict[str, Any]]:
        # Arrow fills keys a row lacks with None; the pair encoder treats None as absent.
        return i + 1, self._raw[int(i)].to_pylist()[0]


def json_array_index(path: Path, chunk_bytes: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges and start lines of the elements of a top-level JSON array, without parsing them.

    Streams the file in chunks and finds, with numpy, the quotes that open or close strings (those
    after an even run of backslashes), the brackets and commas outside strings, and among them the
    commas and the closing bracket at depth 1, which end elements. Memory: one chunk plus 24 bytes
    per element; elements are parsed (and reported bad, one by one) only when read.

    Returns:
        (ranges ``(n, 2)`` int64 of ``[start, end)`` byte offsets, lines ``(n,)`` int64: the 1-based
        line of each range's first byte).

    Raises:
        DataError: the file is not one JSON array (unbalanced brackets or quotes, text after it).
    """
    starts: list[int] = []
    ends: list[int] = []
    lines: list[int] = []
    in_str, backslashes, depth, pos, line = False, 0, 0, 0, 1
    pending: tuple[int, int] | None = None  # (byte, line) where the current element starts
    closed_at = None
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            b = np.frombuffer(chunk, dtype=np.uint8)
            n = len(b)
            idx = np.arange(n)
            last_plain = np.maximum.accumulate(np.where(b == 92, -1, idx))  # last non-backslash so far
            quotes = np.flatnonzero(b == 34)
            prev = last_plain[np.maximum(quotes - 1, 0)]
            run = np.where(quotes == 0, 0, quotes - 1 - prev)  # backslashes right before each quote
            run = np.where(
                (quotes == 0) | (prev < 0), quotes + backslashes, run
            )  # continued from the last chunk
            marks = np.zeros(n, np.int64)
            marks[quotes[run % 2 == 0]] = 1  # quotes that open or close a string
            before = np.cumsum(marks) - marks
            outside = ((before + int(in_str)) % 2 == 0) & (marks == 0)
            nl = np.cumsum(b == 10)
            opens = outside & ((b == 91) | (b == 123))
            closes = outside & ((b == 93) | (b == 125))
            event = np.flatnonzero(opens | closes | (outside & (b == 44)))
            step = opens[event].astype(np.int64) - closes[event].astype(np.int64)
            depth_before = depth + np.cumsum(step) - step
            # Only the top level matters: the array's own brackets and the commas between elements.
            top = (depth_before <= 1) & ~((step == 1) & (depth_before == 1))
            for p, k, d in zip(event[top].tolist(), step[top].tolist(), depth_before[top].tolist()):
                at = pos + p
                if closed_at is not None or (k == -1 and d <= 0):
                    raise DataError(
                        f"{path}: unbalanced brackets or text after the top-level array (byte {at})"
                    )
                if k == 1:  # depth 0 -> 1: the array opens
                    if b[p] != 91:
                        raise DataError(f"{path}: not a JSON array (byte {at})")
                    pending = (at + 1, line + int(nl[p]))
                    continue
                if b[p] == 125:
                    raise DataError(f"{path}: unbalanced '}}' at byte {at}")
                if pending is not None:
                    starts.append(pending[0])
                    ends.append(at)
                    lines.append(pending[1])
                pending = (at + 1, line + int(nl[p])) if k == 0 else None
                closed_at = at if k == -1 else None
            depth += int(step.sum())
            in_str = bool((int(marks.sum()) + int(in_str)) % 2)
            tail = n - 1 - int(last_plain[-1])
            backslashes = tail + (backslashes if tail == n else 0)
            line += int(nl[-1])
            pos += n
        if closed_at is None or in_str:
            raise DataError(f"{path}: the top-level JSON array is not closed (file cut short?)")
        f.seek(closed_at + 1)
        if f.read(1 << 16).strip():
            raise DataError(f"{path}: text after the top-level JSON array (byte {closed_at + 1})")
    return np.asarray([starts, ends], dtype=np.int64).T.reshape(-1, 2), np.asarray(lines, dtype=np.int64)


class JsonArrayFile:
    """Random access to the elements of a top-level JSON array; "line" is where an element starts."""

    def __init__(self, path: Path):
        self.path = Path(path)
        ranges, lines = json_array_index(self.path)
        # "[]" and a trailing comma leave an all-whitespace range: not an element.
        keep = np.ones(len(ranges), bool)
        with open(self.path, "rb") as f:
            for k in np.flatnonzero(ranges[:, 1] - ranges[:, 0] <= SHORT_LINE):
                keep[k] = (
                    os.pread(f.fileno(), int(ranges[k, 1] - ranges[k, 0]), int(ranges[k, 0])).strip() != b""
                )
        self.ranges, self.lines = ranges[keep], lines[keep]
        self._fh = None
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.ranges)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"] = None
        return state

    def record(self, i: int) -> tuple[int, dict[str, Any]]:
        """(1-based line the element starts on, parsed object); LineError naming file and line otherwise."""
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        start, end = int(self.ranges[i, 0]), int(self.ranges[i, 1])
        raw = os.pread(self._fh.fileno(), end - start, start)
        stripped = raw.lstrip()
        line_no = int(self.lines[i]) + raw[: len(raw) - len(stripped)].count(b"\n")
        obj = _json_object(stripped, self.path, line_no, "an element")
        return line_no, obj


def open_source(path: Path) -> RecordSource:
    if is_table_source(path):
        return TableFile(path)
    if path.suffix == ".json" and json_file_kind(path) == "array":
        return JsonArrayFile(path)
    return JsonlFile(path)


DETECT_RECORDS = 16  # readable records looked at to detect a dataset's format


class FormattedSource:
    """A dataset in another project's format: its records converted to MMPR records as they are read."""

    def __init__(self, inner: RecordSource, reader: RecordReader):
        self.inner = inner
        self.reader = reader
        self.path = inner.path

    def __len__(self) -> int:
        return len(self.inner)

    def record(self, i: int) -> tuple[int, dict[str, Any]]:
        line_no, obj = self.inner.record(i)
        try:
            return line_no, self.reader.convert(obj)
        except FormatError as exc:
            raise LineError(
                f"{self.path}:{line_no}: {exc} ({self.reader.format} record)", exc.reason, line_no
            ) from exc


def detect_format(source: RecordSource) -> str:
    """The format of ``source``'s first readable record (MMPR when none of the first few is readable:
    their lines then fail one by one, naming the problem)."""
    for i in range(min(len(source), DETECT_RECORDS)):
        try:
            line_no, obj = source.record(i)
        except LineError:
            continue
        fmt = detect(obj)
        if fmt is None:
            raise DataError(
                f"{source.path}:{line_no}: not a preference record in a known format: {describe_fields(obj)}"
            )
        return fmt
    return "mmpr"


def open_dataset(spec: DatasetSpec) -> tuple[RecordSource, str]:
    """A dataset's records as MMPR records, and the format they were read from."""
    source = open_source(spec.annotation)
    fmt = spec.format or detect_format(source)
    if fmt == "mmpr":
        return source, fmt
    return FormattedSource(source, RecordReader(fmt, spec.llamafactory)), fmt


def repeat_indices(n: int, repeat_time: float, seed: int) -> np.ndarray:
    """Row indices after ``repeat_time``: whole repeats plus a seeded subsample for the fraction.

    InternVL (``internvl_chat_mpo.py``) samples ``int(n * r)`` rows when r < 1 and repeats
    ``int(r)`` times when r > 1 (dropping a fraction such as the .5 of 1.5); we keep the fraction
    as a subsample, so 1.5 means every row once plus half of them again.
    """
    whole = math.floor(repeat_time)
    frac = repeat_time - whole
    parts = [np.arange(n, dtype=np.int64)] * whole
    if frac > 0:
        k = int(n * frac)
        rng = np.random.default_rng(seed)
        parts.append(np.sort(rng.permutation(n)[:k]).astype(np.int64))
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


class MixedSource:
    """All datasets of a meta file as one indexable sequence of (dataset, row) references.

    Memory: per dataset, only the subsample of a fractional ``repeat_time`` is stored (int64 per
    kept row); whole repeats are computed from the index.
    """

    def __init__(self, specs: list[DatasetSpec], seed: int = 42):
        self.specs = specs
        opened = [open_dataset(s) for s in specs]
        self.files = [source for source, _ in opened]
        self.formats = [fmt for _, fmt in opened]  # what each dataset was read as
        self._whole: list[int] = []
        self._extra: list[np.ndarray] = []
        sizes = []
        for k, (spec, f) in enumerate(zip(self.specs, self.files)):
            n = len(f)
            whole = math.floor(spec.repeat_time)
            extra = (
                repeat_indices(n, spec.repeat_time - whole, seed + k) if spec.repeat_time != whole else None
            )
            self._whole.append(whole)
            self._extra.append(extra if extra is not None else np.empty(0, np.int64))
            sizes.append(whole * n + len(self._extra[-1]))
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.bounds = np.concatenate(([0], np.cumsum(self.sizes))).astype(np.int64)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Global index -> (dataset number, row in its file)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        k = int(np.searchsorted(self.bounds, i, side="right")) - 1
        local = i - int(self.bounds[k])
        n = len(self.files[k])
        if local < self._whole[k] * n:
            return k, local % n
        return k, int(self._extra[k][local - self._whole[k] * n])

    def rows(self, k: int) -> np.ndarray:
        """File rows of dataset ``k`` in the order of its global indices: int64 ``(sizes[k],)``,
        ``rows(k)[j] == locate(bounds[k] + j)[1]`` (whole repeats, then the subsample)."""
        n = len(self.files[k])
        return np.concatenate([np.tile(np.arange(n, dtype=np.int64), self._whole[k]), self._extra[k]])

    def get(self, i: int) -> tuple[DatasetSpec, int, dict[str, Any]]:
        """(spec, 1-based line number, parsed record); raises LineError for an unreadable line."""
        k, row = self.locate(i)
        line_no, obj = self.files[k].record(row)
        return self.specs[k], line_no, obj

    def counts(self) -> dict[str, int]:
        """Samples per dataset after repeat_time."""
        out: dict[str, int] = {}
        for spec, size in zip(self.specs, self.sizes):
            out[spec.name] = out.get(spec.name, 0) + int(size)
        return out
