"""The speculative engine is lossless under greedy decoding, keeps exact stats, and rolls caches back exactly.

Tiny random instances of the real architectures (massv.tiny): random weights make the text drafter almost
always wrong (exercising rejection and rollback), and `TargetAsDrafter` always right (exercising full
acceptance, bonus tokens and end-of-sequence inside an accepted block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from massv.drafter import MultimodalDrafter
from massv.families import FamilyAdapter, get_adapter
from massv.speculative import GenerationStats, SpeculativeGenerator, TargetAsDrafter
from massv.speculative import CommittedTokens, DraftRequest, SamplingConfig, TargetVerifier, proposer_class_for
from massv.tiny import TinyPair, build_tiny_pair
from tests.engine_helpers import noisy_multimodal_copy, noisy_text_copy

FAMILIES = ["qwen2_5_vl", "gemma3"]
TEMPLATES = [
    "What colour is the {shape}?",
    "How many {shape}s are there?",
    "Describe the image.",
    "Where is the {colour} {shape}?",
    "Are there more {shape}s than circles? Answer briefly.",
]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
COLOURS = ["red", "blue", "green", "yellow", "purple"]
NUM_CASES = 20
DRAFT_LENGTHS = (1, 3, 8)
# None is a multiple of 2, 4 or 9 (= γ + 1): the last block is always cut short by max_new_tokens.
MAX_NEW_TOKENS = (23, 11, 17)
NOISE = 0.8  # LM-head noise of the partly agreeing drafters (relative to the weights' std)


@dataclass
class FamilySetup:
    pair: TinyPair
    adapter: FamilyAdapter
    multimodal_drafter: MultimodalDrafter
    noisy_drafters: dict  # kind -> a drafter that agrees with the target partly
    cases: list  # processor outputs (BatchFeature), one per random prompt/image pair
    references: dict  # (id(inputs), max_new_tokens, eos) -> target.generate's new ids

    def drafter(self, kind: str):
        return {
            "multimodal": self.multimodal_drafter,
            "text": self.pair.drafter_lm,
            "target-copy": TargetAsDrafter(self.pair.target),
            **self.noisy_drafters,
        }[kind]

    def reference(self, inputs, max_new_tokens: int) -> list[int]:
        """Greedy `target.generate`, memoised: several tests compare against the same runs."""
        key = (id(inputs), max_new_tokens, str(self.pair.target.generation_config.eos_token_id))
        if key not in self.references:
            output = self.pair.target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            self.references[key] = output[0, inputs["input_ids"].shape[1]:].tolist()
        return self.references[key]


def _random_case(rng: np.random.Generator, pair: TinyPair, adapter: FamilyAdapter):
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    prompt = template.format(shape=SHAPES[int(rng.integers(len(SHAPES)))], colour=COLOURS[int(rng.integers(len(COLOURS)))])
    text = pair.processor.apply_chat_template(adapter.user_messages(prompt), add_generation_prompt=True, tokenize=False)
    return pair.processor(text=[text], images=[image], return_tensors="pt")


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request) -> FamilySetup:
    pair = build_tiny_pair(request.param)
    adapter = get_adapter(pair.target.config)
    drafter = MultimodalDrafter.from_target(pair.target, pair.drafter_lm, len(pair.tokenizer)).eval()
    rng = np.random.default_rng(1234)
    cases = [_random_case(rng, pair, adapter) for _ in range(NUM_CASES)]
    noisy = {"noisy-text": noisy_text_copy(pair.target, NOISE),
             "noisy-multimodal": noisy_multimodal_copy(pair.target, len(pair.tokenizer), NOISE)}
    return FamilySetup(pair, adapter, drafter, noisy, cases, {})


def _check_stats_consistent(stats: GenerationStats, generated: list[int]) -> None:
    assert stats.new_tokens == len(generated)
    assert stats.target_forwards == 1 + stats.verification_steps
    assert sum(stats.accepted_lengths) == len(generated) - 1  # the prefill emits the first token
    for accepted, judged, proposed in zip(stats.accepted_drafts, stats.judged_drafts, stats.proposed_drafts):
        assert 0 <= accepted <= judged <= proposed <= stats.num_draft_tokens


# ---- 1. greedy == target.generate --------------------------------------------------------------------
@pytest.mark.parametrize("drafter_kind", ["multimodal", "text", "noisy-text", "noisy-multimodal"])
def test_greedy_matches_target_generate(setup: FamilySetup, drafter_kind: str) -> None:
    generator = SpeculativeGenerator(setup.pair.target, setup.drafter(drafter_kind), setup.pair.processor)
    rejections = partial_blocks = 0
    for index, inputs in enumerate(setup.cases):
        num_draft_tokens = DRAFT_LENGTHS[index % 3]
        max_new_tokens = MAX_NEW_TOKENS[(index // 3) % 3]
        expected = setup.reference(inputs, max_new_tokens)
        output = generator.generate_from_inputs(inputs, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens)
        generated = output.generated_ids[0].tolist()
        assert generated == expected, f"case {index} (γ={num_draft_tokens}, N={max_new_tokens}) differs"
        assert torch.equal(output.sequences[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])
        _check_stats_consistent(output.stats, generated)
        rejections += sum(j - a for j, a in zip(output.stats.judged_drafts, output.stats.accepted_drafts))
        partial_blocks += sum(0 < a < p for a, p in zip(output.stats.accepted_drafts, output.stats.proposed_drafts))
    assert rejections > 0, "the drafter should have been rejected somewhere: rollback was not exercised"
    if drafter_kind.startswith("noisy"):
        # Blocks accepted in part: the rollback keeps some drafts and drops others, in both caches.
        assert partial_blocks >= 5, partial_blocks


def test_text_only_prompt_matches_target_generate(setup: FamilySetup) -> None:
    """No image at all: the family's prompt inputs fall back to text positions; still lossless."""
    tokenizer = setup.pair.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Describe a red circle."}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = setup.pair.processor(text=[text], return_tensors="pt")
    expected = setup.reference(inputs, 13)
    for kind in ("multimodal", "text"):
        generator = SpeculativeGenerator(setup.pair.target, setup.drafter(kind), setup.pair.processor)
        output = generator.generate_from_inputs(inputs, max_new_tokens=13, num_draft_tokens=3)
        assert output.generated_ids[0].tolist() == expected


