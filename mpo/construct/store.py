"""The sampled answers on disk: append-only shards keyed by prompt, and the settings they came from.

A sampling folder holds ``sample.json`` (the manifest: model, prompts file, sampling settings) and
one shard per rank, ``samples-<rank>.jsonl``, with one line per finished prompt::

    {"key": "shapes/line3", "dataset": "shapes", "line": 3, "chunk": 0, "root": "/abs/data",
     "max_dynamic_patch": 4, "record": {...the prompt's line...},
     "samples": [{"text": "...", "num_tokens": 7, "hit_limit": false}, ...]}

or, for a prompt that could not be encoded under ``data.on_bad_sample=skip``, ``"error"`` and
``"reason"`` instead of ``"samples"``. A chunk's lines are appended in one write and flushed to
disk before the next chunk starts, so a killed run loses at most the chunk in flight; a line cut
by the kill (no newline at the end) is removed when that rank's shard is opened again. A prompt
whose key is in any shard is done: a resumed or repeated run samples only the others, whatever
the number of ranks, and never writes a key twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mpo.data.mmpr import DataError
from mpo.files import write_atomic

MANIFEST = "sample.json"
SHARD_PATTERN = "samples-*.jsonl"


def shard_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"samples-{rank:05d}.jsonl"


def drop_torn_tail(path: Path) -> int:
    """Cut a last line without its newline (a write interrupted by a kill); bytes removed."""
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        if tail.endswith(b"\n"):
            return 0
        cut = tail.rfind(b"\n")
        keep = size - len(tail) + cut + 1 if cut >= 0 else 0
        if cut < 0 and size > len(tail):
            raise DataError(f"{path}: last line longer than 1 MiB has no newline; remove it by hand")
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def read_shards(out_dir: Path, keys_only: bool = False) -> dict[str, dict[str, Any]]:
    """Every finished prompt's line, by key, from all shards (a torn last line is ignored here).

    ``keys_only``: the values are empty dicts (a resuming run needs only the keys, not every answer).

    Raises:
        DataError: a line that is not JSON (other than a torn last line), or a key in two lines.
    """
    done: dict[str, dict[str, Any]] = {}
    where_of: dict[str, str] = {}
    for path in sorted(out_dir.glob(SHARD_PATTERN)):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break  # a torn last line: that prompt is not done
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not valid JSON ({exc})") from exc
                key = row.get("key")
                if key in done:
                    raise DataError(f"{path}:{n}: prompt {key!r} is also in {where_of[key]}")
                done[key] = {} if keys_only else row
                where_of[key] = f"{path}:{n}"
    return done


def append_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows as JSON lines in one write, then flush them to disk."""
    if not rows:
        return
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def check_manifest(out_dir: Path, manifest: dict[str, Any], write: bool) -> None:
    """Refuse to add samples made with other settings to a folder; write the manifest if new.

    Raises:
        DataError: naming every setting that differs from the folder's.
    """
    path = out_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [
            f"{k}: {old.get(k)!r} in the folder, {manifest.get(k)!r} now"
            for k in manifest
            if old.get(k) != manifest.get(k)
        ]
        if diff:
            raise DataError(
                f"{out_dir} holds samples made with other settings (resume with the same ones, or "
                "sample into a new --out):\n  - " + "\n  - ".join(diff)
            )
    elif write:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(manifest, indent=1) + "\n")


def read_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{out_dir}: no {MANIFEST} here (not a folder written by `mpo pairs sample`)")
    return json.loads(path.read_text())
