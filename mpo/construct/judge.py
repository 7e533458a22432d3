"""Is a sampled answer right? The final answer is read and compared with the prompt's ``answer_gt``.

The reading is ``mpo.eval``'s (one home for answer extraction): an option letter
(:func:`mpo.eval.extract_choice`, in the many phrasings it knows), a number (the last one in the
answer; thousands separators, signs and units handled, compared with a tolerance), or a short
normalised string (VQA-style, equal to the expected one or starting or ending with it). Which
reading applies follows the expected answer, as MMPR's correctness pipeline does (Wang et al. 2024,
arXiv:2411.10442, §3.1: "responses whose final answers match the ground truth are positive"):

* the question lists options (``A. red`` / ``(B) blue`` lines) and ``answer_gt`` is one of their
  letters or texts: the option letter;
* ``answer_gt`` is a number (possibly with a unit, "12 cm"): the number;
* otherwise: the text.

When the answer says where its final answer starts ("Final answer: ...", "The answer is ..."),
only what follows the last such cue is read, so numbers in the reasoning before it do not count.

Other tasks plug in their own judge: a function ``judge(record, answer) -> bool | None`` (None:
no answer could be read from it), named as ``module:function`` (:func:`load_judge`).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpo.eval import Question, extract_number, normalize, numeric_answer, score

# "A. red", "(B) blue", "C) green", "D: purple" at the start of a line of the question.
_OPTION_LINE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):])\s+(\S.*?)\s*$", re.MULTILINE)
# Where a final answer is announced; the text after the last one is what is judged.
_FINAL_CUE = re.compile(r"(?:final\s+answer|the\s+answer\s+is|answer\s*[:：])\s*[:：]?", re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    """What was read from one answer and whether it is right.

    Attributes:
        extracted: the letter, number or normalised text read from the answer; None when nothing
            could be read (an extraction failure).
        correct: whether it matches the expected answer (False when nothing was read).
    """

    extracted: str | None
    correct: bool


def parse_options(question: str) -> dict[str, str]:
    """The options a question lists, letter -> text, when they run A, B, C... (two or more)."""
    found: dict[str, str] = {}
    for m in _OPTION_LINE.finditer(question):
        letter = m.group(1) or m.group(2)
        if letter != chr(ord("A") + len(found)):
            continue  # a stray "B." line is no option list
        found[letter] = m.group(3)
    return found if len(found) >= 2 else {}


def final_part(answer: str) -> tuple[str, bool]:
    """The answer after its last "Final answer:" / "The answer is" / "Answer:" cue, and whether
    there was one (without one: all of it)."""
    cues = list(_FINAL_CUE.finditer(answer))
    rest = answer[cues[-1].end() :].strip() if cues else ""
    return (rest, True) if rest else (answer, False)


@dataclass(frozen=True)
class AnswerJudge:
    """The default judge: option letter, number with a tolerance, or normalised text.

    Args:
        rel_tol: relative tolerance for numeric answers (``math.isclose``).
        abs_tol: absolute tolerance for numeric answers.
    """

    rel_tol: float = 1e-9
    abs_tol: float = 1e-9

    def kind(self, question: str, answer_gt: str) -> str:
        """``choice``, ``number`` or ``text``: how answers to this prompt are read."""
        options = parse_options(question)
        if options and self._letter(options, answer_gt) is not None:
            return "choice"
        return "number" if numeric_answer(answer_gt) is not None else "text"

    @staticmethod
    def _letter(options: dict[str, str], answer_gt: str) -> str | None:
        gt = answer_gt.strip()
        bare = gt.strip("()").rstrip(".").upper()
        if bare in options:
            return bare
        by_text = [k for k, v in options.items() if normalize(v) == normalize(gt)]
        return by_text[0] if len(by_text) == 1 else None

    def judge(self, question: str, answer_gt: str, answer: str) -> Verdict:
        """Whether ``answer`` gives ``answer_gt`` as its final answer to ``question``."""
        options = parse_options(question)
        letter = self._letter(options, answer_gt) if options else None
        if letter is not None:
            q = Question(index="", question=question, options=options, answer=letter)
            got = score(q, answer)
            if got.extracted is None:  # "Final answer: blue" names the option by its text only
                got = score(q, final_part(answer)[0])
            return Verdict(got.extracted, got.correct)
        rest, cued = final_part(answer)
        want = numeric_answer(answer_gt)
        if want is not None:
            # After a cue the answer comes first ("The answer is 12 because 3 x 4"); without one,
            # reasoning comes first and the answer last.
            number = extract_number(rest, first=cued)
            ok = number is not None and math.isclose(number, want, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
            return Verdict(None if number is None else f"{number:g}", ok)
        got = score(Question(index="", question=question, options={}, answer=answer_gt.strip()), rest)
        return Verdict(got.extracted, got.correct)

    def __call__(self, record: dict[str, Any], answer: str) -> Verdict:
        return self.judge(record["question"], str(record["answer_gt"]), answer)


JudgeFn = Callable[[dict[str, Any], str], Any]


def as_verdict(result: Any, where: str) -> Verdict:
    """A judge's result as a Verdict: a Verdict, a bool (read, right or wrong) or None (not read)."""
    if isinstance(result, Verdict):
        return result
    if result is None:
        return Verdict(None, False)
    if isinstance(result, bool):
        return Verdict("judged", result)
    raise TypeError(f"{where}: a judge returns True, False, None or a Verdict, got {type(result).__name__}")


def load_judge(spec: str) -> JudgeFn:
    """A judge named ``module:function`` (the module importable, e.g. on PYTHONPATH).

    The function takes the prompt record (``question``, ``answer_gt``, ``image``... as in the prompts
    file) and one sampled answer, and returns True, False or None (no answer could be read).
    """
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--judge {spec!r}: expected module:function (e.g. my_judges:geometry)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"--judge {spec!r}: cannot import module {module!r} ({exc})") from exc
    except AttributeError as exc:
        raise ValueError(f"--judge {spec!r}: module {module!r} has no {name!r}") from exc
    if not callable(fn):
        raise ValueError(f"--judge {spec!r}: {name!r} is not callable")
    return fn
