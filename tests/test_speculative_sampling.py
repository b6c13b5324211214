"""Speculative sampling emits tokens distributed exactly as the target's: checked statistically.

The check: the empirical distribution of N outcomes over K cells has total-variation distance (TV) from the
true distribution below

    bound(K, N) = 0.5 * sqrt((K - 1) / N) + sqrt(ln(1 / δ) / (2N)),   δ = 1e-6.

Why: E[TV] = 0.5 Σ E|p̂_i - p_i| <= 0.5 Σ sqrt(p_i (1 - p_i) / N) <= 0.5 sqrt((K - 1) / N) (Cauchy-Schwarz),
and one sample moves TV by at most 1/N, so McDiarmid gives P(TV > E[TV] + t) <= exp(-2 N t²). A correct
sampler exceeds the bound with probability below 1e-6; each test also runs deliberately broken acceptance
rules through the same check and asserts that they FAIL it, so the check has teeth. Every token of a block
is counted, the bonus token included. Seeds are fixed, so the outcome is deterministic.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import massv.speculative.engine as engine_module
from massv.speculative import SpeculativeGenerator, accept_sampled, residual_distribution
from massv.speculative.sampling import SamplingConfig, sample
from massv.tiny import build_tiny_pair
from tests.conftest import prompt_inputs, random_image
from tests.engine_helpers import noisy_multimodal_copy

DELTA = 1e-6


def tv_bound(num_cells: int, num_samples: int, delta: float = DELTA) -> float:
    return 0.5 * math.sqrt(max(num_cells - 1, 1) / num_samples) + math.sqrt(math.log(1 / delta) / (2 * num_samples))


def total_variation(counts: Counter, exact: dict, num_samples: int) -> float:
    cells = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(cell, 0) / num_samples - exact.get(cell, 0.0)) for cell in cells)


# ---- broken rules: what a plausible bug looks like (same signature as accept_sampled) -----------------
def _accepted_prefix(drafts, draft_probs, target_probs, generator):
    if drafts.shape[0] == 0:
        return 0
    rows = torch.arange(drafts.shape[0])
    uniform = torch.rand(drafts.shape[0], generator=generator)
    accepted = uniform * draft_probs[rows, drafts] < target_probs[rows, drafts]
    return int(((~accepted).cumsum(0) < 1).sum())


def always_accept(drafts, draft_probs, target_probs, generator=None):
    """Bug: skip the acceptance test (emits the drafter's distribution)."""
    return drafts.shape[0], int(sample(target_probs[drafts.shape[0]], generator)), drafts.tolist()


def resample_from_target(drafts, draft_probs, target_probs, generator=None):
    """Bug: after a rejection, sample from p instead of norm(max(0, p - q)) (over-weights drafted tokens)."""
    count = _accepted_prefix(drafts, draft_probs, target_probs, generator)
    return count, int(sample(target_probs[count], generator)), drafts.tolist()


def bonus_from_previous_row(drafts, draft_probs, target_probs, generator=None):
    """Bug: after full acceptance, draw the bonus token from the last draft's row of p instead of the next."""
    count = _accepted_prefix(drafts, draft_probs, target_probs, generator)
    if count == drafts.shape[0] > 0:
        return count, int(sample(target_probs[count - 1], generator)), drafts.tolist()
    q = torch.zeros_like(target_probs[0]) if count == drafts.shape[0] else draft_probs[count]
    return count, int(sample(residual_distribution(target_probs[count], q), generator)), drafts.tolist()


BROKEN_RULES = [always_accept, resample_from_target, bonus_from_previous_row]


# ---- 1. the acceptance rule on a synthetic Markov chain ---------------------------------------------
# Target p(next | current) and drafter q(next | current) over 4 tokens. q never proposes token 3 (as a
# drafter never proposes ids past its draftable vocabulary), so that mass must come from the residual.
TARGET_TRANSITIONS = torch.tensor([
    [0.10, 0.50, 0.15, 0.25],
    [0.40, 0.05, 0.35, 0.20],
    [0.25, 0.25, 0.05, 0.45],
    [0.60, 0.10, 0.20, 0.10],
])
DRAFT_TRANSITIONS = torch.tensor([
    [0.45, 0.35, 0.20, 0.00],
    [0.30, 0.30, 0.40, 0.00],
    [0.10, 0.70, 0.20, 0.00],
    [0.20, 0.40, 0.40, 0.00],
])


def _markov_exact(num_tokens: int) -> dict[tuple[int, ...], float]:
    exact = {(): 1.0}
    for _ in range(num_tokens):
        exact = {prefix + (token,): mass * float(TARGET_TRANSITIONS[prefix[-1] if prefix else 0, token])
                 for prefix, mass in exact.items() for token in range(4)}
    return exact


def _markov_sequence(rule, num_tokens: int, num_draft_tokens: int, generator: torch.Generator) -> tuple[int, ...]:
    """The engine's loop on the chain: blocks of γ drafts until `num_tokens` tokens are emitted."""
    sequence = [0]
    while len(sequence) - 1 < num_tokens:
        drafts, context = [], sequence[-1]
        for _ in range(num_draft_tokens):
            context = int(sample(DRAFT_TRANSITIONS[context], generator))
            drafts.append(context)
        draft_probs = DRAFT_TRANSITIONS[[sequence[-1]] + drafts[:-1]]
        target_probs = TARGET_TRANSITIONS[[sequence[-1]] + drafts]
        num_accepted, next_token, _ = rule(torch.tensor(drafts), draft_probs, target_probs, generator)
        sequence += drafts[:num_accepted] + [next_token]
    return tuple(sequence[1 : num_tokens + 1])


def _sequence_tv(rule, num_samples: int, num_tokens: int, num_draft_tokens: int) -> float:
    generator = torch.Generator().manual_seed(0)
    counts = Counter(_markov_sequence(rule, num_tokens, num_draft_tokens, generator) for _ in range(num_samples))
    return total_variation(counts, _markov_exact(num_tokens), num_samples)


@pytest.mark.parametrize(("num_draft_tokens", "num_samples"), [(1, 4000), (2, 8000)])
def test_acceptance_rule_reproduces_target_distribution_on_markov_chain(num_draft_tokens: int, num_samples: int) -> None:
    """Joint law of the first γ + 1 tokens: one whole first block, its bonus token included."""
    num_tokens = num_draft_tokens + 1
    bound = tv_bound(4**num_tokens, num_samples)
    assert _sequence_tv(accept_sampled, num_samples, num_tokens, num_draft_tokens) < bound
    for broken in BROKEN_RULES:
        assert _sequence_tv(broken, num_samples, num_tokens, num_draft_tokens) > bound, broken.__name__


def test_residual_distribution_is_normalised_positive_part() -> None:
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.5, 0.0, 0.3])
    assert torch.allclose(residual_distribution(p, q), torch.tensor([0.3, 0.0, 0.2, 0.0]) / 0.5)
    # a single-draft block reproduces p exactly in expectation: min(p, q) + (1 - Σ min(p, q)) * residual
    accepted_mass = torch.minimum(p, q)
    assert torch.allclose(accepted_mass + (1 - accepted_mass.sum()) * residual_distribution(p, q), p)
    # rounding can leave no positive part: fall back to p rather than divide by zero
    assert torch.equal(residual_distribution(p, p), p)


