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
from massv.speculative.strategy import TreeShape
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


def test_sliding_window_drafter_rolls_back_on_the_static_cache_over_a_long_request(monkeypatch) -> None:
    """Gemma3's sliding static layers count writes twice (a tensor and a Python int); a rollback that reset only
    the tensor made them roll as a ring buffer once rejected drafts had pushed the count past the cache."""
    pair = build_tiny_pair("gemma3", target_kwargs={"sliding_window": 128})
    drafter = noisy_multimodal_copy(pair.target, len(pair.tokenizer), noise=0.5)
    static = SpeculativeGenerator(pair.target, drafter, pair.processor, compile_drafter=True, compile_backend="eager",
                                  compile_max_length=128)
    eager = SpeculativeGenerator(pair.target, drafter, pair.processor)
    steps = _count_steps(monkeypatch)
    inputs = prompt_inputs(pair, "What colour is the square?", random_image(1))
    output = static.generate_from_inputs(inputs, max_new_tokens=64, num_draft_tokens=6, temperature=1.0, seed=3)
    reference = eager.generate_from_inputs(inputs, max_new_tokens=64, num_draft_tokens=6, temperature=1.0, seed=3)
    written = inputs["input_ids"].shape[1] + sum(output.stats.judged_drafts) + len(output.stats.judged_drafts)
    assert written > 128, "the request never wrote past the cache length: the rolling case was not reached"
    assert len(steps) > 0
    assert output.generated_ids.tolist() == reference.generated_ids.tolist()
    assert output.stats.accepted_drafts == reference.stats.accepted_drafts


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


def _count_node_steps(monkeypatch) -> list[int]:
    widths: list[int] = []
    original = StaticDecoder.nodes_step

    def counting(self, input_ids, position_ids, masks, first_slot):
        widths.append(input_ids.shape[1])
        return original(self, input_ids, position_ids, masks, first_slot)

    monkeypatch.setattr(StaticDecoder, "nodes_step", counting)
    return widths


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_trees_on_the_static_cache_draft_and_accept_exactly_as_the_eager_trees(family, qwen_pair, monkeypatch) -> None:
    """A compiled generator grows trees on its static cache: every depth one fixed-width node step (the
    frontier padded to top_k), accepted paths gathered into place in the static cache. Greedy output equals
    generate(); greedy and sampled blocks equal the eager tree's, block for block."""
    # Gemma3's sliding layers: a window as long as the static cache (the static path's condition), still
    # sliding layers with their own mask kind.
    pair = qwen_pair if family == "qwen2_5_vl" else build_tiny_pair(family, target_kwargs={"sliding_window": 128})
    drafter = noisy_multimodal_copy(pair.target, len(pair.tokenizer), noise=0.5)
    static = SpeculativeGenerator(pair.target, drafter, pair.processor, compile_drafter=True, compile_backend="eager",
                                  compile_max_length=128)
    eager = SpeculativeGenerator(pair.target, drafter, pair.processor)
    widths = _count_node_steps(monkeypatch)
    shape = TreeShape(size=8, depth=4, top_k=2, min_probability=0.0, min_node_probability=0.0, width=None)
    partial = 0
    for seed in range(2):
        inputs = prompt_inputs(pair, "What colour is the square?", random_image(seed))
        output = static.generate_from_inputs(inputs, max_new_tokens=16, strategy="tree", tree=shape)
        assert output.generated_ids[0].tolist() == _reference(pair, inputs, 16)
        eager_output = eager.generate_from_inputs(inputs, max_new_tokens=16, strategy="tree", tree=shape)
        assert output.stats.accepted_drafts == eager_output.stats.accepted_drafts
        partial += sum(1 for accepted in output.stats.accepted_drafts if 0 < accepted < shape.depth)
        sampled = static.generate_from_inputs(inputs, max_new_tokens=16, strategy="tree", tree=shape,
                                              temperature=1.0, seed=seed)
        eager_sampled = eager.generate_from_inputs(inputs, max_new_tokens=16, strategy="tree", tree=shape,
                                                   temperature=1.0, seed=seed)
        assert sampled.generated_ids.tolist() == eager_sampled.generated_ids.tolist()
    assert widths and set(widths) == {shape.top_k}, "the tree's depths did not take the fixed-width static step"
    assert partial > 0, "no tree block was partly accepted: the in-place path gather was not exercised"


def test_static_tree_path_gather_leaves_the_cache_a_recompute_would(qwen_pair) -> None:
    """`keep_slots` moves the accepted nodes' entries into place: the next step's logits equal a recompute
    over the committed tokens, although other nodes were written after them."""
    drafter = noisy_text_copy(qwen_pair.target, noise=0.5)
    decoder = StaticDecoder(drafter, 64, backend="eager")
    prefix = torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        decoder.start_request()
        drafter(input_ids=torch.tensor([prefix]), position_ids=torch.arange(6)[None], use_cache=True,
                logits_to_keep=1, **decoder.prompt_kwargs(0, 6))
        # Three sibling nodes at position 6, each seeing the prefix and itself; keep the third (slot 8).
        visible = torch.zeros(3, 64, dtype=torch.bool)
        visible[:, :6] = True
        visible[torch.arange(3), 6 + torch.arange(3)] = True
        mask = torch.zeros(3, 64).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]
        siblings = [11, 12, 13]
        decoder.nodes_step(torch.tensor([siblings]), torch.full((1, 3), 6), {"full_attention": mask}, 6)
        decoder.keep_slots(6, [8])
        step = decoder.step(torch.tensor([[21]]), 7)[0]
    expected = drafter(input_ids=torch.tensor([prefix + [13, 21]])).logits[0, -1].float()
    torch.testing.assert_close(step, expected)


def test_trees_too_long_for_the_static_cache_take_the_eager_path(qwen_pair, monkeypatch) -> None:
    drafter = noisy_multimodal_copy(qwen_pair.target, len(qwen_pair.tokenizer), noise=0.5)
    inputs = prompt_inputs(qwen_pair, "What colour is the square?", random_image(4))
    shape = TreeShape()
    # Room for the chain's request, not for a whole tree behind it.
    room = inputs["input_ids"].shape[1] + 16 + 4 + 1
    generator = SpeculativeGenerator(qwen_pair.target, drafter, qwen_pair.processor, compile_drafter=True,
                                     compile_backend="eager", compile_max_length=room + shape.depth * shape.top_k - 1)
    widths = _count_node_steps(monkeypatch)
    output = generator.generate_from_inputs(inputs, max_new_tokens=16, num_draft_tokens=4, strategy="tree", tree=shape)
    assert output.generated_ids[0].tolist() == _reference(qwen_pair, inputs, 16)
    assert widths == []
