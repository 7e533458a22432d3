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

Why JSONL is not converted with ``datasets.load_dataset("json")``: the conversion needs one Arrow
schema for the whole file (MMPR mixes ``image`` strings and lists), a single non-JSON line aborts
the whole load instead of being reported with its line number, line numbers are lost, and every
rank would write or lock a cache copy of the file. The offset index gives the same property the
issue asks for (memory flat in the number of lines, nothing parsed until used) without those.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

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
    return [_spec(path, name, entry) for name, entry in meta.items()]


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
    )


class LineError(DataError):
    """A line that cannot be read at all; carries the skip ``reason`` and the ``line`` number."""

    def __init__(self, message: str, reason: str, line: int):
        super().__init__(message)
        self.reason = reason
        self.line = line


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
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LineError(
                f"{self.path}:{line_no}: not valid JSON ({exc})", "invalid_json", line_no
            ) from exc
        if not isinstance(obj, dict):
            raise LineError(
                f"{self.path}:{line_no}: a line must be a JSON object, got {type(obj).__name__}",
                "invalid_json",
                line_no,
            )
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


def open_source(path: Path) -> RecordSource:
    return TableFile(path) if is_table_source(path) else JsonlFile(path)


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
        self.files = [open_source(s.annotation) for s in specs]
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
