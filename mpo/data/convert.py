"""``mpo data convert --from FORMAT IN OUT``: another project's preference data as MMPR files.

Writes ``OUT/meta.json`` and one ``OUT/<dataset>.jsonl`` per dataset, each line the MMPR record the
trainer would read from ``IN`` directly (``mpo.data.formats``), so training on ``OUT`` and on ``IN``
gives the same pairs. Image paths are rewritten relative to one root per dataset (the deepest
folder holding every image, written as the meta entry's ``root``); images stored inside the data
(HF ``Image`` bytes, base64 data URLs) are written to ``OUT/images/<dataset>/`` in their own
encoding. Two passes over the records: the first finds the root, the second writes; memory
stays flat in the number of records.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mpo.data.formats import FORMATS, RecordReader
from mpo.data.mmpr import DataError, DatasetSpec, FormattedSource, LineError, open_source, read_meta

MEDIA_KEYS = ("image", "video")


@dataclass
class ConvertReport:
    """What one conversion wrote and skipped."""

    meta_path: Path
    written: dict[str, int] = field(default_factory=dict)  # dataset -> lines written
    skipped: Counter = field(default_factory=Counter)  # reason -> records
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first message


def source_specs(path: Path, fmt: str, root: Path | None = None) -> list[DatasetSpec]:
    """The datasets of ``path`` read as ``fmt``: a data file or folder, or a LLaMA-Factory
    ``dataset_info.json`` (its ``ranking: true`` entries); ``root``: where relative media resolve."""
    if fmt not in FORMATS or fmt == "mmpr":
        raise DataError(f"--from must be one of {', '.join(f for f in FORMATS if f != 'mmpr')}, got {fmt!r}")
    specs = read_meta(path)
    out = []
    for spec in specs:
        if spec.format not in (None, fmt):
            raise DataError(f"{path}: dataset '{spec.name}' is declared as {spec.format}, not {fmt}")
        out.append(dataclasses.replace(spec, format=fmt, root=root if root is not None else spec.root))
    return out


def _media_values(record: dict) -> list[tuple[str, int, Any]]:
    """(key, position, value) of each image/video of an MMPR record (position -1: a single value)."""
    out = []
    for key in MEDIA_KEYS:
        value = record.get(key)
        if isinstance(value, list):
            out += [(key, k, v) for k, v in enumerate(value)]
        elif value is not None:
            out.append((key, -1, value))
    return out


def _where_file(root: Path, value: Any) -> str | None:
    """The absolute, normalised file a media value names; None for embedded bytes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return None
        value = value["path"]
    if os.path.isabs(value):
        return os.path.normpath(value)
    return os.path.normpath(os.path.join(os.path.abspath(root), value))


def _escapes(root: Path, value: Any) -> bool:
    """A relative string path outside its root (the reader refuses those, so the converter does too)."""
    if not isinstance(value, str) or os.path.isabs(value):
        return False
    base = os.path.normpath(os.path.abspath(root))
    return os.path.commonpath([base, os.path.normpath(os.path.join(base, value))]) != base


def _records(source: FormattedSource, spec: DatasetSpec, report: ConvertReport, on_bad: str):
    """(line, MMPR record) of every readable record; bad ones raise or are counted."""
    for i in range(len(source)):
        try:
            line, record = source.record(i)
            bad = next((v for _, _, v in _media_values(record) if _escapes(spec.root, v)), None)
            if bad is not None:
                raise LineError(
                    f"{source.path}:{line}: media path '{bad}' escapes the dataset root {spec.root}",
                    "path_escapes_root",
                    line,
                )
        except LineError as exc:
            if on_bad == "error":
                raise
            report.skipped[exc.reason] += 1
            report.examples.setdefault(exc.reason, str(exc))
            continue
        yield line, record


