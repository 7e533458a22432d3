"""Greedy answers from a trained model, with the exact tiling and template used in training.

The prompt is built by ``mpo.data`` (InternVL tiling, the checkpoint's chat template with its
default system prompt), not by a processor, so what a user sees is what training optimised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from mpo.data.template import TemplateEncoder, expand_image_placeholders
from mpo.data.tiling import VisionSpec, tile_image


def build_prompt(
    tokenizer,
    vision: VisionSpec,
    question: str,
    image: Image.Image | None = None,
    max_num: int = 12,
    system_message: str | None = None,
    template: str = "auto",
) -> dict[str, torch.Tensor]:
    """Model inputs for one question (and optionally one image), ending in the assistant prefix.

    ``template``: a template name or ``auto`` (the checkpoint's, see ``mpo.data.template``).

    Returns:
        ``input_ids`` and ``attention_mask`` ``(1, L)``; ``pixel_values`` ``(tiles, 3, S, S)`` when
        an image is given (S = ``vision.image_size``).
    """
    encoder = TemplateEncoder(tokenizer, system_message, template)
    pixel_values = None
    counts: list[int] = []
    if image is not None:
        pixel_values = tile_image(image.convert("RGB"), max_num, vision.image_size)
        counts = [pixel_values.shape[0] * vision.tokens_per_tile]
    text = expand_image_placeholders(question, counts) if counts else question
    ids = encoder.generation_prefix(text)
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    return out


@torch.no_grad()
def greedy_generate(
    model, tokenizer, inputs: dict[str, torch.Tensor], max_new_tokens: int = 128, template: str = "auto"
) -> list[int]:
    """New token ids of a greedy decode, stopping after the template's end-of-turn token (included when reached)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    end_of_turn = TemplateEncoder(tokenizer, template=template).eos_id
    out = model.generate(
        **batch,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=end_of_turn,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, batch["input_ids"].shape[1] :].tolist()


def answer(
    model,
    tokenizer,
    question: str,
    image: Image.Image | None = None,
    max_new_tokens: int = 128,
    max_num: int = 12,
    system_message: str | None = None,
) -> str:
    """The model's greedy answer to ``question`` about ``image`` (special tokens stripped)."""
    vision = VisionSpec.from_config(model.config)
    inputs = build_prompt(tokenizer, vision, question, image, max_num, system_message)
    new = greedy_generate(model.eval(), tokenizer, inputs, max_new_tokens)
    return tokenizer.decode(new, skip_special_tokens=True)


def answer_from_dir(
    model_dir: str | Path,
    question: str,
    image_path: str | Path | None = None,
    max_new_tokens: int = 128,
    max_num: int = 12,
    torch_dtype: str = "float32",
) -> str:
    """Load a model folder (native, original, or a LoRA adapter folder: merged) and answer once."""
    from mpo.model.export import load_merged
    from mpo.model.loading import load_tokenizer

    model, tok_src = load_merged(model_dir, torch_dtype=torch_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = load_tokenizer(tok_src)
    image = None
    if image_path is not None:
        with Image.open(image_path) as im:
            image = im.convert("RGB")
    return answer(model, tokenizer, question, image, max_new_tokens, max_num)
