"""The engine's contract with real users: devices, inputs, pairs, processors, arguments, stats, streaming.

Each test here pins a defect the first engine had (issue "Engine v2"): all of them failed on it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, RepetitionPenaltyLogitsProcessor, TextIteratorStreamer

from massv.drafter import MultimodalDrafter
from massv.families import get_adapter
from massv.speculative import (
    DrafterPairError,
    SpeculativeGenerator,
    TargetAsDrafter,
    UnsupportedInputError,
    UnsupportedSettingError,
)
from massv.speculative.strategy import AdaptiveLength, TreeShape
from massv.speculative.sampling import SamplingConfig, ScoreProcessor, TokenHistory, apply_repetition_penalty
from massv.tiny import build_tiny_pair
from tests.conftest import prompt_inputs, random_image
from tests.engine_helpers import noisy_text_copy


@pytest.fixture(scope="module", params=["qwen2_5_vl", "gemma3"])
def pair(request):
    return build_tiny_pair(request.param)


@pytest.fixture(scope="module")
def image_inputs(pair):
    return prompt_inputs(pair, "What colour is the square?", random_image(3))


def _reference(pair, inputs, max_new_tokens: int, **kwargs) -> list[int]:
    output = pair.target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def _vision_calls(pair):
    """A counter of vision-tower forwards (Qwen: visual; Gemma: vision_tower)."""
    tower = next(iter(get_adapter(pair.target.config).vision_modules(pair.target).values()))
    calls: list[int] = []
    return calls, tower.register_forward_hook(lambda *args: calls.append(1))


# ---- 1. tensors an adapter builds lie on the model's device -------------------------------------------
def test_decode_positions_lie_on_the_requested_device(pair, image_inputs) -> None:
    """Gemma3 built decode positions on the CPU whatever the model's device (a CUDA target crashed)."""
    adapter = get_adapter(pair.target.config)
    images = {name: image_inputs[name] for name in adapter.image_input_names}
    _, state = adapter.target_prefill_kwargs(image_inputs["input_ids"], images, pair.target)
    text_positions = torch.arange(40, 43, device="meta")  # stands in for a CUDA tensor: no data, a device
    kwargs = adapter.target_decode_kwargs(state, text_positions)
    assert {tensor.device.type for tensor in kwargs.values()} == {"meta"}
    assert kwargs["position_ids"].shape[-1] == 3


# ---- 2. unknown processor outputs are refused by name ------------------------------------------------
def test_video_inputs_are_refused_by_name(pair, image_inputs) -> None:
    generator = SpeculativeGenerator(pair.target, TargetAsDrafter(pair.target), pair.processor)
    inputs = dict(image_inputs, pixel_values_videos=torch.zeros(4, 8), video_grid_thw=torch.tensor([[1, 2, 2]]))
    with pytest.raises(UnsupportedInputError, match="pixel_values_videos.*video_grid_thw"):
        generator.generate_from_inputs(inputs, max_new_tokens=4)
    # The family's own derived ids (token types) are known and accepted.
    generator.generate_from_inputs(image_inputs, max_new_tokens=2)


# ---- 3. the pair is checked at construction ------------------------------------------------------------
def test_drafter_of_another_family_is_refused(pair) -> None:
    other = build_tiny_pair("gemma3" if pair.target.config.model_type == "qwen2_5_vl" else "qwen2_5_vl")
    with pytest.raises(DrafterPairError, match="does not share the tokenizer"):
        SpeculativeGenerator(pair.target, other.drafter_lm, pair.processor)
    foreign = MultimodalDrafter.from_target(other.target, other.drafter_lm, len(other.tokenizer))
    with pytest.raises(DrafterPairError, match="trained for a"):
        SpeculativeGenerator(pair.target, foreign, pair.processor)


def test_drafter_with_a_smaller_embedding_is_refused(pair) -> None:
    small = build_tiny_pair(pair.target.config.model_type, vocab_size=300).drafter_lm
    with pytest.raises(DrafterPairError, match=r"embeds \d+ token ids but the target.s tokenizer emits ids up to"):
        SpeculativeGenerator(pair.target, small, pair.processor)


def test_massv_drafter_for_another_target_size_is_refused(pair) -> None:
    family = pair.target.config.model_type
    wider = build_tiny_pair(family, target_kwargs={"hidden_size": 96} if family == "gemma3" else {"hidden_size": 96})
    drafter = MultimodalDrafter.from_target(wider.target, pair.drafter_lm, len(pair.tokenizer))
    with pytest.raises(DrafterPairError, match="different target size"):
        SpeculativeGenerator(pair.target, drafter, pair.processor)