def test_generate_from_images_and_prompt(setup: FamilySetup) -> None:
    """The convenience entry point builds the same inputs as the processor path and decodes the text."""
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    prompt = "What colour is the square?"
    text = setup.pair.processor.apply_chat_template(setup.adapter.user_messages(prompt), add_generation_prompt=True,
                                                    tokenize=False)
    inputs = setup.pair.processor(text=[text], images=[image], return_tensors="pt")
    generator = SpeculativeGenerator(setup.pair.target, setup.multimodal_drafter, setup.pair.processor)
    output = generator.generate(image, prompt=prompt, max_new_tokens=9, num_draft_tokens=3)
    assert output.generated_ids[0].tolist() == setup.reference(inputs, 9)
    assert output.text == setup.pair.tokenizer.decode(output.generated_ids[0], skip_special_tokens=True)
    assert output.stats.to_dict()["new_tokens"] == 9


def test_unset_settings_follow_target_generation_config(setup: FamilySetup) -> None:
    """A repetition penalty in the generation config is applied by a bare target.generate(): by us too."""
    target, inputs = setup.pair.target, setup.cases[5]
    original = target.generation_config.repetition_penalty
    target.generation_config.repetition_penalty = 1.5
    try:
        output = target.generate(**inputs, do_sample=False, max_new_tokens=17)
        expected = output[0, inputs["input_ids"].shape[1]:].tolist()
        generator = SpeculativeGenerator(target, TargetAsDrafter(target), setup.pair.processor)
        assert generator.resolve_settings(0.0).repetition_penalty == 1.5
        got = generator.generate_from_inputs(inputs, max_new_tokens=17, num_draft_tokens=3).generated_ids[0].tolist()
    finally:
        target.generation_config.repetition_penalty = original
    assert got == expected
    assert expected != setup.reference(inputs, 17), "the penalty should change this output, or the test shows nothing"
    assert generator.resolve_settings(0.7).top_k == 50  # generate()'s default when nothing sets top_k
    assert generator.resolve_settings(0.7, top_k=0).top_k == 0


