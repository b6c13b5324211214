"""The drafter's static-cache path (`compile_drafter=True`): still lossless, rollback by position is exact, and it
refuses what it cannot roll back.

The default suite compiles with torch.compile's "eager" backend: the static cache, the explicit cache positions
and the position-only rollback are what can go wrong here, and they do not depend on the code generator. The
inductor-compiled run is in the slow suite (its compilation takes a minute on this CPU).
"""

from __future__ import annotations

import pytest
import torch

from massv.speculative import SpeculativeGenerator
from massv.speculative.proposers import StaticDecoder, StaticDecoderError
from massv.tiny import build_tiny_pair
from tests.conftest import prompt_inputs, random_image
from tests.engine_helpers import noisy_multimodal_copy, noisy_text_copy


@pytest.fixture(scope="module")
def qwen_pair():
    return build_tiny_pair("qwen2_5_vl")


def _reference(pair, inputs, max_new_tokens: int) -> list[int]:
    output = pair.target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def _count_steps(monkeypatch) -> list[int]:
    steps: list[int] = []
    original = StaticDecoder.step

    def counting(self, input_ids, position):
        steps.append(position)
        return original(self, input_ids, position)

    monkeypatch.setattr(StaticDecoder, "step", counting)
    return steps


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_static_path_is_lossless_with_partial_acceptance(qwen_pair, kind, monkeypatch) -> None:
    drafter = (noisy_text_copy(qwen_pair.target, noise=0.5) if kind == "text"
               else noisy_multimodal_copy(qwen_pair.target, len(qwen_pair.tokenizer), noise=0.5))
    static = SpeculativeGenerator(qwen_pair.target, drafter, qwen_pair.processor, compile_drafter=True,
                                  compile_backend="eager", compile_max_length=256)
    eager = SpeculativeGenerator(qwen_pair.target, drafter, qwen_pair.processor)
    steps = _count_steps(monkeypatch)
    partial = 0
    for seed in range(3):  # several requests through one decoder: each starts from a reset cache
        inputs = prompt_inputs(qwen_pair, "What colour is the square?", random_image(seed))
        expected = _reference(qwen_pair, inputs, 24)
        output = static.generate_from_inputs(inputs, max_new_tokens=24, num_draft_tokens=4)
        assert output.generated_ids[0].tolist() == expected
        eager_output = eager.generate_from_inputs(inputs, max_new_tokens=24, num_draft_tokens=4)
        # The same drafts as the eager drafter (up to float ties), so the same acceptance pattern.
        assert output.stats.accepted_drafts == eager_output.stats.accepted_drafts
        partial += sum(1 for accepted, judged in zip(output.stats.accepted_drafts, output.stats.judged_drafts)
                       if 0 < accepted < judged)
    assert steps, "the static decoder's step never ran"
    assert partial > 0, "no block was partly accepted: the position-only rollback was not exercised"


def test_requests_longer_than_the_static_cache_take_the_eager_path(qwen_pair, monkeypatch) -> None:
    drafter = noisy_text_copy(qwen_pair.target, noise=0.5)
    inputs = prompt_inputs(qwen_pair, "What colour is the square?", None)
    generator = SpeculativeGenerator(qwen_pair.target, drafter, qwen_pair.processor, compile_drafter=True,
                                     compile_backend="eager", compile_max_length=inputs["input_ids"].shape[1] + 4)
    steps = _count_steps(monkeypatch)
    output = generator.generate_from_inputs(inputs, max_new_tokens=16, num_draft_tokens=4)
    assert output.generated_ids[0].tolist() == _reference(qwen_pair, inputs, 16)
    assert steps == []


def test_sliding_window_drafters_refuse_a_cache_past_their_window() -> None:
    pair = build_tiny_pair("gemma3")  # tiny Gemma3: sliding window of 16 on every other layer
    drafter = noisy_text_copy(pair.target, noise=0.5)
    window = drafter.config.sliding_window
    with pytest.raises(StaticDecoderError, match=f"window {window}.*compile_max_length <= {window}"):
        SpeculativeGenerator(pair.target, drafter, pair.processor, compile_drafter=True, compile_backend="eager",
                             compile_max_length=window + 1)
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor, compile_drafter=True,
                                     compile_backend="eager", compile_max_length=window)
    assert generator.static_decoder is not None and generator.static_decoder.max_cache_len == window


