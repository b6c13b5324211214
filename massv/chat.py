"""Chat prompts -> model inputs, with every special token written exactly once.

A chat template already writes the special tokens a model expects (Gemma3's starts with `{{ bos_token }}`).
Tokenizing the rendered text with the tokenizer's default `add_special_tokens=True` adds them a second
time: Gemma gets `<bos><bos>`, a prompt layout the target never saw in training, which changes its answers
and makes the drafter's training prompts (tokenized without) differ from the ones it is used on. Every
place that turns a chat into ids (training, distillation, evaluation, the engine) goes through here.

    inputs = prompt_inputs(processor, adapter.user_messages("Describe the image."), [image])
    target.generate(**inputs, max_new_tokens=64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import BatchFeature


def render_chat(processor: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The chat template's text (special tokens included), by default up to the next assistant turn."""
    return processor.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_rendered(processor: Any, text: str) -> list[int]:
    """Ids of text the chat template rendered: the template wrote the special tokens, none is added."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_rendered(processor: Any, texts: Sequence[str], images: Sequence[Sequence[Any]] | None = None,
                    **processor_kwargs: Any) -> BatchFeature:
    """Processor outputs (ids with the image blocks expanded, pixel inputs) for rendered chat texts.

    `images` holds one list of images per text (None: text only). Extra keyword arguments go to the
    processor (padding, padding_side, return_tensors, ...); `add_special_tokens` is always False.
    """
    if "add_special_tokens" in processor_kwargs:
        raise TypeError("encode_rendered never adds special tokens: the chat template wrote them already")
    processor_kwargs.setdefault("return_tensors", "pt")
    nested = None if images is None else [list(group) for group in images]
    return processor(text=list(texts), images=nested, add_special_tokens=False, **processor_kwargs)


def prompt_inputs(processor: Any, messages: Sequence[Mapping[str, Any]], images: Sequence[Any] | None = None,
                  **processor_kwargs: Any) -> BatchFeature:
    """Inputs for `target.generate(**inputs)` from one chat (rendered with the generation prompt) and its images."""
    image_list = list(images) if images else None
    return encode_rendered(processor, [render_chat(processor, messages)],
                           None if image_list is None else [image_list], **processor_kwargs)


__all__ = ["encode_rendered", "prompt_inputs", "render_chat", "tokenize_rendered"]
