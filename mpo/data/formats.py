"""Preference records in the formats users already have, read as the MMPR records the encoder takes.

Each reader turns one record into ``{"question", "chosen", "rejected"}`` plus, when present,
``image`` (a string or a list, as MMPR writes it), ``history`` (earlier ``[user, assistant]``
exchanges of a multi-turn prompt, oldest first) and ``system`` (the record's own system prompt).
The formats, as their projects document them:

* ``trl``: TRL's preference type (``docs/source/dataset_formats.md`` in huggingface/trl; TRL
  1.16's ``DataCollatorForVisionPreference`` for images): ``prompt``/``chosen``/``rejected`` as
  strings, or as conversational message lists whose ``content`` is a string or a list of blocks
  (``{"type": "text", "text": ...}``, ``{"type": "image"}``); the "implicit prompt" variant with only
  ``chosen``/``rejected`` conversations (the shared leading messages are the prompt, TRL's
  ``extract_prompt``); images in ``images`` (a list) or ``image`` (one), as paths or an HF
  ``Image`` column. Message lists whose contents are strings and hold no ``<image>`` get one image
  block per image before the first user text, as TRL's ``prepare_multimodal_messages`` does.
* ``llamafactory``: LLaMA-Factory's ``data/README.md`` (hiyouga/LLaMA-Factory): ``sharegpt``
  preference records (``conversations`` of ``{"from", "value"}`` messages ending with a user turn,
  ``chosen``/``rejected`` messages, ``images``, ``system``), column names and role tags as a
  ``dataset_info.json`` entry declares them (``columns``, ``tags``; ``formatting: sharegpt``,
  ``ranking: true``), the OpenAI-style variant (``role``/``content`` tags), and ``alpaca``
  preference records (``instruction``, ``input``, ``chosen``, ``rejected`` strings, ``history``).
* ``swift``: ms-swift's RLHF format (``docs/source_en/Customization/Custom-dataset.md`` in
  modelscope/ms-swift): ``messages`` ending with the chosen assistant turn, ``rejected_response``
  (a string or one assistant message) or ``rejected_messages``, ``images``.

Images follow InternVL's rule whatever the format: one ``<image>`` per image (``{"type": "image"}``
blocks become ``<image>``), and a single image without a placeholder gets ``<image>\\n`` in front of
the first user turn (``mpo.data.template``). Image values may be paths (relative ones resolve
against the dataset's root, absolute ones are used as they are), ``data:image/...;base64,`` URLs,
or HF ``Image`` values (``{"bytes", "path"}``); web URLs are refused, as nothing is downloaded.
An MPO pair shares its images between both answers, so a ``rejected_images`` different from
``images`` (ms-swift) is refused rather than silently trained on the chosen images.

This module is pure record handling (no files, no torch); ``mpo.data.mmpr`` applies it as records
are read, and ``mpo.data.convert`` writes converted files.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any

IMAGE = "<image>"
FORMATS = ("mmpr", "trl", "llamafactory", "swift")
# What each format's records hold (shown when a record fits none, or not the one declared).
EXPECTED = {
    "mmpr": "question, chosen, rejected [, image | video]",
    "trl": "prompt, chosen, rejected [, images | image] (strings or message lists), "
    "or chosen/rejected conversations sharing their prompt",
    "llamafactory": "conversations, chosen, rejected [, images, system] (sharegpt), "
    "or instruction, chosen, rejected [, input, history, images, system] (alpaca)",
    "swift": "messages (ending with the chosen answer), rejected_response or rejected_messages [, images]",
}
# LLaMA-Factory's defaults (data/README.md): sharegpt tags, and the column names we read.
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {
    **SHAREGPT_TAGS,
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
}
DEFAULT_COLUMNS = {
    "messages": "conversations",
    "videos": "videos",
    "chosen": "chosen",
    "rejected": "rejected",
    "images": "images",
    "system": "system",
    "prompt": "instruction",
    "query": "input",
    "history": "history",
    "response": "output",  # alpaca's reference answer: read as a prompt's ground truth (mpo pairs)
}


class FormatError(ValueError):
    """A record that does not fit its format; ``reason`` is a short category for skip reports."""

    def __init__(self, message: str, reason: str = "bad_format"):
        super().__init__(message)
        self.reason = reason


def _present(record: dict, key: str) -> bool:
    # Arrow rows carry every column, None where a row has no value.
    return record.get(key) is not None


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def detect(record: dict) -> str | None:
    """The format ``record`` is in, from the fields only that format has; None when none fits.

    A record missing one of its format's other fields is still told apart (``question`` is
    MMPR's, ``messages`` ms-swift's, ``conversations``/``instruction`` LLaMA-Factory's, ``prompt``
    TRL's), so reading it then names the missing field.
    """
    # A field written as null still says which format the record is in (reading it then says the
    # null is wrong); an Arrow table only has the columns its format has.
    has = lambda key: key in record  # noqa: E731
    if has("question"):
        return "mmpr"
    if (
        has("conversations")
        or has("instruction")
        or (has("messages") and isinstance(record.get("chosen"), dict))
    ):
        return "llamafactory"
    if has("messages"):
        return "swift"
    if has("prompt"):
        return "trl"
    if _is_messages(record.get("chosen")) and _is_messages(record.get("rejected")):
        return "trl"  # implicit prompt
    return None


def describe_fields(record: dict, formats: tuple[str, ...] = FORMATS) -> str:
    """The "expected ...; found fields: ..." part of the error for a record that fits none of ``formats``."""
    expected = "; ".join(f"{f}: {EXPECTED[f]}" for f in formats)
    found = ", ".join(record) or "none"
    return f"expected the fields of {expected}; found fields: {found}"


# ---- pieces shared by the readers ------------------------------------------------------------
def _text(value: Any, what: str) -> str:
    """A message content as text: a string, or blocks joined by newlines (images as ``<image>``)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise FormatError(f"{what} must be a string or a list of content blocks, got {type(value).__name__}")
    parts = []
    for k, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind in ("image", "image_url"):
            parts.append(IMAGE)
        else:
            raise FormatError(
                f"{what}[{k}]: expected a text block {{'type': 'text', 'text': ...}} or an image block "
                f"{{'type': 'image'}}, got {block!r}"[:300],
                "bad_content",
            )
    return "\n".join(parts)


