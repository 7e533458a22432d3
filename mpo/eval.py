"""Benchmarks in VLMEvalKit's TSV layout: reading, prompts, answer extraction and scoring.

A benchmark is a tab-separated file as VLMEvalKit ships them (open-compass/VLMEvalKit,
``vlmeval/dataset/image_base.py`` and ``image_mcq.py``): one row per question with ``index``,
``question``, option columns ``A``, ``B``, ... (empty where a question has fewer options),
``answer`` (the option letter, or the answer text for short-answer questions), the image as base64
in ``image`` (a value of at most 64 characters names the ``index`` of the row holding the image,
as VLMEvalKit's ``dump_image`` resolves it; a ``['...', '...']`` list holds several) or as a path
in ``image_path`` (relative to the TSV's folder), and optionally ``hint`` and ``category``.

The prompt follows InternVL's own MMBench evaluation (``internvl_chat/eval/mmbench/
evaluate_mmbench.py``: hint, question, one ``X. option`` line per option, then "Answer with the
option's letter from the given choices directly.") and its VQA prompt for short answers
(``internvl_chat/eval/vqa/evaluate_vqa.py``: "Answer the question using a single word or
phrase."); both prompts are settings.

Scoring (:func:`score`): a multiple-choice answer is the option letter found by
:func:`extract_choice` (a bare letter, a letter after "answer"/"option", a leading ``B.``/``(B)``,
a lone capital letter, or else the one option whose text the answer contains); a numeric answer is
the last number in the output (commas as thousands separators, signs, units ignored) compared
with the expected one; a text answer matches when the normalised output (lower case, no
punctuation or articles, VQA-style) equals the expected one or begins or ends with it.

Pure Python: generation is ``mpo.eval_model``; ``mpo eval`` is ``mpo.model.cli.cmd_eval``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import math
import re
import string
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mpo.config import BENCHMARK_MC_PROMPT as MC_PROMPT
from mpo.config import BENCHMARK_OPEN_PROMPT as OPEN_PROMPT
from mpo.data.mmpr import DataError

REQUIRED = ("question", "answer")
IMAGE_REF_MAX = 64  # VLMEvalKit: an `image` value this short is the index of the row holding the image


@dataclass
class Question:
    """One benchmark row.

    Attributes:
        index: the row's ``index`` (its line number when the file has none).
        question: the question text.
        options: option letter -> text, in column order (empty: a short-answer question).
        answer: the expected letter or answer text.
        category: the row's ``category`` (None without one).
        hint: the row's ``hint``.
        images: base64 strings or file paths (``image_kind``); None when not kept (another rank's).
        image_kind: ``base64``, ``path`` or ``none``.
        line: 1-based line of the row in the file.
    """

    index: str
    question: str
    options: dict[str, str]
    answer: str
    category: str | None = None
    hint: str | None = None
    images: list[str] | None = field(default=None, repr=False)
    image_kind: str = "none"
    line: int = 0

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)


@dataclass
class Benchmark:
    name: str  # the file's stem: metrics are logged as bench/<name>/...
    path: Path
    questions: list[Question]


def _cell(row: dict[str, str], key: str) -> str | None:
    value = row.get(key)
    return value if value not in (None, "") else None


def _as_list(value: str) -> list[str]:
    """A cell holding one value or a ``['a', 'b']`` list (VLMEvalKit's ``toliststr``)."""
    if value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            return parsed
    return [value]


def _rows(path: Path) -> Iterable[tuple[int, dict[str, str]]]:
    """(1-based line, row) of a TSV file; quoted cells may span lines (pandas writes them so)."""
    csv.field_size_limit(2**31 - 1)  # base64 images are megabytes
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty file (a VLMEvalKit TSV starts with a header row)")
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        if missing:
            raise DataError(
                f"{path}:1: missing column(s) {', '.join(missing)}: a VLMEvalKit benchmark TSV has index, question, "
                f"A, B, ... (options), answer, image (base64) or image_path, [hint, category]; found columns: "
                f"{', '.join(reader.fieldnames)}"
            )
        line = 2
        for row in reader:
            yield line, row
            line = reader.line_num + 1


def read_benchmark(
    path: str | Path, keep_images: Callable[[int], bool] | None = None, limit: int = 0
) -> Benchmark:
    """Read a VLMEvalKit-style TSV benchmark.

    Args:
        path: the ``.tsv`` file.
        keep_images: which question numbers (0-based) keep their image data; the others get
            ``images=None`` (a rank keeps only its shard's images). None: all.
        limit: keep the first ``limit`` questions (0: all).

    Raises:
        DataError: naming the file, line and column of anything unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: benchmark file not found")
    keep = keep_images or (lambda i: True)
    questions: list[Question] = []
    raw_images: dict[str, str] = {}  # index -> full image cell, for rows other rows refer to
    refs: dict[int, str] = {}  # question number -> the index its image cell names
    for line, row in _rows(path):
        if limit and len(questions) >= limit:
            break
        where = f"{path}:{line}"
        question, answer = _cell(row, "question"), _cell(row, "answer")
        if question is None or answer is None:
            raise DataError(f"{where}: column '{'question' if question is None else 'answer'}' is empty")
        options = {c: row[c] for c in string.ascii_uppercase if _cell(row, c) is not None}
        if options and answer.strip().upper() not in options:
            raise DataError(
                f"{where}: column 'answer' is {answer!r}, not one of the options {', '.join(options)}"
            )
        q = Question(
            index=_cell(row, "index") or str(line),
            question=question,
            options=options,
            answer=answer.strip().upper() if options else answer.strip(),
            category=_cell(row, "category"),
            hint=_cell(row, "hint"),
            line=line,
        )
        image, image_path = _cell(row, "image"), _cell(row, "image_path")
        if image is not None:
            q.image_kind = "base64"
            if len(image) <= IMAGE_REF_MAX:
                refs[len(questions)] = image
            else:
                raw_images[q.index] = image  # strings are shared, not copied, when several rows refer
                if keep(len(questions)):
                    q.images = _as_list(image)
        elif image_path is not None:
            q.image_kind = "path"
            q.images = [str(p if Path(p).is_absolute() else path.parent / p) for p in _as_list(image_path)]
        questions.append(q)
    for k, ref in refs.items():
        if ref not in raw_images:
            raise DataError(
                f"{path}:{questions[k].line}: column 'image' refers to index {ref!r}, which holds no image"
            )
        if keep(k):
            questions[k].images = _as_list(raw_images[ref])
    for k, q in enumerate(questions):
        if not keep(k):
            q.images = None
        elif q.image_kind == "base64":
            for j, b64 in enumerate(q.images or []):
                try:
                    base64.b64decode(b64, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise DataError(f"{path}:{q.line}: column 'image'[{j}]: not base64 ({exc})") from exc
    return Benchmark(path.stem, path, questions)


def image_bytes(q: Question, k: int, where: str) -> bytes:
    """The encoded bytes of a question's ``k``-th image."""
    if q.images is None:
        raise ValueError(f"{where}: question {q.index}'s images were not kept on this rank")
    if q.image_kind == "base64":
        return base64.b64decode(q.images[k])
    try:
        return Path(q.images[k]).read_bytes()
    except OSError as exc:
        raise DataError(f"{where}:{q.line}: column 'image_path': cannot read {q.images[k]} ({exc})") from exc


def build_prompt(q: Question, mc_prompt: str = MC_PROMPT, open_prompt: str = OPEN_PROMPT) -> str:
    """The user text (without image placeholders): InternVL's MMBench/VQA evaluation layout."""
    text = f"{q.hint}\n{q.question}" if q.hint else q.question
    for letter, option in q.options.items():
        text += f"\n{letter}. {option}"
    instruction = mc_prompt if q.multiple_choice else open_prompt
    return f"{text}\n{instruction}" if instruction else text


# ---- answer extraction -----------------------------------------------------------------------
_ARTICLES = {"a", "an", "the"}
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-+]?\.\d+")


def normalize(text: str) -> str:
    """Lower case, punctuation as spaces, articles dropped, spaces collapsed (VQA-style)."""
    cleaned = "".join(" " if ch in string.punctuation else ch for ch in text.lower())
    return " ".join(w for w in cleaned.split() if w not in _ARTICLES)


def extract_number(text: str, first: bool = False) -> float | None:
    """The last (``first``: the first) number in ``text`` ("1,234" = 1234, "−3.5" = -3.5, units
    ignored); None without one."""
    found = _NUMBER.findall(text.replace("\u2212", "-"))
    return float(found[0 if first else -1].replace(",", "")) if found else None


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter an answer picks, or None when it picks none (or several).

    In order: the whole answer is a letter ("B", "(b)", "B."); a letter after "answer",
    "option" or "choice" ("The answer is B", "Answer: (c)"); a leading "B." / "B)" / "(B)"; a
    parenthesised letter "(C)" anywhere; a lone capital letter (not the article in "A red
    circle"); the one option whose text appears, as whole words, in the answer ("The shape is
    green."; an option inside a longer matching one counts as the longer one).
    """
    letters = set(options)
    p = prediction.strip()
    if not p:
        return None

    def pick(found: Iterable[str]) -> str | None:
        chosen = {f.upper() for f in found if f.upper() in letters}
        return chosen.pop() if len(chosen) == 1 else None

    bare = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:)]?", p)
    if bare and pick([bare.group(1)]):
        return pick([bare.group(1)])
    # Upper-case letters may run on ("The answer is B because"); a lower-case one must end there
    # ("the answer is b."), else it is the article ("the answer is a cat").
    cue = r"\b(?:answer|option|choice)\b(?:\s+is)?\s*[:：]?\s*[\(\[]?"
    found = re.findall(cue + r"([A-Z])(?![A-Za-z0-9])", p, flags=0) + re.findall(
        cue + r"([a-z])[\)\]]?(?=\s*(?:$|[.,;:!?]))", p, flags=re.IGNORECASE
    )
    cued = [f for f in found if f.upper() in letters]
    if cued:
        return cued[-1].upper()
    lead = re.match(r"\(([A-Za-z])\)|([A-Za-z])[.):](?:\s|$)", p)
    if lead:
        return pick([lead.group(1) or lead.group(2)])
    paren = re.findall(r"\(([A-Za-z])\)", p)
    if paren and pick(paren):
        return pick(paren)
    lone = [
        m.group(1)
        for m in re.finditer(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])", p)
        # "A red circle" is the article; "A or B" is not.
        if not (m.group(1) == "A" and re.match(r"\s+(?!(?:or|and)\b)[a-z]", p[m.end() :]))
    ]
    if lone:
        return pick(lone)
    return _choice_by_text(p, options)


def _choice_by_text(prediction: str, options: dict[str, str]) -> str | None:
    said = f" {normalize(prediction)} "
    spans = []
    for letter, text in options.items():
        norm = normalize(text)
        if not norm:
            continue
        start = said.find(f" {norm} ")
        while start >= 0:
            spans.append((start, start + len(norm) + 1, letter))
            start = said.find(f" {norm} ", start + 1)
    # A match inside a longer option's match ("red" inside "dark red") belongs to the longer one.
    kept = {
        letter
        for s, e, letter in spans
        if not any((s2 <= s and e <= e2) and (e2 - s2) > (e - s) for s2, e2, _ in spans)
    }
    return kept.pop() if len(kept) == 1 else None


def _expected_answers(answer: str) -> list[str]:
    return _as_list(answer) if answer.startswith("[") else [answer]


def _text_matches(prediction: str, expected: str) -> bool:
    said, want = normalize(prediction), normalize(expected)
    if not want:
        return False
    return said == want or said.startswith(want + " ") or said.endswith(" " + want)


def numeric_answer(expected: str) -> float | None:
    """The expected answer as a number when it is one, possibly with a unit ("12 cm")."""
    value = extract_number(expected)
    rest = _NUMBER.sub(" ", expected.replace("\u2212", "-")).split()
    return value if value is not None and len(rest) <= 1 else None


@dataclass(frozen=True)
class Scored:
    extracted: str | None  # the letter, number or normalised text read from the answer
    correct: bool


def score(q: Question, prediction: str, rel_tol: float = 1e-9, abs_tol: float = 1e-9) -> Scored:
    """Whether ``prediction`` answers ``q`` correctly, and what was read from it.

    ``rel_tol``/``abs_tol``: how far a numeric answer may be from the expected number
    (``math.isclose``); the defaults ask for the same number up to float rounding.
    """
    if q.multiple_choice:
        letter = extract_choice(prediction, q.options)
        return Scored(letter, letter == q.answer)
    expected = _expected_answers(q.answer)
    numbers = [numeric_answer(e) for e in expected]
    if all(n is not None for n in numbers):
        got = extract_number(prediction)
        ok = got is not None and any(math.isclose(got, n, rel_tol=rel_tol, abs_tol=abs_tol) for n in numbers)
        return Scored(None if got is None else f"{got:g}", ok)
    said = normalize(prediction)
    return Scored(said or None, any(_text_matches(prediction, e) for e in expected))


def metric_name(text: str) -> str:
    """A category as a metric key part: no slashes, spaces as underscores."""
    return re.sub(r"[\s/]+", "_", text.strip()) or "none"


def accuracy(questions: list[Question], scored: list[Scored]) -> dict[str, float]:
    """``accuracy``, ``answered`` (share with an answer read from it) and ``accuracy/<category>``."""
    if not questions:
        return {}
    out = {
        "accuracy": sum(s.correct for s in scored) / len(scored),
        "answered": sum(s.extracted is not None for s in scored) / len(scored),
    }
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for q, s in zip(questions, scored):
        if q.category is not None:
            by_cat[metric_name(q.category)].append(s.correct)
    for cat, hits in sorted(by_cat.items()):
        out[f"accuracy/{cat}"] = sum(hits) / len(hits)
    return out


def format_result(name: str, metrics: dict[str, float], n: int) -> str:
    """One human line per benchmark."""
    cats = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in metrics.items() if k.startswith("accuracy/")]
    rep = [f"{k} {metrics[k]:.3g}" for k in ("limit_share", "longest_run", "distinct2") if k in metrics]
    return (
        f"{name}: accuracy {metrics.get('accuracy', float('nan')):.3f} of {n} (answered "
        f"{metrics.get('answered', float('nan')):.3f})"
        + (f" | per category: {', '.join(cats)}" if cats else "")
        + (f" | repetition: {', '.join(rep)}" if rep else "")
    )


def answer_rows(
    bench: Benchmark, answers: list[Any], scored: list[Scored], step: int | None = None
) -> list[dict]:
    """One JSON-able row per question: what was asked, answered, read and whether it is right."""
    rows = []
    for q, ans, s in zip(bench.questions, answers, scored):
        row = {"benchmark": bench.name, "index": q.index, "category": q.category, "question": q.question}
        row |= {"options": q.options, "answer": q.answer, "prediction": ans.text, "extracted": s.extracted}
        row |= {"correct": s.correct, "num_tokens": ans.num_tokens, "hit_limit": ans.hit_limit}
        rows.append(row if step is None else {"step": step, **row})
    return rows


def decode_image(data: bytes, where: str):
    """An image's bytes as an RGB PIL image; DataError naming where otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{where}: cannot decode the image ({exc})") from exc