# ---- 4. the drafter's q gets the same processors as p --------------------------------------------------
def test_repetition_penalty_shapes_the_drafts_too(pair, image_inputs) -> None:
    """With the target drafting for itself at penalty 1.5, every greedy draft must be accepted (main: 0.64)."""
    generator = SpeculativeGenerator(pair.target, TargetAsDrafter(pair.target), pair.processor)
    output = generator.generate_from_inputs(image_inputs, max_new_tokens=24, num_draft_tokens=4,
                                            repetition_penalty=1.5)
    assert output.generated_ids[0].tolist() == _reference(pair, image_inputs, 24, repetition_penalty=1.5)
    assert output.stats.acceptance_rate == 1.0


def test_block_repetition_penalty_equals_hf_processor_row_by_row() -> None:
    """Row i of a block sees history + drafts[:i]: the same scores HF's processor gives each prefix."""
    generator = torch.Generator().manual_seed(0)
    vocab, penalty = 50, 1.7
    prefix = torch.randint(0, vocab, (1, 12), generator=generator)
    drafts = torch.tensor([prefix[0, 3].item(), 7, 7, 41])  # a repeat of the prefix and a repeated draft
    logits = torch.randn(len(drafts) + 1, vocab, generator=generator)
    history = TokenHistory(vocab, torch.device("cpu"))
    history.add(prefix)
    ours = apply_repetition_penalty(logits, history.rows_with(drafts), penalty)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for row in range(len(drafts) + 1):
        row_prefix = torch.cat([prefix, drafts[:row].view(1, -1)], dim=1)
        expected = hf(row_prefix, logits[row : row + 1].clone())[0]
        assert torch.allclose(ours[row], expected), row


@pytest.mark.parametrize("settings", [
    {"temperature": 0.8, "top_k": 5, "top_p": 0.9},
    {"temperature": 1.3, "min_p": 0.05},
    {"temperature": 1.0, "typical_p": 0.8},
    {"temperature": 1.0, "epsilon_cutoff": 3e-3},
    {"temperature": 1.0, "eta_cutoff": 3e-3, "repetition_penalty": 1.2},
])
def test_block_scores_equal_generate_scores(pair, image_inputs, settings) -> None:
    """The distribution the engine verifies against is the one `generate(do_sample=True)` samples from."""
    config = SamplingConfig(**settings)
    reference = pair.target.generate(**image_inputs, max_new_tokens=1, output_scores=True,
                                     return_dict_in_generate=True, **config.generate_kwargs()).scores[0][0]
    with torch.no_grad():
        logits = pair.target(**image_inputs).logits[0, -1:]
    history = TokenHistory(logits.shape[-1], logits.device)
    history.add(image_inputs["input_ids"])
    ours = ScoreProcessor(config, logits.device)(logits, history.seen.unsqueeze(0))[0]
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(ours)) and int(finite.sum()) > 1
    assert torch.allclose(ours[finite], reference[finite], atol=1e-5)


# ---- 5. one vision pass, whatever the drafter reads ---------------------------------------------------
@pytest.mark.parametrize("num_draft_tokens", [0, 3])
def test_pre_merger_drafter_runs_the_vision_tower_once(pair, image_inputs, num_draft_tokens: int) -> None:
    drafter = MultimodalDrafter.from_target(pair.target, pair.drafter_lm, len(pair.tokenizer),
                                            vision_feature="pre_merger").eval()
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor)
    calls, handle = _vision_calls(pair)
    try:
        output = generator.generate_from_inputs(image_inputs, max_new_tokens=9, num_draft_tokens=num_draft_tokens)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert output.generated_ids[0].tolist() == _reference(pair, image_inputs, 9)


# ---- 6. settings generate() applies and the engine cannot: refused -------------------------------------
@pytest.mark.parametrize(("name", "value"), [
    ("no_repeat_ngram_size", 2), ("exponential_decay_length_penalty", (2, 1.5)), ("stop_strings", ["red"]),
    ("max_time", 5.0), ("guidance_scale", 1.5), ("suppress_tokens", [5]), ("min_new_tokens", 3),
])
def test_unsupported_generation_settings_are_refused(pair, image_inputs, name, value) -> None:
    target = pair.target
    original = target.generation_config
    target.generation_config = GenerationConfig(**original.to_dict())
    setattr(target.generation_config, name, value)
    try:
        generator = SpeculativeGenerator(target, TargetAsDrafter(target), pair.processor)
        with pytest.raises(UnsupportedSettingError, match=name):
            generator.generate_from_inputs(image_inputs, max_new_tokens=4)
    finally:
        target.generation_config = original


def test_renormalize_logits_is_lossless(pair, image_inputs) -> None:
    """`renormalize_logits` (log-softmax at the end) changes neither argmax nor softmax: accepted as is."""
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.8), pair.processor)
    pair.target.generation_config.renormalize_logits = True
    try:
        got = generator.generate_from_inputs(image_inputs, max_new_tokens=10, num_draft_tokens=3)
        expected = _reference(pair, image_inputs, 10)
    finally:
        pair.target.generation_config.renormalize_logits = False
    assert got.generated_ids[0].tolist() == expected


