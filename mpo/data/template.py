"""InternVL's ``internvl2_5`` chat template and which tokens are trained.

Follows ``preprocess_internvl2_5`` in OpenGVLab/InternVL ``internvl_chat/internvl/train/dataset.py``:
each turn is rendered and tokenized on its own, then concatenated; in the assistant turn the
``<|im_start|>assistant\\n`` prefix and the final ``\\n`` are masked, so the trained tokens are the
answer text plus ``<|im_end|>`` (docs/internvl-format.md §3).
"""

from __future__ import annotations

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO_PLACEHOLDER = "<video>"

DEFAULT_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


class TemplateError(ValueError):
    """The question's image placeholders do not fit the images given."""


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


def system_turn(system_message: str | None) -> str:
    msg = DEFAULT_SYSTEM_MESSAGE if system_message is None else system_message
    return f"<|im_start|>system\n{msg}<|im_end|>\n"


def user_turn(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n"


def assistant_turn(answer: str) -> str:
    return f"<|im_start|>assistant\n{answer}<|im_end|>\n"


ASSISTANT_PREFIX = "<|im_start|>assistant\n"


class TemplateEncoder:
    """Tokenizes prompts and answers exactly as InternVL's training code does."""

    def __init__(self, tokenizer, system_message: str | None = None):
        self.tokenizer = tokenizer
        self.system_message = system_message
        self.prefix_ids = self._encode(ASSISTANT_PREFIX)
        # Each turn is tokenized on its own (as InternVL does), so the system turn is constant.
        self.system_ids = self._encode(system_turn(system_message))
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, question_expanded: str) -> list[int]:
        """System turn + user turn (image spans already expanded)."""
        return self.system_ids + self._encode(user_turn(question_expanded))

    def encode_answer(self, answer: str) -> tuple[list[int], list[int]]:
        """Token ids and labels of one assistant turn.

        Returns:
            (ids, labels): equal-length lists; labels are IGNORE_INDEX on the assistant prefix and
            the trailing newline, so only the answer and ``<|im_end|>`` are trained.
        """
        ids = self._encode(assistant_turn(answer))
        n = len(self.prefix_ids)
        if ids[:n] != self.prefix_ids:
            # The answer's first characters merged with the prefix's "\n" (Qwen2's BPE joins runs
            # of newlines): keep the prefix's own tokens and the answer's, so the prefix is masked
            # and the whole answer stays trained.
            ids = self.prefix_ids + self._encode(assistant_turn(answer)[len(ASSISTANT_PREFIX) :])
        if len(ids) < n + 2:
            raise TemplateError(
                "assistant answer does not tokenize after the '<|im_start|>assistant\\n' prefix"
            )
        labels = [IGNORE_INDEX] * n + ids[n:-1] + [IGNORE_INDEX]
        return ids, labels