# ---- 2. the engine end to end: image prompts, a MASSV drafter, both families --------------------------
SETTINGS = SamplingConfig(temperature=1.0, top_k=3, repetition_penalty=1.3)
NUM_DRAFT_TOKENS = 2
MAX_NEW_TOKENS = NUM_DRAFT_TOKENS + 2  # the prefill token, then one whole block: 2 drafts + bonus/correction


@pytest.fixture(scope="module", params=["qwen2_5_vl", "gemma3"])
def image_case(request):
    """Tiny target, a MASSV drafter that agrees with it partly, and an image prompt."""
    pair = build_tiny_pair(request.param)
    drafter = noisy_multimodal_copy(pair.target, len(pair.tokenizer), noise=0.3)
    inputs = prompt_inputs(pair, "Describe the image.", random_image(21))
    return pair, drafter, inputs


def _generate_distribution(target, inputs: dict, appended: list[int]) -> torch.Tensor:
    """`generate(do_sample=True)`'s own next-token distribution after prompt + `appended` (the reference)."""
    extended = dict(inputs)
    extra = torch.tensor([appended], dtype=torch.long)
    extended["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    extended["attention_mask"] = torch.ones_like(extended["input_ids"])
    for name in ("mm_token_type_ids", "token_type_ids"):
        if name in inputs:
            extended[name] = torch.cat([inputs[name], torch.zeros_like(extra)], dim=1)
    scores = target.generate(
        **extended, do_sample=True, temperature=SETTINGS.temperature, top_k=SETTINGS.top_k,
        repetition_penalty=SETTINGS.repetition_penalty, max_new_tokens=1, output_scores=True,
        return_dict_in_generate=True, eos_token_id=None,
    ).scores[0][0]
    return torch.softmax(scores.float(), dim=-1)


def _exact_law(target, inputs: dict, num_tokens: int) -> dict[tuple[int, ...], float]:
    law = {(): 1.0}
    for _ in range(num_tokens):
        grown = {}
        for prefix, mass in law.items():
            probs = _generate_distribution(target, inputs, list(prefix))
            for token in probs.nonzero().flatten().tolist():
                grown[prefix + (token,)] = mass * float(probs[token])
        law = grown
    return law


def _engine_counts(pair, drafter, inputs, num_samples: int, first_seed: int = 0) -> tuple[Counter, float]:
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor)
    counts: Counter = Counter()
    accepted = judged = 0
    for seed in range(first_seed, first_seed + num_samples):
        output = generator.generate_from_inputs(
            inputs, max_new_tokens=MAX_NEW_TOKENS, num_draft_tokens=NUM_DRAFT_TOKENS,
            temperature=SETTINGS.temperature, top_k=SETTINGS.top_k, repetition_penalty=SETTINGS.repetition_penalty,
            seed=seed, eos_token_id=[],
        )
        counts[tuple(output.generated_ids[0].tolist())] += 1
        accepted += sum(output.stats.accepted_drafts)
        judged += sum(output.stats.judged_drafts)
    return counts, accepted / judged