# ---- end of sequence inside a block -----------------------------------------------------------------
@pytest.mark.parametrize("drafter_kind", ["target-copy", "text", "multimodal"])
def test_stops_exactly_at_eos_inside_a_block(setup: FamilySetup, drafter_kind: str) -> None:
    """Make a token the target emits at step 3..8 the EOS (as one id of a list): both must stop right there.

    With the agreeing drafter and γ=8, that EOS is an *accepted draft* in the middle of a block, so the
    tokens after it in the block must be dropped; with the random drafters it is the target's own token.
    """
    target = setup.pair.target
    # A case whose output has a first-time token at index 3..8: inside the first γ=8 block of drafts.
    inputs, free_run, stop_at = next(
        (case, run, index) for case in setup.cases for run in [setup.reference(case, 30)]
        for index in range(3, 9) if run[index] not in run[:index]
    )
    eos_token = free_run[stop_at]
    original_eos = target.generation_config.eos_token_id
    original_list = original_eos if isinstance(original_eos, list) else [original_eos]
    target.generation_config.eos_token_id = original_list + [eos_token]
    try:
        expected = setup.reference(inputs, 30)
        generator = SpeculativeGenerator(target, setup.drafter(drafter_kind), setup.pair.processor)
        output = generator.generate_from_inputs(inputs, max_new_tokens=30, num_draft_tokens=8)
    finally:
        target.generation_config.eos_token_id = original_eos
    assert expected == free_run[: stop_at + 1]
    assert output.generated_ids[0].tolist() == expected
    assert output.stats.stopped_by == "eos"
    _check_stats_consistent(output.stats, expected)
    if drafter_kind == "target-copy":
        # One block: the drafter stops at its drafted EOS (draft stop_at - 1, after the prefill's token);
        # it is accepted and ends the output. Nothing past it is drafted (main drafted all 8).
        assert output.stats.accepted_lengths == [stop_at]
        assert output.stats.accepted_drafts == [stop_at]
        assert output.stats.proposed_drafts == [stop_at]


# ---- 2. an agreeing drafter: exact stats ------------------------------------------------------------
@pytest.mark.parametrize("num_draft_tokens", DRAFT_LENGTHS)
def test_target_as_drafter_accepts_everything(setup: FamilySetup, num_draft_tokens: int) -> None:
    max_new_tokens = 23
    inputs = setup.cases[1]
    generator = SpeculativeGenerator(setup.pair.target, TargetAsDrafter(setup.pair.target), setup.pair.processor)
    output = generator.generate_from_inputs(inputs, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens)
    stats = output.stats
    assert output.generated_ids[0].tolist() == setup.reference(inputs, max_new_tokens)

    full_steps, last = divmod(max_new_tokens - 1, num_draft_tokens + 1)
    expected_lengths = [num_draft_tokens + 1] * full_steps + ([last] if last else [])
    assert stats.accepted_lengths == expected_lengths
    assert stats.accepted_drafts == [length - 1 for length in expected_lengths]
    assert stats.proposed_drafts == stats.judged_drafts == stats.accepted_drafts
    assert stats.acceptance_rate == 1.0 and stats.accepted_over_proposed == 1.0
    assert stats.position_acceptance == [1.0] * num_draft_tokens
    assert stats.position_judged[0] == len(expected_lengths)
    assert stats.mean_accepted_length == pytest.approx((max_new_tokens - 1) / len(expected_lengths))
    assert stats.target_forwards == 1 + len(expected_lengths)
    assert stats.drafter_forwards == 1 + sum(stats.proposed_drafts)  # the prompt pass, then one forward per draft
    assert stats.mean_accepted_length_full_blocks == num_draft_tokens + 1  # whatever max_new_tokens clips
    assert stats.stopped_by == "max_new_tokens"
    summary = stats.to_dict()
    assert summary["verification_steps"] == len(expected_lengths)
    assert summary["tokens_per_second"] > 0


# ---- vision encoder once per request ----------------------------------------------------------------
@pytest.mark.parametrize("drafter_kind", ["multimodal", "text", "target-copy"])
def test_vision_encoder_runs_once_per_request(setup: FamilySetup, drafter_kind: str) -> None:
    vision_modules = setup.adapter.vision_modules(setup.pair.target)
    tower = next(iter(vision_modules.values()))  # Qwen: visual; Gemma: vision_tower
    calls = []
    handle = tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        generator = SpeculativeGenerator(setup.pair.target, setup.drafter(drafter_kind), setup.pair.processor)
        generator.generate_from_inputs(setup.cases[2], max_new_tokens=12, num_draft_tokens=3)
    finally:
        handle.remove()
    assert len(calls) == 1