def _image_suffix(data: bytes, where: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = (im.format or "png").lower()
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{where}: embedded image bytes cannot be decoded ({exc})") from exc
    return {"jpeg": "jpg"}.get(kind, kind)


def convert_dataset(spec: DatasetSpec, out_dir: Path, report: ConvertReport, on_bad: str = "error") -> dict:
    """Write ``out_dir/<name>.jsonl`` for one dataset; returns its meta entry."""
    source = FormattedSource(open_source(spec.annotation), RecordReader(spec.format, spec.llamafactory))
    image_dir = out_dir / "images" / spec.name
    # Pass 1: the deepest folder holding every file the records name.
    folders, embedded = set(), False
    # (bad records are passed over here; pass 2 stops at them or counts them)
    for _, record in _records(source, spec, ConvertReport(report.meta_path), "skip"):
        for _, _, value in _media_values(record):
            path = _where_file(spec.root, value)
            embedded = embedded or path is None
            if path is not None:
                folders.add(os.path.dirname(path))
    if embedded:
        folders.add(os.path.abspath(image_dir))
    root = Path(os.path.commonpath(sorted(folders))) if folders else out_dir.resolve()
    # Pass 2: the lines, paths relative to that root; embedded images become files.
    lines = 0
    with open(out_dir / f"{spec.name}.jsonl", "w", encoding="utf-8") as f:
        for line, record in _records(source, spec, report, on_bad):
            out = dict(record)
            for key, k, value in _media_values(record):
                path = _where_file(spec.root, value)
                if path is None:
                    data = value["bytes"]
                    image_dir.mkdir(parents=True, exist_ok=True)
                    name = f"{line}_{max(k, 0)}.{_image_suffix(data, f'{source.path}:{line}')}"
                    (image_dir / name).write_bytes(data)
                    path = str(image_dir.resolve() / name)
                rel = os.path.relpath(path, root)
                if k < 0:
                    out[key] = rel
                else:
                    out[key] = [*out[key][:k], rel, *out[key][k + 1 :]]
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
            lines += 1
    report.written[spec.name] = lines
    inside = os.path.commonpath([str(out_dir.resolve()), str(root)]) == str(out_dir.resolve())
    return {
        "root": os.path.relpath(root, out_dir.resolve()) if inside else str(root),
        "annotation": f"{spec.name}.jsonl",
        "data_augment": spec.data_augment,
        "repeat_time": spec.repeat_time,
        "length": lines,
        **({"max_dynamic_patch": spec.max_dynamic_patch} if spec.max_dynamic_patch else {}),
    }


def convert(
    source: str | Path,
    fmt: str,
    out_dir: str | Path,
    name: str | None = None,
    root: str | Path | None = None,
    on_bad: str = "error",
    overwrite: bool = False,
) -> ConvertReport:
    """Convert ``source`` (read as ``fmt``) into MMPR meta + JSONL under ``out_dir``.

    Args:
        source: a data file/folder, or a LLaMA-Factory ``dataset_info.json``.
        fmt: ``trl``, ``llamafactory`` or ``swift``.
        out_dir: the folder to write (``meta.json``, ``<dataset>.jsonl``, ``images/``).
        name: the dataset's name in the meta file (one-dataset sources; default: the file's stem).
        root: where relative media paths resolve (default: the source file's folder, or the
            ``dataset_info.json`` folder).
        on_bad: ``error`` stops at the first bad record (file, line, fields); ``skip`` counts it.
        overwrite: replace an existing ``out_dir/meta.json``.

    Raises:
        DataError: a bad record (``on_bad=error``), an unreadable source, or ``out_dir`` in use.
    """
    out = Path(out_dir)
    meta_path = out / "meta.json"
    if meta_path.exists() and not overwrite:
        raise DataError(f"{meta_path} exists: choose another output folder or pass --overwrite")
    specs = source_specs(Path(source), fmt, Path(root) if root is not None else None)
    if name is not None:
        if len(specs) != 1:
            raise DataError(f"--name applies to one dataset; {source} holds {len(specs)}")
        specs = [dataclasses.replace(specs[0], name=name)]
    out.mkdir(parents=True, exist_ok=True)
    report = ConvertReport(meta_path)
    meta = {spec.name: convert_dataset(spec, out, report, on_bad) for spec in specs}
    meta_path.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return report
