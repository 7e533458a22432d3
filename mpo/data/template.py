"""InternVL's chat templates, one per generation, and which tokens are trained.

The templates are those of OpenGVLab/InternVL ``internvl_chat/internvl/conversation.py`` that its
MPO trainer (``internvl_chat/internvl/train/internvl_chat_mpo.py``) dispatches on, named as the
``template`` field of an original ``config.json``:

* ``internvl2_5`` (InternVL2.5, InternVL3, and the dense InternVL3.5, whose MPO scripts pass
  ``--conv_style internvl2_5``): ChatML with a newline after each ``<|im_end|>``;
* ``internlm2-chat`` (InternVL2-2B/8B/26B) and ``Hermes-2`` (InternVL2-1B/40B/76B): ChatML with no
  newline between turns and InternVL2's own system prompt; ``internlm2-chat`` strips each message;
* ``phi3-chat`` (InternVL2-4B): ``<|system|>``/``<|user|>``/``<|assistant|>`` turns ended by ``<|end|>``.

Whatever the template, the rule of what is trained is the same in every ``preprocess_*`` function
of InternVL's ``internvl/train/dataset.py``: the assistant's answer and the end-of-turn token; the
role prefix and anything after the end-of-turn token are masked. Each turn is tokenized on its own
(``preprocess_internvl2_5``; every turn starts with a special token, so for the other templates
this gives the tokens of the whole-conversation call), and a tokenizer that adds a BOS token
(InternLM2's) gets exactly one, at the start (docs/internvl-format.md §3).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO_PLACEHOLDER = "<video>"
IMAGE_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT)

DEFAULT_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
# The system prompt InternVL2's templates keep ("to avoid changes in benchmark performance").
INTERNVL2_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


class TemplateError(ValueError):
    """The question's image placeholders do not fit the images given, or no usable template."""


@dataclass(frozen=True)
class ChatTemplate:
    """One InternVL conversation template (``Conversation`` with ``SeparatorStyle.MPT``).

    Attributes:
        name: the name an original ``config.json`` gives in ``template``.
        system_message: its default system prompt.
        system_prefix, user_prefix, assistant_prefix: what opens each turn.
        end_of_turn: the token that closes every turn (trained after an answer; generation stops at it).
        turn_separator: text after ``end_of_turn`` (``internvl2_5``'s newline; never trained).
        strip_messages: messages are ``.strip()``-ed first (``preprocess_internlm``).
        markers: the special tokens the template itself inserts.
    """

    name: str
    system_message: str
    system_prefix: str
    user_prefix: str
    assistant_prefix: str
    end_of_turn: str
    turn_separator: str
    strip_messages: bool
    markers: tuple[str, ...]

    def _turn(self, prefix: str, text: str) -> str:
        text = text.strip() if self.strip_messages else text
        return f"{prefix}{text}{self.end_of_turn}{self.turn_separator}"

    def system_turn(self, system_message: str | None = None) -> str:
        return self._turn(
            self.system_prefix, self.system_message if system_message is None else system_message
        )

    def user_turn(self, question: str) -> str:
        return self._turn(self.user_prefix, question)

    def assistant_turn(self, answer: str) -> str:
        return self._turn(self.assistant_prefix, answer)