# ---- 7. bad arguments fail before any model work -------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_draft_tokens": 2.5}, "num_draft_tokens must be an integer"),
    ({"num_draft_tokens": -1}, "num_draft_tokens must be an integer >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"temperature": None}, "temperature must be a number"),
    ({"temperature": -0.5}, "temperature must be a number >= 0"),
    ({"top_p": 0.0, "temperature": 1.0}, "top_p must be in"),
    ({"beam_width": 3}, "unknown sampling setting"),
])
def test_bad_arguments_fail_before_the_vision_pass(pair, image_inputs, kwargs, message) -> None:
    generator = SpeculativeGenerator(pair.target, pair.drafter_lm, pair.processor)
    calls, handle = _vision_calls(pair)
    try:
        with pytest.raises((ValueError, TypeError), match=message):
            generator.generate_from_inputs(image_inputs, **kwargs)
    finally:
        handle.remove()
    assert calls == []


def test_empty_prompt_is_refused_clearly(pair) -> None:
    generator = SpeculativeGenerator(pair.target, pair.drafter_lm, pair.processor)
    with pytest.raises(ValueError, match="non-empty"):
        generator.generate_from_inputs({"input_ids": torch.zeros(1, 0, dtype=torch.long)})


# ---- 8. MAL over full blocks does not depend on max_new_tokens ----------------------------------------
def test_full_block_mal_is_independent_of_max_new_tokens(pair, image_inputs) -> None:
    generator = SpeculativeGenerator(pair.target, TargetAsDrafter(pair.target), pair.processor)
    plain, full = set(), set()
    for max_new_tokens in (10, 13, 16):  # 9, 12, 15 tokens from verification steps: clipped differently
        stats = generator.generate_from_inputs(image_inputs, max_new_tokens=max_new_tokens, num_draft_tokens=4,
                                               eos_token_id=[]).stats
        plain.add(round(stats.mean_accepted_length, 4))
        full.add(stats.mean_accepted_length_full_blocks)
    assert full == {5.0}
    assert len(plain) == 3  # the per-forward MAL moves with the clipped last block, as documented


# ---- 9. streaming, as generate() does it ---------------------------------------------------------------
class _RecordingStreamer:
    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


def test_streamer_receives_prompt_then_every_token(pair, image_inputs) -> None:
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.8), pair.processor)
    streamer = _RecordingStreamer()
    output = generator.generate_from_inputs(image_inputs, max_new_tokens=14, num_draft_tokens=3, streamer=streamer)
    assert streamer.chunks[0] == image_inputs["input_ids"][0].tolist()
    assert sum(streamer.chunks[1:], []) == output.generated_ids[0].tolist()
    assert len(streamer.chunks) == 2 + output.stats.verification_steps  # prompt, prefill token, one per block
    assert streamer.ended


def test_text_iterator_streamer_yields_the_output_text(pair, image_inputs) -> None:
    generator = SpeculativeGenerator(pair.target, TargetAsDrafter(pair.target), pair.processor)
    streamer = TextIteratorStreamer(pair.tokenizer, skip_prompt=True, skip_special_tokens=True)
    output = generator.generate_from_inputs(image_inputs, max_new_tokens=12, num_draft_tokens=3, streamer=streamer)
    assert "".join(streamer) == output.text


# ---- 10. the hot loop ----------------------------------------------------------------------------------
_HOST_READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")


def _count_engine_host_reads(monkeypatch) -> list[str]:
    """Record every tensor-to-host read made by code in massv/speculative/ (model internals are not counted)."""
    import sys

    reads: list[str] = []
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def reading(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "massv/speculative/" in caller.replace("\\", "/"):
                reads.append(f"{_name} in {caller.rsplit('/', 1)[-1]}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, reading)
    return reads


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_at_most_one_host_sync_per_drafted_token(pair, image_inputs, temperature, monkeypatch) -> None:
    """The loop reads the device back once per drafter forward (to stop at a drafted EOS) and once per
    verification (the verdict, which carries the draft ids with it); sampling adds no reads of its own."""
    drafter = noisy_text_copy(pair.target, noise=0.5)
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor)
    reads = _count_engine_host_reads(monkeypatch)
    output = generator.generate_from_inputs(image_inputs, max_new_tokens=20, num_draft_tokens=4,
                                            temperature=temperature, seed=0)
    monkeypatch.undo()
    stats = output.stats
    drafted = sum(stats.proposed_drafts)
    assert drafted >= 8  # enough blocks for the count to mean something
    # Per request: the padding check of the prompt and the prefill token. Per block: one read per draft but
    # the last (the EOS test), plus the verdict; a block the length budget left without drafts reads once.
    budget = 2 + sum(max(proposed, 1) for proposed in stats.proposed_drafts)
    assert len(reads) <= budget, reads
    assert sum(read.endswith("acceptance.py") for read in reads) == stats.verification_steps  # one verdict each


def test_drafting_stops_at_a_drafted_end_of_sequence(pair, image_inputs, monkeypatch) -> None:
    """A block that drafts EOS first holds one draft and cost one drafter forward: nothing after an EOS
    draft could ever be emitted."""
    from massv.speculative.proposers import language_model

    eos = pair.target.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    drafter = noisy_text_copy(pair.target, noise=0.5)
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor)
    proposals = []
    original_propose = language_model.CausalLMProposer.propose

    def eos_first(self, sequence, max_tokens):
        original = self.processor

        def scores_with_eos_on_top(logits, seen):
            scores = original(logits, seen)
            scores[:, eos] = scores.max() + 10.0
            return scores

        self.processor = scores_with_eos_on_top
        try:
            proposal = original_propose(self, sequence, max_tokens)
        finally:
            self.processor = original
        proposals.append((max_tokens, len(proposal), proposal.forwards))
        return proposal

    monkeypatch.setattr(language_model.CausalLMProposer, "propose", eos_first)
    output = generator.generate_from_inputs(image_inputs, max_new_tokens=12, num_draft_tokens=4)
    assert output.generated_ids[0].tolist() == _reference(pair, image_inputs, 12)  # still lossless
    assert sum(allowed > 1 for allowed, _, _ in proposals) >= 3  # blocks that could have drafted on
    assert all((length, forwards) == (1, 1) for _, length, forwards in proposals)


# ---- 11. the seam: a new drafting strategy without touching the loop -----------------------------------
class _EchoDrafter(torch.nn.Module):
    """A drafter with no model at all: it proposes the last committed token again (prompt-lookup style)."""


class _LoudEchoDrafter(_EchoDrafter):
    pass


def test_a_registered_proposer_drafts_through_the_unchanged_loop(pair, image_inputs) -> None:
    from massv.speculative import Proposal, Proposer, proposer_class_for, register_proposer

    class EchoProposer(Proposer):
        name = "echo"
        commits: list[int] = []

        def __init__(self, drafter, request) -> None:
            self.request = request

        def prefill(self, sequence) -> int:
            return 0

        def propose(self, sequence, max_tokens) -> Proposal:
            last = sequence.ids[0, sequence.length - 1]
            return Proposal(last.repeat(max_tokens).to(self.request.target.device), forwards=0)

        def commit(self, num_accepted) -> None:
            EchoProposer.commits.append(num_accepted)

    class LoudEchoProposer(EchoProposer):
        name = "loud-echo"

    register_proposer(_EchoDrafter)(EchoProposer)
    register_proposer(_LoudEchoDrafter)(LoudEchoProposer)
    assert proposer_class_for(_EchoDrafter()) is EchoProposer
    assert proposer_class_for(_LoudEchoDrafter()) is LoudEchoProposer  # the most specific class wins

    generator = SpeculativeGenerator(pair.target, _EchoDrafter(), pair.processor)
    output = generator.generate_from_inputs(image_inputs, max_new_tokens=16, num_draft_tokens=3)
    assert output.generated_ids[0].tolist() == _reference(pair, image_inputs, 16)
    stats = output.stats  # the loop told it what the target kept, after every block it drafted for
    assert EchoProposer.commits == [accepted for accepted, proposed in zip(stats.accepted_drafts, stats.proposed_drafts)
                                    if proposed > 0]
    assert sum(output.stats.proposed_drafts) > 0


def test_an_unregistered_drafter_type_is_refused_clearly(pair) -> None:
    with pytest.raises(DrafterPairError, match="no proposer is registered for drafters of type Linear"):
        SpeculativeGenerator(pair.target, torch.nn.Linear(2, 2), pair.processor)


# ---- 12. the loop's bookkeeping, against hand counts (eval/results/mutation_engine.md) --------------------
# Tests written from the survivors of the engine loop's mutation run: each pins behaviour no test above saw.
SMALL_TREE = TreeShape(size=6, depth=3, top_k=2, min_probability=0.0, min_node_probability=0.0, width=None)


def _forward_counter(module: torch.nn.Module):
    calls: list[int] = []
    return calls, module.register_forward_hook(lambda *args: calls.append(1))


@pytest.mark.parametrize("strategy", ["chain", "adaptive", "tree"])
def test_tree_and_chains_apply_the_repetition_penalty_to_every_node(pair, image_inputs, strategy) -> None:
    """A tree's rows see the drafts on their own path (`rows_for_tree`), a chain's the drafts before them:
    with a strong penalty the greedy output is still `generate(repetition_penalty=...)`'s."""
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.5), pair.processor)
    output = generator.generate_from_inputs(image_inputs, max_new_tokens=16, num_draft_tokens=3, strategy=strategy,
                                            tree=SMALL_TREE, repetition_penalty=3.0)
    assert output.generated_ids[0].tolist() == _reference(pair, image_inputs, 16, repetition_penalty=3.0)
    assert sum(output.stats.accepted_drafts) > 0  # drafts were kept, so their penalties mattered


@pytest.mark.parametrize("strategy", ["chain", "adaptive", "tree"])
def test_sampling_from_a_point_mass_is_the_greedy_output(pair, image_inputs, strategy) -> None:
    """`temperature=1, top_k=1` samples from a point mass: the sampled path (speculative sampling, the
    residual, the tree's sampled rule) must then give `generate()`'s greedy tokens exactly, whatever the seed."""
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.5), pair.processor)
    expected = _reference(pair, image_inputs, 16)
    for seed in (0, 1):
        output = generator.generate_from_inputs(image_inputs, max_new_tokens=16, num_draft_tokens=3,
                                                strategy=strategy, tree=SMALL_TREE, temperature=1.0, top_k=1,
                                                seed=seed, eos_token_id=[])
        assert output.generated_ids[0].tolist() == expected
        assert not output.settings.greedy
        stats = output.stats
        assert sum(stats.accepted_drafts) > 0 and any(j > a for j, a in zip(stats.judged_drafts, stats.accepted_drafts))


def test_seeded_tree_sampling_ignores_the_global_generator(pair, image_inputs) -> None:
    """A seeded request draws only from its own generators (target side and drafter side)."""
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.5), pair.processor)
    outputs = []
    for global_seed in (11, 12):
        torch.manual_seed(global_seed)
        outputs.append(generator.generate_from_inputs(image_inputs, max_new_tokens=16, strategy="tree",
                                                      tree=SMALL_TREE, temperature=1.0, top_k=0, seed=5,
                                                      eos_token_id=[]).generated_ids[0].tolist())
    assert outputs[0] == outputs[1]
    torch.manual_seed(11)
    other = generator.generate_from_inputs(image_inputs, max_new_tokens=16, strategy="tree", tree=SMALL_TREE,
                                           temperature=1.0, top_k=0, seed=6, eos_token_id=[])
    assert other.generated_ids[0].tolist() != outputs[0]  # the seed is what decides


@pytest.mark.parametrize("strategy", ["chain", "adaptive", "tree"])
def test_forward_counts_equal_the_models_calls(pair, image_inputs, strategy) -> None:
    """`target_forwards` and `drafter_forwards` count the models' actual forwards (prompt passes included)."""
    drafter = noisy_text_copy(pair.target, 0.5)
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor)
    target_calls, target_hook = _forward_counter(pair.target)
    drafter_calls, drafter_hook = _forward_counter(drafter)
    try:
        output = generator.generate_from_inputs(image_inputs, max_new_tokens=15, num_draft_tokens=3,
                                                strategy=strategy, tree=SMALL_TREE, eos_token_id=[])
    finally:
        target_hook.remove()
        drafter_hook.remove()
    stats = output.stats
    assert stats.target_forwards == len(target_calls) == 1 + stats.verification_steps
    assert stats.drafter_forwards == len(drafter_calls) > 1 + stats.verification_steps // 2  # the prompt pass too
    if strategy != "tree":  # a chain: one forward per draft (a tree: one per level it grew)
        assert stats.drafter_forwards == 1 + sum(stats.proposed_drafts)
    assert stats.new_tokens == 15 == len(output.generated_ids[0])
    assert stats.stopped_by == "max_new_tokens"
    assert stats.num_draft_tokens == {"chain": 3, "adaptive": AdaptiveLength().max_tokens, "tree": SMALL_TREE.size}[strategy]
    assert stats.strategy == strategy and stats.prompt_tokens == image_inputs["input_ids"].shape[1]


class _TickingClock:
    """`time.perf_counter` that advances one second per reading: each timed phase lasts one tick per pass."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("strategy", ["chain", "tree"])
def test_phase_times_accumulate_over_every_block(pair, image_inputs, strategy, monkeypatch) -> None:
    import massv.speculative.engine as engine

    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.5), pair.processor)
    clock = _TickingClock()
    monkeypatch.setattr(engine, "time", clock)
    stats = generator.generate_from_inputs(image_inputs, max_new_tokens=12, num_draft_tokens=3, strategy=strategy,
                                           tree=SMALL_TREE, eos_token_id=[]).stats
    monkeypatch.undo()
    steps = stats.verification_steps
    assert steps >= 3
    assert (stats.vision_seconds, stats.prefill_seconds) == (1.0, 1.0)
    assert (stats.drafting_seconds, stats.verifying_seconds) == (steps, steps)  # summed over blocks, not the last
    # readings: the request start, 2 per phase (vision, prefill), 4 per block, the end; total = end - start
    assert stats.total_seconds == clock.now - 1.0 == 2 * 2 + 4 * steps + 1


def test_text_request_runs_no_vision_and_drafts_without_images(pair) -> None:
    inputs = prompt_inputs(pair, "Describe a red circle.", None)
    calls, hook = _vision_calls(pair)
    try:
        output = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.5), pair.processor) \
            .generate_from_inputs(inputs, max_new_tokens=10, num_draft_tokens=2)
    finally:
        hook.remove()
    assert calls == []
    assert output.generated_ids[0].tolist() == _reference(pair, inputs, 10)


def test_end_of_sequence_output_keeps_its_text_and_reason(pair, image_inputs) -> None:
    """Stopping at an EOS id: the stats say why, `sequences` is the prompt followed by `generated_ids`, and
    the text drops special tokens as `decode(..., skip_special_tokens=True)` does (the tiny models never emit
    one, so a copy of the tokenizer marks an emitted token special)."""
    import copy

    free = _reference(pair, image_inputs, 12)
    tokenizer = copy.deepcopy(pair.tokenizer)
    assert tokenizer.add_special_tokens({"additional_special_tokens": [tokenizer.convert_ids_to_tokens(free[1])]}) == 1
    assert len(tokenizer) == len(pair.tokenizer)  # an existing id became special; no id was added
    generator = SpeculativeGenerator(pair.target, TargetAsDrafter(pair.target), tokenizer)
    eos = free[5]
    output = generator.generate_from_inputs(image_inputs, max_new_tokens=12, num_draft_tokens=4, eos_token_id=eos)
    generated = output.generated_ids[0].tolist()
    assert generated == free[: free.index(eos) + 1]
    assert output.stats.stopped_by == "eos" and output.stats.new_tokens == len(generated)
    assert torch.equal(output.sequences[0], torch.cat([image_inputs["input_ids"][0], output.generated_ids[0]]))
    assert output.text == tokenizer.decode(generated, skip_special_tokens=True) != tokenizer.decode(generated)


def test_an_exact_tree_drafter_is_judged_only_on_its_path(pair) -> None:
    """A drafter holding the target's own weights, on a text prompt (nothing it cannot see), always agrees: each
    full tree block is accepted down to a leaf, so no child of the last accepted node was judged
    (judged == accepted), and the output is `generate()`'s."""
    inputs = prompt_inputs(pair, "Describe a red circle.", None)
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.0), pair.processor)
    output = generator.generate_from_inputs(inputs, max_new_tokens=17, strategy="tree", tree=SMALL_TREE,
                                            eos_token_id=[])
    stats = output.stats
    assert output.generated_ids[0].tolist() == _reference(pair, inputs, 17)
    full = [(a, j) for a, j, limited in zip(stats.accepted_drafts, stats.judged_drafts, stats.budget_limited)
            if not limited]
    assert len(full) >= 3 and all(a == j > 0 for a, j in full), full
    assert stats.judged_drafts == stats.accepted_drafts


@pytest.mark.parametrize("strategy", ["chain", "tree"])
def test_judged_drafts_are_the_accepted_ones_and_at_most_one_more(pair, image_inputs, strategy) -> None:
    """The verifier rules on the accepted drafts and, unless it ran out, on the one after them (a chain's next
    draft, a tree's children of the last accepted node): never less, never two more, and at least one
    whenever anything was drafted."""
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.8), pair.processor)
    rejected = 0
    for max_new_tokens in (13, 14):
        stats = generator.generate_from_inputs(image_inputs, max_new_tokens=max_new_tokens, num_draft_tokens=3,
                                               strategy=strategy, tree=SMALL_TREE, eos_token_id=[]).stats
        for proposed, judged, accepted in zip(stats.proposed_drafts, stats.judged_drafts, stats.accepted_drafts):
            assert accepted <= judged <= accepted + 1 and judged <= proposed
            assert (judged >= 1) == (proposed >= 1)
            if strategy == "chain":  # a chain's next draft exists exactly when not all were accepted
                assert judged == accepted + (accepted < proposed)
            rejected += judged > accepted
    assert rejected >= 3