def _image_value(value: Any, what: str) -> Any:
    """One image as the pair encoder takes it: a root-relative path, or ``{"bytes", "path"}``."""
    if isinstance(value, dict):
        if value.get("bytes") or isinstance(value.get("path"), str):
            return value
        raise FormatError(
            f"{what}: an image object needs 'bytes' or 'path', got keys {sorted(value)}", "bad_image"
        )
    if not isinstance(value, str) or not value:
        raise FormatError(f"{what}: an image must be a path string, got {value!r}"[:200], "bad_image")
    if value.startswith("data:"):
        head, _, payload = value.partition(",")
        if not head.endswith(";base64"):
            raise FormatError(f"{what}: only base64 data URLs are read, got '{head}'", "bad_image")
        try:
            return {"bytes": base64.b64decode(payload, validate=True), "path": None}
        except binascii.Error as exc:
            raise FormatError(f"{what}: invalid base64 image data ({exc})", "bad_image") from exc
    if value.startswith(("http://", "https://")):
        raise FormatError(
            f"{what}: '{value[:80]}' is a web URL; nothing is downloaded: fetch the images and give their paths",
            "image_url",
        )
    # Absolute paths as HF Image values do: the encoder takes those as they are (pairs.media_source).
    return {"bytes": None, "path": value} if os.path.isabs(value) else value