# ---- 3. cache rollback ------------------------------------------------------------------------------
def _full_recompute_logits(setup: FamilySetup, inputs, appended: list[int]) -> torch.Tensor:
    """Next-token logits from one cache-free forward over prompt + `appended` (the reference)."""
    target, adapter = setup.pair.target, setup.adapter
    image_inputs = {name: inputs[name] for name in adapter.image_input_names if name in inputs}
    input_ids = torch.cat([inputs["input_ids"], torch.tensor([appended])], dim=1)
    kwargs, _ = adapter.target_prefill_kwargs(input_ids, image_inputs, target)
    projected = adapter.encode_images(adapter.vision_modules(target), image_inputs, "projected")
    kwargs.update(adapter.target_image_kwargs(image_inputs, projected))
    with torch.no_grad():
        return target(input_ids=input_ids, use_cache=False, **kwargs).logits[0, -1].float()


def test_target_cache_rollback_matches_recompute(setup: FamilySetup) -> None:
    """Verify a block, roll part of it back, repeat past the sliding window; logits equal a recompute."""
    target, adapter = setup.pair.target, setup.adapter
    inputs = setup.cases[3]
    image_inputs = {name: inputs[name] for name in adapter.image_input_names if name in inputs}
    projected = adapter.encode_images(adapter.vision_modules(target), image_inputs, "projected")
    verifier = TargetVerifier(target, adapter)
    rng = np.random.default_rng(5)
    kept: list[int] = []
    text_vocab = len(setup.pair.tokenizer)
    with torch.no_grad():
        verifier.prefill(inputs["input_ids"], image_inputs, projected)
        for _ in range(10):
            block = rng.integers(10, text_vocab - 10, size=6).tolist()
            verifier.verify(torch.tensor([block]))
            num_dropped = int(rng.integers(1, 6))
            verifier.rollback(num_dropped)
            kept += block[: 6 - num_dropped]
            next_token = int(rng.integers(10, text_vocab - 10))
            cached_logits = verifier.verify(torch.tensor([[next_token]]))[-1].float()
            verifier.rollback(0)
            kept.append(next_token)
            reference = _full_recompute_logits(setup, inputs, kept)
            assert torch.allclose(cached_logits, reference, atol=1e-5, rtol=0), (cached_logits - reference).abs().max()
    assert verifier.length == inputs["input_ids"].shape[1] + len(kept)
    window = target.config.get_text_config().sliding_window
    if any(layer.is_sliding for layer in verifier.cache.layers):
        assert len(kept) > window  # the generated part alone crossed the window: the hard case was tested


@pytest.mark.parametrize("drafter_kind", ["multimodal", "text"])
def test_drafter_cache_rollback_matches_recompute(setup: FamilySetup, drafter_kind: str) -> None:
    """After many propose/commit rounds the proposer's next q equals a fresh proposer's on the same tokens.

    (A wrong drafter cache would never break losslessness, only acceptance: hence its own test.)
    """
    drafter = setup.drafter(drafter_kind)
    inputs = setup.cases[4]
    adapter, target = setup.adapter, setup.pair.target
    image_inputs = {name: inputs[name] for name in adapter.image_input_names if name in inputs}
    features = adapter.encode_image_features(adapter.vision_modules(target), image_inputs, ("projected",))
    proposer_class = proposer_class_for(drafter)
    request = DraftRequest(target=target, adapter=adapter, prompt_ids=inputs["input_ids"], image_inputs=image_inputs,
                           vision_features=features, settings=SamplingConfig(temperature=1.0),
                           eos_token_ids=frozenset(), replacement_id=0)

    def started(sequence: CommittedTokens):
        proposer = proposer_class(drafter, request)
        proposer.prefill(sequence)
        return proposer

    rng = np.random.default_rng(6)
    sequence = CommittedTokens(inputs["input_ids"], capacity=200)
    sequence.append([int(rng.integers(10, 100))])
    proposer = started(sequence)
    kept_counts = []
    with torch.no_grad():
        for _ in range(12):
            proposal = proposer.propose(sequence, 4)
            num_kept = int(rng.integers(0, 5))
            kept_counts.append(num_kept)
            proposer.commit(num_kept)
            sequence.append(proposal.token_list[:num_kept] + [int(rng.integers(10, 100))])
        cached_q = proposer.propose(sequence, 1).probs[0]
        fresh = CommittedTokens(inputs["input_ids"], capacity=200)
        fresh.append(sequence.generated)
        reference_q = started(fresh).propose(fresh, 1).probs[0]
    assert len(sequence.generated) > 16  # past the tiny configs' sliding window
    assert 0 in kept_counts and 4 in kept_counts  # full rejection and full acceptance both exercised
    assert torch.allclose(cached_q, reference_q, atol=1e-5, rtol=0), (cached_q - reference_q).abs().max()