@pytest.mark.parametrize("strategy", ["chain", "tree"])
def test_an_end_of_sequence_draft_ends_the_request_in_its_block(pair, strategy) -> None:
    """EOS among a block's accepted drafts: the request stops right there (tokens, host-side ids, text and
    stats agree), as `generate(eos_token_id=...)` does; the drafts after it (a tree drafts past an EOS node)
    count neither as accepted nor judged."""
    inputs = prompt_inputs(pair, "Describe a red circle.", None)
    free = _reference(pair, inputs, 16, eos_token_id=None)
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.0), pair.processor)
    # The first token comes from the prefill; the first block drafts the next γ = 3 (chain) or a path of 2
    # (the small tree grows two levels here): EOS at a middle draft or at the block's last draft.
    span = {"chain": (1, 2, 3), "tree": (1, 2)}[strategy]
    positions = [position for position in span if free.index(free[position]) == position]  # first occurrences
    assert positions
    for position in positions:
        eos = free[position]
        expected = free[: position + 1]
        output = generator.generate_from_inputs(inputs, max_new_tokens=16, num_draft_tokens=3, strategy=strategy,
                                                tree=SMALL_TREE, eos_token_id=eos)
        stats = output.stats
        generated = output.generated_ids[0].tolist()
        assert generated == expected and stats.stopped_by == "eos" and stats.new_tokens == len(expected)
        assert output.text == pair.tokenizer.decode(expected, skip_special_tokens=True)
        assert sum(stats.accepted_lengths) == len(expected) - 1
        assert stats.accepted_lengths[-1] == stats.accepted_drafts[-1] == stats.judged_drafts[-1]  # EOS was a draft


def test_accepted_drafts_are_committed_from_their_device_copy(pair, monkeypatch) -> None:
    """The accepted drafts already lie on the device: the loop commits that copy (no per-token host-to-device
    write), for chains and for a tree's gathered path alike."""
    from massv.speculative.proposers import CommittedTokens

    commits = []
    original = CommittedTokens.append

    def recording(self, tokens, device_tokens=None):
        commits.append((list(tokens), None if device_tokens is None else device_tokens[: len(tokens)].tolist()))
        return original(self, tokens, device_tokens)

    monkeypatch.setattr(CommittedTokens, "append", recording)
    inputs = prompt_inputs(pair, "Describe a red circle.", None)
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.0), pair.processor)
    for strategy in ("chain", "tree"):
        commits.clear()
        output = generator.generate_from_inputs(inputs, max_new_tokens=14, num_draft_tokens=3,
                                                strategy=strategy, tree=SMALL_TREE, eos_token_id=[])
        with_drafts = [(tokens, device) for tokens, device in commits if device is not None]
        assert len(with_drafts) == sum(accepted > 0 for accepted in output.stats.accepted_drafts) > 0
        assert all(tokens == device for tokens, device in with_drafts)
        assert sum((tokens for tokens, _ in commits), []) == output.generated_ids[0].tolist()


def test_documented_defaults_128_new_tokens_in_blocks_of_4(pair, image_inputs) -> None:
    """`max_new_tokens=128`, `num_draft_tokens=4`: what the docstring (and `generate()`'s callers) rely on."""
    generator = SpeculativeGenerator(pair.target, TargetAsDrafter(pair.target), pair.processor)
    output = generator.generate_from_inputs(image_inputs, eos_token_id=[])
    stats = output.stats
    assert stats.new_tokens == output.generated_ids.shape[1] == 128 and stats.stopped_by == "max_new_tokens"
    assert stats.num_draft_tokens == 4 and stats.strategy == "chain"
    assert set(proposed for proposed, limited in zip(stats.proposed_drafts, stats.budget_limited) if not limited) == {4}


def test_each_request_logs_its_summary_at_debug_level(pair, image_inputs, caplog) -> None:
    import logging

    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.5), pair.processor)
    with caplog.at_level(logging.DEBUG, logger="massv.speculative.engine"):
        stats = generator.generate_from_inputs(image_inputs, max_new_tokens=10, num_draft_tokens=2).stats
    messages = [record.getMessage() for record in caplog.records if record.name == "massv.speculative.engine"]
    assert messages == [f"generated {stats.new_tokens} tokens in {stats.verification_steps} verification steps "
                        f"(MAL {stats.mean_accepted_length:.2f}, α {stats.acceptance_rate:.2f})"]


def test_no_drafts_is_the_target_alone_and_the_drafter_never_runs(pair, image_inputs) -> None:
    """`num_draft_tokens=0`: one target forward per token, the drafter not even prefilled."""
    drafter = noisy_text_copy(pair.target, 0.5)
    calls, hook = _forward_counter(drafter)
    try:
        output = SpeculativeGenerator(pair.target, drafter, pair.processor).generate_from_inputs(
            image_inputs, max_new_tokens=6, num_draft_tokens=0)
    finally:
        hook.remove()
    stats = output.stats
    assert output.generated_ids[0].tolist() == _reference(pair, image_inputs, 6)
    assert calls == [] and stats.drafter_forwards == 0 and set(stats.proposed_drafts) == {0}
    assert stats.target_forwards == stats.new_tokens == 6


