"""Prompts to sample answers for: MMPR-style records without the answers.

A prompts file is what MMPR's annotation lines hold before pairs exist: ``question`` (with
``<image>``/``<video>`` placeholders as in training), ``image`` (a path or a list of paths, relative to
the dataset's root) or ``video``, ``answer_gt`` (the ground truth, needed by ``--correctness``;
a string or a number), optionally ``id`` (a string or an integer, unique in its dataset), and the
multi-turn fields training reads (``history``, ``system``). Other fields are kept and ignored
(an MMPR pair file, with ``chosen``/``rejected``, is a prompts file too). Records in TRL,
LLaMA-Factory or ms-swift format are read too (``mpo.data.formats.read_prompt``): TRL's ``prompt``
(with ``completion`` as the ground truth), a sharegpt ``conversations`` or ms-swift ``messages``
list ending with a user turn, or with the reference answer (SFT data: that answer is the ground
truth), alpaca's ``instruction``/``input`` (``output``); ``answer_gt`` and ``id`` fields are kept.

It is given as a ``.jsonl`` file (one dataset, named after the file, rooted at its folder) or an
MMPR meta JSON (``{name: {root, annotation, max_dynamic_patch, ...}}``, as in training). A prompt's
key is ``<dataset>/<id>``, or ``<dataset>/line<N>`` without an ``id``: sampled answers are stored
under it, so a resumed run knows what is done (give ``id`` when the file may be edited between runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo.data.formats import PROMPT_EXPECTED, FormatError, detect, read_prompt
from mpo.data.mmpr import DataError, DatasetSpec, is_table_source, open_source, read_meta
from mpo.data.pairs import SampleError, media_fields, resolve_media


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompts file.

    Attributes:
        key: ``<dataset>/<id>`` (or ``<dataset>/line<N>``): unique over the file.
        spec: its dataset (root, tile budget).
        line: 1-based line in the annotation file.
        record: the line as read (``question``, ``image``/``video``, ``answer_gt``, ...).
    """

    key: str
    spec: DatasetSpec
    line: int
    record: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.spec.annotation}:{self.line}"

    @property
    def answer_gt(self) -> str | None:
        value = self.record.get("answer_gt")
        return None if value is None else str(value)


def _as_mmpr(spec: DatasetSpec, obj: dict[str, Any], where: str) -> dict[str, Any]:
    """``obj`` as an MMPR prompt record: read from TRL, LLaMA-Factory or ms-swift records when it is
    one (the meta entry's ``format``, else detected per record; ``mpo.data.formats.read_prompt``)."""
    # A record of no known format is read as MMPR, whose check names the missing 'question'.
    fmt = spec.format or detect(obj) or "mmpr"
    try:
        return read_prompt(obj, fmt, spec.llamafactory)
    except FormatError as exc:
        raise DataError(f"{where}: {exc} ({fmt} record)") from exc


def _check_record(obj: dict[str, Any], where: str) -> None:
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        got = "missing" if "question" not in obj else f"{type(question).__name__} {question!r:.40}"
        others = "; ".join(f"{f}: {e}" for f, e in PROMPT_EXPECTED.items())
        raise DataError(
            f"{where}: field 'question' must be a non-empty string, got {got} (the fields of a prompt in "
            f"another format: {others}; found fields: {', '.join(obj) or 'none'})"
        )
    gt = obj.get("answer_gt")
    if gt is not None and (isinstance(gt, bool) or not isinstance(gt, (str, int, float))):
        raise DataError(f"{where}: field 'answer_gt' must be a string or a number, got {type(gt).__name__}")
    if isinstance(gt, str) and not gt.strip():
        raise DataError(f"{where}: field 'answer_gt' is empty (leave it out for prompts without one)")
    pid = obj.get("id")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, (str, int))):
        raise DataError(f"{where}: field 'id' must be a string or an integer, got {type(pid).__name__}")
    try:
        fields = media_fields(obj, where)
    except SampleError as exc:
        raise DataError(str(exc)) from exc
    for field, value in fields:
        if not isinstance(value, str):
            # Samples are stored as JSON next to the prompt: embedded bytes have no place there.
            raise DataError(
                f"{where}: field '{field}' must be a file path (embedded images are not supported in "
                f"prompts files), got {type(value).__name__}"
            )


def _check_media(spec: DatasetSpec, obj: dict[str, Any], where: str, follow_symlinks: bool) -> None:
    """Every image/video file exists: found at the start, not hours into sampling."""
    for field, value in media_fields(obj, where):
        try:
            path = resolve_media(spec.root, value, where, field, follow_symlinks)
        except SampleError as exc:
            raise DataError(str(exc)) from exc
        if not path.is_file():
            raise DataError(f"{where}: field '{field}': file not found: {path}")


def read_prompts(path: str | Path, follow_symlinks: bool = False) -> list[Prompt]:
    """Every prompt of a ``.jsonl`` prompts file or an MMPR meta JSON, in file order.

    Raises:
        DataError: naming the file, line and field of the first bad line, or the two lines that
            share an ``id``.
    """
    specs = read_meta(path)
    prompts: list[Prompt] = []
    first_line: dict[str, str] = {}
    for spec in specs:
        if is_table_source(spec.annotation):
            raise DataError(
                f"{spec.annotation}: prompts are read from JSONL files (one JSON object per line)"
            )
        source = open_source(spec.annotation)
        for i in range(len(source)):
            line, obj = source.record(i)
            where = f"{spec.annotation}:{line}"
            obj = _as_mmpr(spec, obj, where)
            _check_record(obj, where)
            _check_media(spec, obj, where, follow_symlinks)
            key = f"{spec.name}/{obj['id']}" if obj.get("id") is not None else f"{spec.name}/line{line}"
            if key in first_line:
                raise DataError(f"{where}: field 'id': {key!r} is also the key of {first_line[key]}")
            first_line[key] = where
            prompts.append(Prompt(key, spec, line, obj))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts
