"""Speculative sampling emits tokens distributed exactly as the target's: checked statistically.

The check: the empirical distribution of N outcomes over K cells has total-variation distance (TV) from the
true distribution below

    bound(K, N) = 0.5 * sqrt((K - 1) / N) + sqrt(ln(1 / δ) / (2N)),   δ = 1e-6.

Why: E[TV] = 0.5 Σ E|p̂_i - p_i| <= 0.5 Σ sqrt(p_i (1 - p_i) / N) <= 0.5 sqrt((K - 1) / N) (Cauchy-Schwarz),
and one sample moves TV by at most 1/N, so McDiarmid gives P(TV > E[TV] + t) <= exp(-2 N t²). A correct
sampler exceeds the bound with probability below 1e-6; each test also runs a deliberately broken
acceptance rule through the same check and asserts that it FAILS it, so the check has teeth. Seeds are
fixed, so the outcome is deterministic.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from massv.speculative import SpeculativeGenerator, sampling
from massv.speculative.sampling import SamplingConfig, process_rows, residual_distribution
from massv.tiny import build_tiny_pair

DELTA = 1e-6


def tv_bound(num_cells: int, num_samples: int, delta: float = DELTA) -> float:
    return 0.5 * math.sqrt(max(num_cells - 1, 1) / num_samples) + math.sqrt(math.log(1 / delta) / (2 * num_samples))


def total_variation(counts: Counter, exact: dict, num_samples: int) -> float:
    cells = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(cell, 0) / num_samples - exact.get(cell, 0.0)) for cell in cells)


# ---- broken rules: what a plausible bug looks like --------------------------------------------------
def always_accept(draft_tokens, draft_probs, target_probs, generator=None):
    """Bug: skip the acceptance test (emits the drafter's distribution)."""
    return len(draft_tokens), sampling.sample(target_probs[len(draft_tokens)], generator)


def resample_from_target(draft_tokens, draft_probs, target_probs, generator=None):
    """Bug: after a rejection, sample from p instead of norm(max(0, p - q)) (over-weights drafted tokens)."""
    for index, token in enumerate(draft_tokens):
        uniform = float(torch.rand((), generator=generator))
        if uniform * float(draft_probs[index, token]) < float(target_probs[index, token]):
            continue
        return index, sampling.sample(target_probs[index], generator)
    return len(draft_tokens), sampling.sample(target_probs[len(draft_tokens)], generator)


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


def _markov_run(verify, num_tokens: int, num_draft_tokens: int, generator: torch.Generator) -> tuple[int, ...]:
    """The engine's loop on the Markov chain: draft γ from q, verify against p, keep what the rule emits."""
    sequence = [0]
    while len(sequence) - 1 < num_tokens:
        drafts, context = [], sequence[-1]
        for _ in range(num_draft_tokens):
            context = sampling.sample(DRAFT_TRANSITIONS[context], generator)
            drafts.append(context)
        draft_probs = DRAFT_TRANSITIONS[[sequence[-1]] + drafts[:-1]]
        target_probs = TARGET_TRANSITIONS[[sequence[-1]] + drafts]
        num_accepted, next_token = verify(drafts, draft_probs, target_probs, generator)
        sequence += drafts[:num_accepted] + [next_token]
    return tuple(sequence[1 : num_tokens + 1])


def _markov_exact(num_tokens: int) -> dict[tuple[int, ...], float]:
    exact = {(): 1.0}
    for _ in range(num_tokens):
        exact = {
            prefix + (token,): mass * float(TARGET_TRANSITIONS[prefix[-1] if prefix else 0, token])
            for prefix, mass in exact.items() for token in range(4)
        }
    return exact


def _markov_tv(verify, num_samples: int, num_tokens: int = 3, num_draft_tokens: int = 3) -> float:
    generator = torch.Generator().manual_seed(0)
    counts = Counter(_markov_run(verify, num_tokens, num_draft_tokens, generator) for _ in range(num_samples))
    return total_variation(counts, _markov_exact(num_tokens), num_samples)


def test_acceptance_rule_reproduces_target_distribution_on_markov_chain() -> None:
    """Joint law of the first 3 tokens (64 cells) with γ=3: acceptance, residual and bonus all matter."""
    num_samples = 2500
    bound = tv_bound(64, num_samples)
    assert _markov_tv(sampling.verify_sampled, num_samples) < bound
    assert _markov_tv(always_accept, num_samples) > bound
    assert _markov_tv(resample_from_target, num_samples) > bound


def test_residual_distribution_is_normalised_positive_part() -> None:
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.5, 0.0, 0.3])
    assert torch.allclose(residual_distribution(p, q), torch.tensor([0.3, 0.0, 0.2, 0.0]) / 0.5)
    # a single-draft block reproduces p exactly in expectation: min(p, q) + (1 - Σ min(p, q)) * residual
    accepted_mass = torch.minimum(p, q)
    assert torch.allclose(accepted_mass + (1 - accepted_mass.sum()) * residual_distribution(p, q), p)