_CHATML = ("<|im_start|>", "<|im_end|>")
INTERNVL2_5 = ChatTemplate(
    "internvl2_5", DEFAULT_SYSTEM_MESSAGE, "<|im_start|>system\n", "<|im_start|>user\n",
    "<|im_start|>assistant\n", "<|im_end|>", "\n", False, _CHATML,
)  # fmt: skip
INTERNLM2_CHAT = ChatTemplate(
    "internlm2-chat", INTERNVL2_SYSTEM_MESSAGE, "<|im_start|>system\n", "<|im_start|>user\n",
    "<|im_start|>assistant\n", "<|im_end|>", "", True, _CHATML,
)  # fmt: skip
HERMES_2 = ChatTemplate(
    "Hermes-2", INTERNVL2_SYSTEM_MESSAGE, "<|im_start|>system\n", "<|im_start|>user\n",
    "<|im_start|>assistant\n", "<|im_end|>", "", False, _CHATML,
)  # fmt: skip
PHI3_CHAT = ChatTemplate(
    "phi3-chat", INTERNVL2_SYSTEM_MESSAGE, "<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>", "",
    False, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
)  # fmt: skip
TEMPLATES = {t.name: t for t in (INTERNVL2_5, INTERNLM2_CHAT, HERMES_2, PHI3_CHAT)}
# Templates of InternVL models whose LLM is not supported (mpo.model.backbones.REFUSED).
REFUSED_TEMPLATES = {"internvl3_5_gpt_oss": "the GPT-OSS InternVL3.5 model's template"}
# In exported chat templates, so that `auto` finds the template of a native folder again.
TEMPLATE_MARK = re.compile(r"\{#- internvl template: ([\w.-]+) -#\}")


def template_mark(name: str) -> str:
    return "{#- internvl template: " + name + " -#}"


