"""Reading MMPR meta files and their JSONL annotations without loading them into memory.

A meta JSON maps dataset names to ``{"root", "annotation", "repeat_time", "max_dynamic_patch",
...}`` (facts §4). Annotation files are indexed by the byte offset of each line (8 bytes per
line, a numpy array), so millions of lines cost megabytes, every sample keeps its 1-based line
number for error messages, and any line can be read by seeking.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


@dataclass
class DatasetSpec:
    """One entry of an MMPR meta file."""

    name: str
    root: Path  # images/videos resolve against this folder
    annotation: Path  # JSONL file
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    data_augment: bool = False
    length: int | None = None


def read_meta(path: str | Path) -> list[DatasetSpec]:
    """Parse an MMPR meta JSON (or treat a ``.jsonl`` file as a single dataset).

    Relative ``root`` and ``annotation`` paths resolve against the meta file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: meta file not found")
    if path.suffix == ".jsonl":
        return [DatasetSpec(name=path.stem, root=path.parent, annotation=path)]
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(meta, dict) or not meta:
        raise DataError(f"{path}: a meta file maps dataset names to {{root, annotation, ...}} entries")
    specs = []
    base = path.parent
    for name, entry in meta.items():
        where = f"{path}: dataset '{name}'"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: entry must be an object")
        if "annotation" not in entry:
            raise DataError(f"{where}: missing field 'annotation'")
        root = base / str(entry.get("root", ""))
        annotation = base / str(entry["annotation"])
        if not annotation.is_file():
            raise DataError(f"{where}: field 'annotation': file not found: {annotation}")
        repeat = entry.get("repeat_time", 1.0)
        if not isinstance(repeat, (int, float)) or isinstance(repeat, bool) or repeat <= 0:
            raise DataError(f"{where}: field 'repeat_time' must be a positive number, got {repeat!r}")
        mdp = entry.get("max_dynamic_patch")
        if mdp is not None and (not isinstance(mdp, int) or isinstance(mdp, bool) or mdp < 1):
            raise DataError(f"{where}: field 'max_dynamic_patch' must be a positive integer, got {mdp!r}")
        specs.append(
            DatasetSpec(
                name=name,
                root=root,
                annotation=annotation,
                repeat_time=float(repeat),
                max_dynamic_patch=mdp,
                data_augment=bool(entry.get("data_augment", False)),
                length=entry.get("length"),
            )
        )
    return specs


def index_lines(path: Path, chunk_bytes: int = 1 << 22) -> np.ndarray:
    """Byte offsets of every non-empty line of ``path`` (int64, one per line), streamed in chunks."""
    offsets: list[np.ndarray] = []
    pos = 0
    line_start = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            arr = np.frombuffer(chunk, dtype=np.uint8)
            newlines = np.flatnonzero(arr == 10) + pos
            starts = np.concatenate(([line_start], newlines[:-1] + 1)) if len(newlines) else np.empty(0, np.int64)
            offsets.append(np.stack([starts, newlines], 1) if len(newlines) else np.empty((0, 2), np.int64))
            if len(newlines):
                line_start = int(newlines[-1]) + 1
            pos += len(chunk)
        if line_start < pos:  # last line without a trailing newline
            offsets.append(np.array([[line_start, pos]], dtype=np.int64))
    spans = np.concatenate(offsets) if offsets else np.empty((0, 2), np.int64)
    return spans.astype(np.int64)


class JsonlFile:
    """Random access to the lines of a JSONL file by 0-based index; keeps 1-based line numbers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        spans = index_lines(self.path)
        # Keep blank lines out of the sample list but their numbers in the count.
        self.line_numbers = np.arange(1, len(spans) + 1, dtype=np.int64)
        keep = spans[:, 1] > spans[:, 0]
        self.spans = spans[keep]
        self.line_numbers = self.line_numbers[keep]
        self._fh = None

    def __len__(self) -> int:
        return len(self.spans)

    def __getstate__(self):  # file handles do not cross process boundaries (dataloader workers)
        state = dict(self.__dict__)
        state["_fh"] = None
        return state

    def raw(self, i: int) -> tuple[int, bytes]:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        start, end = self.spans[i]
        self._fh.seek(int(start))
        return int(self.line_numbers[i]), self._fh.read(int(end - start))

    def record(self, i: int) -> tuple[int, dict[str, Any]]:
        """(1-based line number, parsed JSON object); DataError naming file and line otherwise."""
        line_no, raw = self.raw(i)
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.path}:{line_no}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{self.path}:{line_no}: a line must be a JSON object, got {type(obj).__name__}")
        return line_no, obj


def repeat_indices(n: int, repeat_time: float, seed: int) -> np.ndarray:
    """Line indices after ``repeat_time``: whole repeats plus a seeded subsample for the fraction."""
    whole = math.floor(repeat_time)
    frac = repeat_time - whole
    parts = [np.arange(n, dtype=np.int64)] * whole
    if frac > 0:
        k = int(n * frac)
        rng = np.random.default_rng(seed)
        parts.append(np.sort(rng.permutation(n)[:k]).astype(np.int64))
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


class MixedSource:
    """All datasets of a meta file as one indexable list of (dataset, line) references."""

    def __init__(self, specs: list[DatasetSpec], seed: int = 42):
        self.specs = specs
        self.files = [JsonlFile(s.annotation) for s in specs]
        ds_ids, line_ids = [], []
        for k, (spec, f) in enumerate(zip(self.specs, self.files)):
            idx = repeat_indices(len(f), spec.repeat_time, seed + k)
            ds_ids.append(np.full(len(idx), k, dtype=np.int32))
            line_ids.append(idx)
        self.dataset_ids = np.concatenate(ds_ids) if ds_ids else np.empty(0, np.int32)
        self.line_ids = np.concatenate(line_ids) if line_ids else np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.line_ids)

    def get(self, i: int) -> tuple[DatasetSpec, int, dict[str, Any]]:
        k = int(self.dataset_ids[i])
        line_no, obj = self.files[k].record(int(self.line_ids[i]))
        return self.specs[k], line_no, obj

    def counts(self) -> dict[str, int]:
        """Samples per dataset after repeat_time."""
        ids, n = np.unique(self.dataset_ids, return_counts=True)
        return {self.specs[int(k)].name: int(c) for k, c in zip(ids, n)}