def test_target_copy_has_no_step_to_compile(qwen_pair) -> None:
    from massv.speculative import TargetAsDrafter

    with pytest.raises(ValueError, match="no one-token language-model step"):
        SpeculativeGenerator(qwen_pair.target, TargetAsDrafter(qwen_pair.target), qwen_pair.processor,
                             compile_drafter=True)


@pytest.mark.slow
def test_inductor_compiled_drafter_is_lossless(qwen_pair) -> None:
    drafter = noisy_multimodal_copy(qwen_pair.target, len(qwen_pair.tokenizer), noise=0.5)
    generator = SpeculativeGenerator(qwen_pair.target, drafter, qwen_pair.processor, compile_drafter=True,
                                     compile_max_length=256)
    with torch.no_grad():
        for seed in range(2):
            inputs = prompt_inputs(qwen_pair, "What colour is the square?", random_image(seed))
            output = generator.generate_from_inputs(inputs, max_new_tokens=24, num_draft_tokens=4)
            assert output.generated_ids[0].tolist() == _reference(qwen_pair, inputs, 24)


def test_static_cache_logits_after_rollbacks_equal_a_recompute(qwen_pair) -> None:
    """Prefill, one-token steps, a rollback of two, a two-token forward and a step: each matches the
    drafter run from scratch on the same tokens (a rollback that left the write position behind would not)."""
    drafter = noisy_text_copy(qwen_pair.target, noise=0.5)
    decoder = StaticDecoder(drafter, 64, backend="eager")
    sequence = torch.randint(0, 50, (11,), generator=torch.Generator().manual_seed(5)).tolist()

    def recompute(tokens: list[int]) -> torch.Tensor:
        return drafter(input_ids=torch.tensor([tokens])).logits[0, -1].float()

    def forward(tokens: list[int], start: int) -> torch.Tensor:
        outputs = drafter(input_ids=torch.tensor([tokens]), position_ids=torch.arange(start, start + len(tokens))[None],
                          use_cache=True, logits_to_keep=1, **decoder.prompt_kwargs(start, len(tokens)))
        return outputs.logits[0, -1].float()

    with torch.no_grad():
        decoder.start_request()
        torch.testing.assert_close(forward(sequence[:8], 0), recompute(sequence[:8]))
        for length in (8, 9, 10):
            torch.testing.assert_close(decoder.step(torch.tensor([[sequence[length]]]), length)[0],
                                       recompute(sequence[: length + 1]))
        decoder.truncate(9)  # two of the three steps rejected
        replaced = sequence[:9] + [7, 9]
        torch.testing.assert_close(forward([7, 9], 9), recompute(replaced))
        torch.testing.assert_close(decoder.step(torch.tensor([[3]]), 11)[0], recompute(replaced + [3]))


def test_trees_take_the_eager_path_of_a_compiled_generator(qwen_pair, monkeypatch) -> None:
    drafter = noisy_multimodal_copy(qwen_pair.target, len(qwen_pair.tokenizer), noise=0.5)
    generator = SpeculativeGenerator(qwen_pair.target, drafter, qwen_pair.processor, compile_drafter=True,
                                     compile_backend="eager", compile_max_length=256)
    steps = _count_steps(monkeypatch)
    inputs = prompt_inputs(qwen_pair, "What colour is the square?", random_image(4))
    output = generator.generate_from_inputs(inputs, max_new_tokens=16, num_draft_tokens=4, strategy="tree")
    assert output.generated_ids[0].tolist() == _reference(qwen_pair, inputs, 16)
    assert steps == []
    chain = generator.generate_from_inputs(inputs, max_new_tokens=16, num_draft_tokens=4, strategy="adaptive")
    assert chain.generated_ids[0].tolist() == _reference(qwen_pair, inputs, 16)
    assert steps  # an adaptive chain is a chain: it takes the static step