# ---- 2. the engine end to end on a tiny Qwen2.5-VL ----------------------------------------------------
SETTINGS = SamplingConfig(temperature=0.1, top_k=6, top_p=0.95, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def noisy_pair():
    """Tiny Qwen2.5-VL target, and as drafter a Qwen2 LM holding the target's text weights plus noise on
    its LM head: it agrees often but not always, so acceptance, rejection and bonus tokens all occur."""
    torch.set_num_threads(1)
    pair = build_tiny_pair("qwen2_5_vl")
    text_config = pair.target.config.text_config
    drafter = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=text_config.vocab_size, hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size, num_hidden_layers=text_config.num_hidden_layers,
        num_attention_heads=text_config.num_attention_heads, num_key_value_heads=text_config.num_key_value_heads,
        rms_norm_eps=text_config.rms_norm_eps, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )).eval()
    prefix = "model.language_model."
    state = {
        key.replace(prefix, "model."): value for key, value in pair.target.state_dict().items()
        if key.startswith(prefix) or key.startswith("lm_head")
    }
    drafter.load_state_dict(state, strict=True)
    with torch.no_grad():
        noise = torch.randn(drafter.lm_head.weight.shape, generator=torch.Generator().manual_seed(3))
        drafter.lm_head.weight += 0.6 * drafter.lm_head.weight.std() * noise
    text = pair.tokenizer.apply_chat_template([{"role": "user", "content": "Describe the red circle."}],
                                              add_generation_prompt=True, tokenize=False)
    inputs = pair.processor(text=[text], return_tensors="pt")
    return pair, drafter, inputs


def _exact_two_token_law(target, inputs, settings: SamplingConfig) -> dict[tuple[int, int], float]:
    """p(x1) p(x2 | x1) with the engine's warping (itself checked against generate() below)."""
    processors = settings.target_processors()
    input_ids = inputs["input_ids"]
    with torch.no_grad():
        first = torch.softmax(process_rows(target(input_ids=input_ids).logits[0, -1:], input_ids, processors)[0], -1)
        law = {}
        for x1 in first.nonzero().flatten().tolist():
            extended = torch.cat([input_ids, torch.tensor([[x1]])], dim=1)
            second = torch.softmax(process_rows(target(input_ids=extended).logits[0, -1:], extended, processors)[0], -1)
            for x2 in second.nonzero().flatten().tolist():
                law[(x1, x2)] = float(first[x1] * second[x2])
    return law


def _engine_tv(pair, drafter, inputs, num_samples: int) -> tuple[float, int, float]:
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor)
    counts: Counter = Counter()
    accepted = judged = 0
    for seed in range(num_samples):
        output = generator.generate_from_inputs(
            inputs, max_new_tokens=3, num_draft_tokens=1, temperature=SETTINGS.temperature, top_k=SETTINGS.top_k,
            top_p=SETTINGS.top_p, repetition_penalty=SETTINGS.repetition_penalty, seed=seed, eos_token_id=[],
        )
        counts[tuple(output.generated_ids[0, :2].tolist())] += 1
        accepted += sum(output.stats.accepted_drafts)
        judged += sum(output.stats.judged_drafts)
    exact = _exact_two_token_law(pair.target, inputs, SETTINGS)
    return total_variation(counts, exact, num_samples), len(exact), accepted / judged


def test_warping_equals_generate_scores(noisy_pair) -> None:
    """The distribution we verify against is the one `generate(do_sample=True)` samples from."""
    pair, _, inputs = noisy_pair
    reference = pair.target.generate(
        **inputs, do_sample=True, temperature=SETTINGS.temperature, top_k=SETTINGS.top_k, top_p=SETTINGS.top_p,
        repetition_penalty=SETTINGS.repetition_penalty, max_new_tokens=1, output_scores=True,
        return_dict_in_generate=True,
    ).scores[0][0]
    with torch.no_grad():
        logits = pair.target(**inputs).logits[0, -1:]
    ours = process_rows(logits, inputs["input_ids"], SETTINGS.target_processors())[0]
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(ours)) and 1 < int(finite.sum()) <= SETTINGS.top_k
    assert torch.allclose(ours[finite], reference[finite], atol=1e-5)


def _check_engine_law(noisy_pair, monkeypatch, num_samples: int, broken_samples: int) -> None:
    """First two tokens through the real engine (drafter, caches, warping, seeds); the second one is the
    speculative one (max_new_tokens=3, γ=1: one draft, accepted or replaced by a residual sample)."""
    pair, drafter, inputs = noisy_pair
    tv, num_cells, acceptance = _engine_tv(pair, drafter, inputs, num_samples)
    assert 0.2 < acceptance < 0.95, "the drafter should agree sometimes, not always: both paths exercised"
    assert tv < tv_bound(num_cells, num_samples), (tv, num_cells)

    monkeypatch.setattr(sampling, "verify_sampled", always_accept)
    broken_tv, _, _ = _engine_tv(pair, drafter, inputs, broken_samples)
    assert broken_tv > tv_bound(num_cells, broken_samples), (broken_tv, num_cells)


def test_engine_samples_from_target_distribution(noisy_pair, monkeypatch) -> None:
    _check_engine_law(noisy_pair, monkeypatch, num_samples=700, broken_samples=300)


@pytest.mark.slow
def test_engine_samples_from_target_distribution_many(noisy_pair, monkeypatch) -> None:
    _check_engine_law(noisy_pair, monkeypatch, num_samples=6000, broken_samples=1500)


def test_seed_makes_sampling_reproducible(noisy_pair) -> None:
    pair, drafter, inputs = noisy_pair
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor)
    runs = [
        generator.generate_from_inputs(inputs, max_new_tokens=8, num_draft_tokens=3, temperature=0.7, seed=seed)
        .generated_ids[0].tolist()
        for seed in (11, 11, 12)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