def _images(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [
        _image_value(v, f"{what}[{k}]" if isinstance(value, list) else what) for k, v in enumerate(values)
    ]


def _one_video(name: str, value: Any) -> str | None:
    """A ``videos`` column as MMPR's single ``video`` path (an MPO pair holds at most one video)."""
    if value is None or value == []:
        return None
    videos = value if isinstance(value, list) else [value]
    if len(videos) != 1 or not isinstance(videos[0], str):
        raise FormatError(
            f"field '{name}': one video path per pair is read, got {value!r}"[:200], "bad_video"
        )
    return videos[0]


def _split_turns(turns: list[tuple[str, str]], what: str) -> tuple[str | None, list[list[str]], str]:
    """``(role, text)`` turns -> (system, earlier ``[user, assistant]`` exchanges, final user text).

    A prompt is an optional system turn, then user/assistant turns alternating, ending with a user turn.
    """
    system = None
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    roles = [r for r, _ in turns]
    expected = ["user", "assistant"] * (len(turns) // 2) + ["user"]
    if len(turns) % 2 != 1 or roles != expected:
        raise FormatError(
            f"{what}: a prompt is [system,] then user and assistant turns alternating, ending with a user "
            f"turn; got roles {roles}",
            "bad_turns",
        )
    history = [[turns[i][1], turns[i + 1][1]] for i in range(0, len(turns) - 1, 2)]
    return system, history, turns[-1][1]


def _record(
    system: str | None,
    history: list[list[str]],
    question: str,
    chosen: str,
    rejected: str,
    images: list,
    video: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"question": question, "chosen": chosen, "rejected": rejected}
    if images:
        out["image"] = images if len(images) > 1 else images[0]
    if video is not None:
        out["video"] = video
    if history:
        out["history"] = history
    if system is not None:
        out["system"] = system
    return out


def _require(record: dict, keys: tuple[str, ...], fmt: str) -> None:
    missing = [k for k in keys if not _present(record, k)]
    if missing:
        raise FormatError(
            f"missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)} for "
            f"format '{fmt}': {describe_fields(record, (fmt,))}",
            f"missing_{missing[0]}",
        )


# ---- TRL ---------------------------------------------------------------------------------------
def _trl_messages(value: Any, what: str) -> list[tuple[str, str]]:
    if not _is_messages(value):
        raise FormatError(f"field '{what}' must be a string or a list of messages", f"bad_{what}")
    turns = []
    for k, m in enumerate(value):
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise FormatError(
                f"field '{what}'[{k}]: role must be system, user or assistant, got {role!r}", "bad_turns"
            )
        turns.append((role, _text(m.get("content"), f"field '{what}'[{k}].content")))
    return turns


def _trl_answer(turns: list[tuple[str, str]], what: str) -> str:
    if len(turns) != 1 or turns[0][0] != "assistant":
        raise FormatError(
            f"field '{what}' must hold one assistant message, got roles {[r for r, _ in turns]}",
            f"bad_{what}",
        )
    return turns[0][1]


def _prefix_images(turns: list[tuple[str, str]], raw: Any, n_images: int) -> list[tuple[str, str]]:
    """TRL's rule for string contents without placeholders: the images go before the first user text."""
    plain = isinstance(raw, list) and all(isinstance(m.get("content"), str) for m in raw)
    if not plain or n_images == 0 or any(IMAGE in text for _, text in turns):
        return turns
    first_user = next((i for i, (r, _) in enumerate(turns) if r == "user"), None)
    if first_user is None:
        return turns
    out = list(turns)
    out[first_user] = ("user", "\n".join([IMAGE] * n_images + [turns[first_user][1]]))
    return out


def read_trl(record: dict) -> dict[str, Any]:
    """A TRL preference record (standard or conversational, explicit or implicit prompt)."""
    images = _images(record.get("images", record.get("image")), "field 'images'")
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not _present(record, "prompt"):
        _require(record, ("chosen", "rejected"), "trl")
        c, r = _trl_messages(chosen, "chosen"), _trl_messages(rejected, "rejected")
        shared = 0
        while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
            shared += 1
        turns = _prefix_images(c[:shared], chosen, len(images))
        system, history, question = _split_turns(turns, "the shared prompt of 'chosen'/'rejected'")
        answers = (_trl_answer(c[shared:], "chosen"), _trl_answer(r[shared:], "rejected"))
        return _record(system, history, question, *answers, images)
    _require(record, ("prompt", "chosen", "rejected"), "trl")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise FormatError("a string 'prompt' needs string 'chosen' and 'rejected'", "bad_chosen")
        return _record(None, [], prompt, chosen, rejected, images)
    turns = _prefix_images(_trl_messages(prompt, "prompt"), prompt, len(images))
    system, history, question = _split_turns(turns, "field 'prompt'")
    answers = [
        value if isinstance(value, str) else _trl_answer(_trl_messages(value, name), name)
        for name, value in (("chosen", chosen), ("rejected", rejected))
    ]
    return _record(system, history, question, *answers, images)


# ---- LLaMA-Factory -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaFactoryColumns:
    """How to read one LLaMA-Factory dataset: its ``dataset_info.json`` entry, or conventional names.

    Attributes:
        formatting: ``sharegpt``, ``openai`` or ``alpaca``; None: from each record (conversations
            present: sharegpt, else alpaca).
        columns: column names as an entry declares them (``messages``, ``chosen``, ``rejected``,
            ``images``, ``videos``, ``system``, ``prompt``, ``query``, ``history``; a name missing
            is not read); None: the conventional names of ``DEFAULT_COLUMNS``.
        tags: sharegpt role tags as an entry declares them; None: ``from``/``value`` or
            ``role``/``content``, whichever the record's messages use.
    """

    formatting: str | None = None
    columns: dict[str, str | None] | None = None
    tags: dict[str, str | None] | None = None

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> LlamaFactoryColumns:
        """Settings of a ``dataset_info.json`` entry, read as LLaMA-Factory's ``DatasetAttr.join``
        does: a ``columns`` (``tags``) object replaces every default, names it omits are unset."""
        columns = None
        if "columns" in entry:
            columns = {k: entry["columns"].get(k) for k in (*DEFAULT_COLUMNS, "videos")}
        else:  # DatasetAttr's own defaults; chosen/rejected/images are unset without columns
            columns = {"prompt": "instruction", "query": "input", "messages": "conversations"}
        tags = {k: entry["tags"].get(k) for k in SHAREGPT_TAGS} if "tags" in entry else dict(SHAREGPT_TAGS)
        return cls(entry.get("formatting", "alpaca"), columns, tags)

    def column(self, name: str) -> str | None:
        if self.columns is None:
            return DEFAULT_COLUMNS.get(name, name)
        return self.columns.get(name)


def _sharegpt_tags(options: LlamaFactoryColumns, messages: Any) -> dict[str, str | None]:
    if options.tags is not None:
        return options.tags
    if options.formatting == "openai":
        return OPENAI_TAGS
    first = messages[0] if _is_messages(messages) else {}
    return OPENAI_TAGS if "role" in first and "from" not in first else SHAREGPT_TAGS


def _sharegpt_turn(message: Any, tags: dict[str, str], what: str) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise FormatError(f"{what} must be a message object, got {type(message).__name__}", "bad_turns")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    tag = message.get(tags["role_tag"])
    if tag not in roles:
        tools = (tags["observation_tag"], tags["function_tag"])
        why = "tool turns are not supported" if tag in tools else f"unknown role {tag!r}"
        raise FormatError(
            f"{what}: {why} (roles: '{tags['role_tag']}' = {', '.join(repr(t) for t in roles)})", "bad_turns"
        )
    return roles[tag], _text(message.get(tags["content_tag"]), f"{what}.{tags['content_tag']}")


def _column(record: dict, options: LlamaFactoryColumns, name: str) -> tuple[str, Any]:
    """(the column's name in the file, its value or None when unset or absent)."""
    col = options.column(name)
    return (col or name), (record.get(col) if col else None)


def _require_columns(record: dict, options: LlamaFactoryColumns, names: tuple[str, ...]) -> None:
    unset = [n for n in names if not options.column(n)]
    if unset:
        raise FormatError(
            f"the dataset_info.json entry declares no column for {', '.join(unset)} (add it under 'columns')",
            "bad_format",
        )
    _require(record, tuple(options.column(n) for n in names), "llamafactory")


def _llamafactory_common(record: dict, o: LlamaFactoryColumns) -> tuple[list, str | None, str | None, tuple]:
    """(images, video, the system column's value, (messages column name, its value)) of a record."""
    name, value = _column(record, o, "images")
    images = _images(value, f"field '{name}'")
    video = _one_video(*_column(record, o, "videos"))
    sys_name, system = _column(record, o, "system")
    if system is not None and not isinstance(system, str):
        raise FormatError(f"field '{sys_name}' must be a string", "bad_system")
    return images, video, system, _column(record, o, "messages")


def _alpaca_prompt(record: dict, o: LlamaFactoryColumns) -> tuple[str, list[list[str]]]:
    """An alpaca record's question (LLaMA-Factory's "instruction\\ninput") and history pairs."""
    parts = [_column(record, o, k)[1] for k in ("prompt", "query")]
    if not all(p is None or isinstance(p, str) for p in parts):
        raise FormatError(
            f"fields '{o.column('prompt')}'/'{o.column('query')}' must be strings", "bad_question"
        )
    hist_name, history = _column(record, o, "history")
    history = history or []
    if not isinstance(history, list) or not all(
        isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(t, str) for t in h) for h in history
    ):
        raise FormatError(f"field '{hist_name}' must be a list of [user, assistant] pairs", "bad_history")
    return "\n".join(p for p in parts if p), [list(h) for h in history]


def read_llamafactory(record: dict, options: LlamaFactoryColumns | None = None) -> dict[str, Any]:
    """A LLaMA-Factory preference record (sharegpt/openai or alpaca, ``ranking: true``)."""
    o = options or LlamaFactoryColumns()
    images, video, system, (msg_name, messages) = _llamafactory_common(record, o)
    if o.formatting == "alpaca" or (o.formatting is None and messages is None):
        _require_columns(record, o, ("prompt", "chosen", "rejected"))
        question, history = _alpaca_prompt(record, o)
        answers = [_column(record, o, k)[1] for k in ("chosen", "rejected")]
        if not all(isinstance(a, str) for a in answers):
            raise FormatError(
                f"alpaca fields '{o.column('chosen')}'/'{o.column('rejected')}' must be strings", "bad_chosen"
            )
        return _record(system or None, history, question, *answers, images, video)
    _require_columns(record, o, ("messages", "chosen", "rejected"))
    if not _is_messages(messages):
        raise FormatError(f"field '{msg_name}' must be a non-empty list of messages", "bad_turns")
    tags = _sharegpt_tags(o, messages)
    turns = [_sharegpt_turn(m, tags, f"field '{msg_name}'[{k}]") for k, m in enumerate(messages)]
    own_system, history, question = _split_turns(turns, f"field '{msg_name}'")
    answers = []
    for key in ("chosen", "rejected"):
        col, value = _column(record, o, key)
        role, text = _sharegpt_turn(value, tags, f"field '{col}'")
        if role != "assistant":
            raise FormatError(f"field '{col}' must be an assistant message, got role {role}", f"bad_{key}")
        answers.append(text)
    # A system message in the conversation overrides the system column (LLaMA-Factory's converter).
    system = own_system if own_system is not None else (system or None)
    return _record(system, history, question, *answers, images, video)


# ---- ms-swift ----------------------------------------------------------------------------------
def _swift_turns(value: Any, what: str) -> list[tuple[str, str]]:
    if not _is_messages(value):
        raise FormatError(f"field '{what}' must be a non-empty list of messages", "bad_turns")
    turns = []
    for k, m in enumerate(value):
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            why = (
                "tool turns are not supported"
                if role in ("tool", "tool_call", "tool_response")
                else f"role {role!r}"
            )
            raise FormatError(f"field '{what}'[{k}]: {why} (roles: system, user, assistant)", "bad_turns")
        turns.append((role, _text(m.get("content"), f"field '{what}'[{k}].content")))
    return turns


def read_swift(record: dict) -> dict[str, Any]:
    """An ms-swift RLHF record: ``messages`` + ``rejected_response`` or ``rejected_messages``."""
    _require(record, ("messages",), "swift")
    turns = _swift_turns(record["messages"], "messages")
    if turns[-1][0] != "assistant":
        raise FormatError("field 'messages' must end with the chosen assistant answer", "bad_turns")
    prompt, chosen = turns[:-1], turns[-1][1]
    if _present(record, "rejected_messages"):
        other = _swift_turns(record["rejected_messages"], "rejected_messages")
        if other[:-1] != prompt or other[-1][0] != "assistant":
            raise FormatError(
                "field 'rejected_messages' must repeat the prompt of 'messages' and end with the rejected "
                "answer (an MPO pair shares its prompt)",
                "bad_rejected",
            )
        rejected = other[-1][1]
    elif _present(record, "rejected_response"):
        value = record["rejected_response"]
        rejected = (
            value
            if isinstance(value, str)
            else _trl_answer(_swift_turns(value, "rejected_response"), "rejected")
        )
    else:
        raise FormatError(
            f"missing field 'rejected_response' for format 'swift': {describe_fields(record, ('swift',))}",
            "missing_rejected",
        )
    images = record.get("images")
    for key in ("rejected_images",):
        if _present(record, key) and record[key] != images:
            raise FormatError(
                f"field '{key}' differs from 'images': an MPO pair shares its images between both answers",
                "rejected_images",
            )
    system, history, question = _split_turns(prompt, "field 'messages'")
    video = _one_video("videos", record.get("videos"))
    return _record(system, history, question, chosen, rejected, _images(images, "field 'images'"), video)


# ---- prompts (mpo pairs sample) ------------------------------------------------------------------
PROMPT_EXPECTED = {
    "trl": "prompt [, completion, images | image] (a string or messages; completion: the ground truth)",
    "llamafactory": "conversations ending with a user turn or with the ground-truth answer [, images, "
    "system] (sharegpt), or instruction [, input, output, history, images, system] (alpaca)",
    "swift": "messages ending with a user turn or with the ground-truth answer [, images]",
}


def _prompt_record(
    system: str | None, history: list[list[str]], question: str, images: list, video: str | None, gt: Any
) -> dict[str, Any]:
    out = _record(system, history, question, "", "", images, video)
    del out["chosen"], out["rejected"]
    # Absolute paths stay paths (resolved, and refused outside the root, as in MMPR prompts files).
    if "image" in out:
        plain = [v["path"] if isinstance(v, dict) and v.get("bytes") is None else v for v in images]
        out["image"] = plain if len(plain) > 1 else plain[0]
    if gt is not None:
        out["answer_gt"] = gt
    return out


def _final_answer(turns: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str | None]:
    """A conversation ending with an assistant turn (SFT data): (the prompt turns, that answer)."""
    if turns and turns[-1][0] == "assistant":
        return turns[:-1], turns[-1][1]
    return turns, None


def read_prompt(record: dict, fmt: str, options: LlamaFactoryColumns | None = None) -> dict[str, Any]:
    """A prompt record of another format (``mpo pairs sample``) as an MMPR prompt record:
    ``question`` [, ``image``/``video``, ``history``, ``system``, ``answer_gt``, ``id``].

    The ground truth is the record's ``answer_gt`` if it has one, else its reference answer: TRL's
    ``completion`` (prompt-completion type), a conversation's final assistant turn (SFT data in
    LLaMA-Factory's sharegpt or ms-swift's ``messages``), or alpaca's ``output``.
    """
    if fmt == "mmpr":
        return record
    gt = None
    if fmt == "trl":
        _require(record, ("prompt",), "trl")
        images = _images(record.get("images", record.get("image")), "field 'images'")
        prompt, completion = record["prompt"], record.get("completion")
        if isinstance(prompt, str):
            system, history, question = None, [], prompt
        else:
            turns = _prefix_images(_trl_messages(prompt, "prompt"), prompt, len(images))
            system, history, question = _split_turns(turns, "field 'prompt'")
        if completion is not None:
            gt = (
                completion
                if isinstance(completion, str)
                else _trl_answer(_trl_messages(completion, "completion"), "completion")
            )
        video = None
    elif fmt == "llamafactory":
        o = options or LlamaFactoryColumns()
        images, video, system, (msg_name, messages) = _llamafactory_common(record, o)
        if o.formatting == "alpaca" or (o.formatting is None and messages is None):
            _require_columns(record, o, ("prompt",))
            question, history = _alpaca_prompt(record, o)
            system = system or None
            gt = _column(record, o, "response")[1]
        else:
            _require_columns(record, o, ("messages",))
            if not _is_messages(messages):
                raise FormatError(f"field '{msg_name}' must be a non-empty list of messages", "bad_turns")
            tags = _sharegpt_tags(o, messages)
            turns = [_sharegpt_turn(m, tags, f"field '{msg_name}'[{k}]") for k, m in enumerate(messages)]
            turns, gt = _final_answer(turns)
            own_system, history, question = _split_turns(turns, f"field '{msg_name}'")
            system = own_system if own_system is not None else (system or None)
    elif fmt == "swift":
        _require(record, ("messages",), "swift")
        turns, gt = _final_answer(_swift_turns(record["messages"], "messages"))
        system, history, question = _split_turns(turns, "field 'messages'")
        images = _images(record.get("images"), "field 'images'")
        video = _one_video("videos", record.get("videos"))
    else:
        raise FormatError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    out = _prompt_record(system, history, question, images, video, record.get("answer_gt", gt))
    if record.get("id") is not None:
        out["id"] = record["id"]
    return out


# ---- dispatch ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordReader:
    """Converts records of one dataset's format to MMPR records.

    Attributes:
        format: one of ``FORMATS``.
        llamafactory: the dataset's ``dataset_info.json`` settings (``llamafactory`` only).
    """

    format: str
    llamafactory: LlamaFactoryColumns | None = None

    def convert(self, record: dict) -> dict[str, Any]:
        """The MMPR record for ``record``; ``FormatError`` naming the fields expected and found."""
        if self.format == "mmpr":
            return record
        if self.format == "trl":
            return read_trl(record)
        if self.format == "llamafactory":
            return read_llamafactory(record, self.llamafactory)
        if self.format == "swift":
            return read_swift(record)
        raise FormatError(f"unknown format {self.format!r}; one of {', '.join(FORMATS)}")
