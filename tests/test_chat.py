"""No double BOS anywhere: with a tokenizer that adds BOS (as Gemma's does), every path from a chat to ids
(`massv.chat`, training examples, distillation prompts, `massv eval` inputs) carries exactly the special
tokens the chat template wrote, for each family.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import massv.evaluate as evaluate
from massv.benchmarks import BenchmarkSample
from massv.chat import encode_rendered, prompt_inputs, render_chat
from massv.families import get_adapter
from massv.tiny import build_tiny_pair
from massv.train.data import encode_example
from massv.train.distill import generate_responses
from tests.conftest import random_image
from tests.helpers_train import one_thread, tiny_config, turn, write_llava  # noqa: F401

FAMILIES = ("qwen2_5_vl", "gemma3")


def bos_count(ids: torch.Tensor, bos_id: int) -> int:
    return int((ids == bos_id).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_adding_tokenizer_gets_the_templates_bos_once_in_every_path(tmp_path: Path, family: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pair = build_tiny_pair(family, tokenizer_adds_bos=True)
    tokenizer, processor = pair.processor.tokenizer, pair.processor
    adapter = get_adapter(pair.target.config)
    bos = tokenizer.bos_token_id
    messages = adapter.user_messages("Describe the image.")
    text = render_chat(processor, messages)
    written = text.count(tokenizer.bos_token)  # what the template itself writes: Gemma 1, Qwen 0
    assert written == (1 if family == "gemma3" else 0)
    image = random_image(0)
    # The variant does add BOS: the usual processor call puts one more than the template wrote.
    naive = processor(text=[text], images=[[image]], return_tensors="pt")["input_ids"][0]
    assert bos_count(naive, bos) == written + 1

    inputs = prompt_inputs(processor, messages, [image])
    assert bos_count(inputs["input_ids"][0], bos) == written
    assert torch.equal(inputs["input_ids"][0], naive[1:])  # the same prompt, minus the added BOS
    assert (int(inputs["input_ids"][0, 0]) == bos) == (family == "gemma3")

    # Training examples.
    example = encode_example([turn("human", "<image>\nDescribe the image."), turn("gpt", "A blue square.")],
                             image, processor, adapter, max_length=1024)
    assert bos_count(example.input_ids, bos) == written
    text_only = encode_example([turn("human", "Hi"), turn("gpt", "Hello.")], None, processor, adapter, 1024)
    assert bos_count(text_only.input_ids, bos) == written

    # massv eval's prompts.
    sample = BenchmarkSample("s0", tmp_path / "s0.png", "Describe the image.", None)
    image.save(sample.image_path)
    assert torch.equal(evaluate.sample_inputs(processor, adapter, sample)["input_ids"], inputs["input_ids"])

    # Distillation: what the target's generate() is given.
    seen: list[torch.Tensor] = []
    real_generate = pair.target.generate

    def recording_generate(**kwargs):
        seen.append(kwargs["input_ids"].clone())
        return real_generate(**kwargs)

    monkeypatch.setattr(pair.target, "generate", recording_generate)
    data_json, image_root = write_llava(tmp_path, 1, text_only=1)
    config = tiny_config(tmp_path, family, data_json, image_root, ["distill.max_new_tokens=2"])
    generate_responses(config, target=pair.target, processor=processor)
    assert len(seen) == 2 and all(bos_count(ids[0], bos) == written for ids in seen)


def test_encode_rendered_refuses_to_add_special_tokens() -> None:
    pair = build_tiny_pair("gemma3", tokenizer_adds_bos=True)
    with pytest.raises(TypeError, match="never adds special tokens"):
        encode_rendered(pair.processor, ["<bos>hi"], add_special_tokens=True)