def _check_engine_law(image_case, monkeypatch, num_samples: int, broken_samples: dict) -> None:
    pair, drafter, inputs = image_case
    exact = _exact_law(pair.target, inputs, MAX_NEW_TOKENS)
    counts, acceptance = _engine_counts(pair, drafter, inputs, num_samples)
    assert 0.3 < acceptance < 0.95, f"the drafter should agree often, not always (α = {acceptance:.2f})"
    tv = total_variation(counts, exact, num_samples)
    assert tv < tv_bound(len(exact), num_samples), (tv, len(exact))
    for broken, samples in broken_samples.items():
        monkeypatch.setattr(engine_module, "accept_sampled", broken)
        broken_counts, _ = _engine_counts(pair, drafter, inputs, samples, first_seed=10**6)
        broken_tv = total_variation(broken_counts, exact, samples)
        assert broken_tv > tv_bound(len(exact), samples), (broken.__name__, broken_tv, len(exact))
    monkeypatch.undo()


def test_engine_samples_from_target_distribution(image_case, monkeypatch) -> None:
    """All four tokens of a request (prefill token, two drafts' positions, bonus) follow generate()'s law."""
    # Sample counts sized to the bugs: skipping the test is blatant, a wrong bonus row needs more samples.
    _check_engine_law(image_case, monkeypatch, 600, {always_accept: 150, bonus_from_previous_row: 700})


@pytest.mark.slow
def test_engine_samples_from_target_distribution_many(image_case, monkeypatch) -> None:
    _check_engine_law(image_case, monkeypatch, 8000, {always_accept: 1000, bonus_from_previous_row: 4000,
                                                       resample_from_target: 8000})


def test_seed_makes_sampling_reproducible(image_case) -> None:
    pair, drafter, inputs = image_case
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor)
    runs = [
        generator.generate_from_inputs(inputs, max_new_tokens=8, num_draft_tokens=3, temperature=0.7, seed=seed)
        .generated_ids[0].tolist()
        for seed in (11, 11, 12)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