def template_by_name(name: str, where: str = "data.template") -> ChatTemplate:
    """The template called ``name``; TemplateError naming ``where`` and the supported names."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    why = f"{REFUSED_TEMPLATES[name]} is not supported" if name in REFUSED_TEMPLATES else "unknown template"
    raise TemplateError(f"{where}={name!r}: {why}; supported: {', '.join(TEMPLATES)}")


def detect_template(chat_template: str | None) -> ChatTemplate | None:
    """The template a Jinja chat template renders, or None when it says nothing we know.

    Our exported templates carry their name (``TEMPLATE_MARK``); otherwise ``<|system|>`` means
    ``phi3-chat`` and ChatML means ``internvl2_5`` (the chat template of every published native
    ``-hf`` InternVL, all of them InternVL2.5 or later).
    """
    if not chat_template:
        return None
    mark = TEMPLATE_MARK.search(chat_template)
    if mark:
        return template_by_name(mark.group(1), "chat template mark")
    if "<|system|>" in chat_template and "<|end|>" in chat_template:
        return PHI3_CHAT
    if "<|im_start|>" in chat_template:
        return INTERNVL2_5
    return None


def resolve_template(name: str, tokenizer) -> ChatTemplate:
    """The template for ``data.template=name`` and a checkpoint's tokenizer.

    ``auto``: the checkpoint's ``template`` (recorded on the tokenizer as ``internvl_template`` by
    ``mpo.model.loading.load_tokenizer``), else what its chat template renders, else ``internvl2_5``.
    """
    recorded = getattr(tokenizer, "internvl_template", None)
    if name != "auto":
        if recorded and recorded != name:
            logger.warning("data.template=%s overrides the checkpoint's template %s", name, recorded)
        return template_by_name(name)
    if recorded:
        return template_by_name(
            recorded, "the checkpoint's template (config.json; override with data.template)"
        )
    return detect_template(getattr(tokenizer, "chat_template", None)) or INTERNVL2_5


def image_span(num_image_tokens: int) -> str:
    """``<img>`` + ``<IMG_CONTEXT>`` x n + ``</img>``: what one ``<image>`` becomes."""
    return IMG_START + IMG_CONTEXT * num_image_tokens + IMG_END


def expand_image_placeholders(question: str, image_token_counts: list[int]) -> str:
    """Replace each ``<image>`` with its image span; prefix ``<image>\\n`` for one image without one.

    Args:
        question: the user text, possibly holding ``<image>`` placeholders.
        image_token_counts: tokens per image (tokens per tile x tiles), in image order.

    Raises:
        TemplateError: when the placeholder count differs from the image count.
    """
    n_images = len(image_token_counts)
    count = question.count(IMAGE_PLACEHOLDER)
    if n_images == 1 and count == 0:
        question = IMAGE_PLACEHOLDER + "\n" + question
        count = 1
    if count != n_images:
        raise TemplateError(
            f"question has {count} '<image>' placeholder(s) but the sample has {n_images} image(s)"
        )
    for n in image_token_counts:
        question = question.replace(IMAGE_PLACEHOLDER, image_span(n), 1)
    return question


def expand_placeholders_in_turns(user_texts: list[str], image_token_counts: list[int]) -> list[str]:
    """:func:`expand_image_placeholders` over the user turns of a multi-turn prompt, oldest first.

    Placeholders are counted over all turns and filled in order; a single image without a
    placeholder anywhere gets ``<image>\\n`` in front of the first turn (InternVL's
    ``internvl_chat_finetune.py`` prefixes ``conversations[0]``).

    Raises:
        TemplateError: when the placeholder count over all turns differs from the image count.
    """
    if len(user_texts) == 1:
        return [expand_image_placeholders(user_texts[0], image_token_counts)]
    counts = [t.count(IMAGE_PLACEHOLDER) for t in user_texts]
    if sum(counts) != len(image_token_counts) and not (len(image_token_counts) == 1 and sum(counts) == 0):
        raise TemplateError(
            f"the prompt's turns have {sum(counts)} '<image>' placeholder(s) but the sample has "
            f"{len(image_token_counts)} image(s)"
        )
    if sum(counts) == 0 and image_token_counts:
        counts[0] = 1
        user_texts = [IMAGE_PLACEHOLDER + "\n" + user_texts[0], *user_texts[1:]]
    out, used = [], 0
    for text, k in zip(user_texts, counts):
        out.append(expand_image_placeholders(text, image_token_counts[used : used + k]) if k else text)
        used += k
    return out


def expand_video_placeholder(question: str, num_frames: int) -> str:
    """Put one ``Frame{i}: <image>\\n`` line per frame where ``<video>`` stands (or in front).

    InternVL's MPO dataset (``video_get_item`` in ``internvl_chat_mpo.py``) prefixes
    ``<video>\\n`` when absent and replaces it with ``Frame1: <image>\\nFrame2: <image>`` joined by
    newlines but without the final newline, gluing the last frame to the question; its chat
    inference (``model.chat`` with ``num_patches_list``) uses ``Frame{i}: <image>\\n`` per frame. We
    use the inference form, which is what the model sees when it is served.

    Raises:
        TemplateError: more than one ``<video>``, or ``<image>`` placeholders in a video question.
    """
    if question.count(VIDEO_PLACEHOLDER) > 1:
        raise TemplateError(
            f"question has {question.count(VIDEO_PLACEHOLDER)} '<video>' placeholders; one video per sample"
        )
    if IMAGE_PLACEHOLDER in question:
        raise TemplateError(
            "a video question must not contain '<image>' placeholders (frames are inserted for '<video>')"
        )
    frames = "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))
    if VIDEO_PLACEHOLDER not in question:
        return frames + question
    if VIDEO_PLACEHOLDER + "\n" in question:
        return question.replace(VIDEO_PLACEHOLDER + "\n", frames, 1)
    return question.replace(VIDEO_PLACEHOLDER, frames, 1)


# The internvl2_5 turns, for callers that build its text directly (benchmark, tests).
def system_turn(system_message: str | None) -> str:
    return INTERNVL2_5.system_turn(system_message)


def user_turn(question: str) -> str:
    return INTERNVL2_5.user_turn(question)


def assistant_turn(answer: str) -> str:
    return INTERNVL2_5.assistant_turn(answer)


ASSISTANT_PREFIX = INTERNVL2_5.assistant_prefix


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of what it encodes (InternLM2's does).

    Measured rather than read from ``add_bos_token``, which not every tokenizer class exposes.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and plain[:1] != [bos]


class TemplateEncoder:
    """Tokenizes prompts and answers exactly as InternVL's training code does, for one template.

    Args:
        tokenizer: the checkpoint's tokenizer.
        system_message: the system prompt; None: the template's default.
        template: a template name, ``auto`` (see :func:`resolve_template`) or a ``ChatTemplate``.

    Raises:
        TemplateError: the tokenizer lacks a token the template or the image spans need.
    """

    def __init__(self, tokenizer, system_message: str | None = None, template: str | ChatTemplate = "auto"):
        self.tokenizer = tokenizer
        self.spec = template if isinstance(template, ChatTemplate) else resolve_template(template, tokenizer)
        self.system_message = system_message
        ids = {t: self._token_id(t) for t in self.spec.markers + IMAGE_TOKENS}
        self.eos_id = ids[self.spec.end_of_turn]  # the end-of-turn token: trained, and where generation stops
        self.image_token_ids = {t: ids[t] for t in IMAGE_TOKENS}
        self.bos_ids = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        self.prefix_ids = self._encode(self.spec.assistant_prefix)
        # Each turn is tokenized on its own (as InternVL does), so the system turn is constant.
        self.system_ids = self._encode(self.spec.system_turn(system_message))
        # Strings the tokenizer reads as structure: the template's markers, the image tokens and the
        # tokenizer's BOS/EOS/pad/unknown tokens. Data text must not contain them.
        own = [getattr(tokenizer, f"{k}_token", None) for k in ("bos", "eos", "pad", "unk")]
        self.reserved_tokens = tuple(
            dict.fromkeys([*self.spec.markers, *IMAGE_TOKENS, *(t for t in own if t)])
        )

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == getattr(self.tokenizer, "unk_token_id", None):
            raise TemplateError(
                f"template {self.spec.name!r}: the tokenizer has no {token!r} token "
                "(wrong data.template for this checkpoint?)"
            )
        return int(tid)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(
        self,
        question_expanded: str,
        history: Sequence[tuple[str, str]] = (),
        system_message: str | None = None,
    ) -> list[int]:
        """BOS (if the tokenizer adds one) + system turn + earlier turns + user turn.

        Args:
            question_expanded: the final user turn (image spans already expanded).
            history: earlier ``(user, assistant)`` exchanges of a multi-turn prompt, oldest first
                (image spans already expanded). Rendered with the template's turns, each turn
                tokenized on its own as InternVL's ``preprocess_*`` functions do; nothing in them is
                trained (only the final answer is, :meth:`encode_answer`).
            system_message: this sample's own system prompt (a record's ``system``); None: the
                encoder's.
        """
        system = (
            self.system_ids if system_message is None else self._encode(self.spec.system_turn(system_message))
        )
        turns: list[int] = []
        for user, assistant in history:
            turns += self._encode(self.spec.user_turn(user)) + self._encode(
                self.spec.assistant_turn(assistant)
            )
        return self.bos_ids + system + turns + self._encode(self.spec.user_turn(question_expanded))

    def generation_prefix(
        self,
        question_expanded: str,
        history: Sequence[tuple[str, str]] = (),
        system_message: str | None = None,
    ) -> list[int]:
        """The prompt followed by the assistant prefix: what a model continues to answer."""
        return self.encode_prompt(question_expanded, history, system_message) + self.prefix_ids

    def encode_answer(self, answer: str) -> tuple[list[int], list[int]]:
        """Token ids and labels of one assistant turn.

        Returns:
            (ids, labels): equal-length lists; labels are IGNORE_INDEX on the assistant prefix and
            after the end-of-turn token, so only the answer and the end-of-turn token are trained.
        """
        turn = self.spec.assistant_turn(answer)
        ids = self._encode(turn)
        n = len(self.prefix_ids)
        if ids[:n] != self.prefix_ids:
            # The answer's first characters merged with the prefix's last ones (a BPE joining runs
            # of newlines): keep the prefix's own tokens and the answer's, so the prefix is masked
            # and the whole answer stays trained.
            ids = self.prefix_ids + self._encode(turn[len(self.spec.assistant_prefix) :])
        ends = [i for i in range(n, len(ids)) if ids[i] == self.eos_id]
        if not ends or ends[-1] < n + 1:
            raise TemplateError(
                f"assistant answer does not tokenize between {self.spec.assistant_prefix!r} and {self.spec.end_of_turn!r}"
            )
        end = ends[-1]
        labels = [IGNORE_INDEX] * n + ids[n : end + 1] + [IGNORE_INDEX] * (len(ids) - end - 1)
        return ids, labels