def test_a_tree_ignores_num_draft_tokens(pair, image_inputs) -> None:
    """The tree's depth bounds each block (`num_draft_tokens` is documented as unused for trees)."""
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.5), pair.processor)
    runs = [generator.generate_from_inputs(image_inputs, max_new_tokens=14, num_draft_tokens=gamma, strategy="tree",
                                           tree=SMALL_TREE, eos_token_id=[]) for gamma in (1, 6)]
    first, second = (run.stats for run in runs)
    assert runs[0].generated_ids.tolist() == runs[1].generated_ids.tolist()
    for name in ("proposed_drafts", "judged_drafts", "accepted_drafts", "budget_limited", "position_judged"):
        assert getattr(first, name) == getattr(second, name), name
    assert max(first.accepted_drafts) >= 2  # deeper than the γ=1 a wrong length would allow


def test_adaptive_chain_length_follows_the_heuristic_block_by_block(pair, image_inputs) -> None:
    """The drafts of each block are what `AdaptiveLength`'s rule asks for (+2 after a fully accepted block,
    -1 after a rejection, within [1, max_tokens]), cut only by the max_new_tokens budget."""
    settings = AdaptiveLength(max_tokens=6, confidence_threshold=None)  # no early stop: proposed == requested
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.3), pair.processor)
    max_new_tokens = 30
    stats = generator.generate_from_inputs(image_inputs, max_new_tokens=max_new_tokens, num_draft_tokens=2,
                                           strategy="adaptive", adaptive=settings, eos_token_id=[]).stats
    length, generated, expected, moves = 2, 1, [], set()
    for accepted_length, accepted in zip(stats.accepted_lengths, stats.accepted_drafts):
        requested = min(length, max_new_tokens - generated - 1)
        expected.append(requested)
        if accepted < requested:
            length = max(1, length - 1)
            moves.add("down")
        else:
            length = min(settings.max_tokens, length + 2)
            moves.add("up")
        generated += accepted_length
    assert stats.proposed_drafts == expected
    assert moves == {"up", "down"}


def test_the_first_token_is_sampled_when_sampling(pair, image_inputs) -> None:
    """The prefill's token is drawn from the target's distribution like every other (not its argmax): at a
    high temperature, eight seeds give more than one first token; greedy gives `generate()`'s."""
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.5), pair.processor)
    firsts = {generator.generate_from_inputs(image_inputs, max_new_tokens=1, temperature=5.0, top_k=0, seed=seed)
              .generated_ids[0, 0].item() for seed in range(8)}
    assert len(firsts) > 1
    greedy = generator.generate_from_inputs(image_inputs, max_new_tokens=1).generated_ids[0].tolist()
    assert greedy == _reference(pair, image_inputs, 1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_adaptive_confidence_stop_applies_to_greedy_drafting_only(pair, image_inputs, temperature) -> None:
    """`confidence_threshold=0.9999` stops every greedy block after its first draft (a partly agreeing drafter
    is never that sure); sampling ignores the threshold, so its blocks draft what the length rule asks for."""
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.3), pair.processor)
    stats = generator.generate_from_inputs(image_inputs, max_new_tokens=16, num_draft_tokens=3, strategy="adaptive",
                                           adaptive=AdaptiveLength(max_tokens=6, confidence_threshold=0.9999),
                                           temperature=temperature, seed=0, eos_token_id=[]).stats
    if temperature == 0.0:
        assert set(stats.proposed_drafts) == {1}
    else:
        assert max(stats.proposed_drafts) >= 3


def test_a_tree_stops_exactly_at_every_end_of_sequence_id(pair, image_inputs) -> None:
    """For every id of the target's output taken as EOS, a partly agreeing tree drafter stops where
    `generate()` stops; when EOS was an accepted draft, nothing below it counts as judged (the tree never
    expands an EOS node)."""
    free = _reference(pair, image_inputs, 14, eos_token_id=None)
    generator = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.3), pair.processor)
    drafted_eos = 0
    for position in range(1, len(free)):
        if free.index(free[position]) != position:
            continue
        output = generator.generate_from_inputs(image_inputs, max_new_tokens=14, strategy="tree", tree=SMALL_TREE,
                                                eos_token_id=free[position])
        stats = output.stats
        assert output.generated_ids[0].tolist() == free[: position + 1]
        if stats.accepted_drafts and stats.accepted_lengths[-1] == stats.accepted_drafts[-1]:  # EOS was a draft
            drafted_eos += 1
            assert stats.judged_drafts[-1] == stats.accepted_drafts[-1]
    assert drafted_eos >= 1


def test_without_a_processor_the_output_has_ids_and_no_text(pair, image_inputs) -> None:
    """`processor` is optional for `generate_from_inputs`: the same ids as `generate`, and no text to decode."""
    output = SpeculativeGenerator(pair.target, noisy_text_copy(pair.target, 0.5)).generate_from_inputs(
        image_inputs, max_new_tokens=8, num_draft_tokens=3)
    assert output.generated_ids[0].tolist() == _reference(pair, image_inputs, 8)
    assert output.text is None
