"""Tree speculative sampling emits tokens distributed exactly as the target's: checked statistically.

Same check as tests/test_speculative_sampling.py (total-variation distance under a bound a correct sampler
exceeds with probability < 1e-6), on the tree rule alone over a synthetic Markov chain and on the engine
end to end against `target.generate`'s own sampling (both families, an image prompt, a partly agreeing
MASSV drafter, repetition penalty and top-k). Deliberately broken rules must FAIL the same check.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import massv.speculative.engine as engine_module
from massv.speculative import SpeculativeGenerator
from massv.speculative.acceptance import accept_tree_sampled
from massv.speculative.sampling import sample
from massv.speculative.strategy import TreeShape
from massv.speculative.tree import DraftTree
from massv.tiny import build_tiny_pair
from tests.conftest import prompt_inputs, random_image
from tests.engine_helpers import noisy_multimodal_copy
from tests.test_speculative_sampling import (
    SETTINGS,
    TARGET_TRANSITIONS,
    _exact_law,
    total_variation,
    tv_bound,
)


# ---- broken rules (same signature as accept_tree_sampled) ----------------------------------------------
def _walk(drafts, tree, target_probs, generator, accept, residual):
    ids, node, path = drafts.tolist(), 0, []
    while True:
        row, children = target_probs[node], tree.children(node)
        chosen = accept(row, [ids[child - 1] for child in children], generator)
        if chosen is None:
            return path, int(sample(residual(row, [ids[child - 1] for child in children]), generator)), ids
        node = children[chosen]
        path.append(node)


def _accept_renormalised(row, tokens, generator):
    remaining = 1.0
    for index, token in enumerate(tokens):
        if float(torch.rand(1, generator=generator)) * remaining < float(row[token]):
            return index
        remaining -= float(row[token])
    return None


def _accept_unnormalised(row, tokens, generator):
    for index, token in enumerate(tokens):
        if float(torch.rand(1, generator=generator)) < float(row[token]):
            return index
    return None


def _residual(row, tokens):
    residual = row.clone()
    residual[tokens] = 0
    return residual / residual.sum() if float(residual.sum()) > 0 else row


def residual_keeps_rejected(drafts, tree, target_probs, generator=None):
    """Bug: after every child is rejected, sample from p itself (rejected tokens come back)."""
    return _walk(drafts, tree, target_probs, generator, _accept_renormalised, lambda row, tokens: row)


def siblings_not_renormalised(drafts, tree, target_probs, generator=None):
    """Bug: try each sibling with p(x) instead of p(x) / (mass left after the earlier siblings)."""
    return _walk(drafts, tree, target_probs, generator, _accept_unnormalised, _residual)


def always_first_child(drafts, tree, target_probs, generator=None):
    """Bug: skip the test, walk the first children (emits the drafter's top guesses)."""
    return _walk(drafts, tree, target_probs, generator, lambda row, tokens, gen: 0 if tokens else None, _residual)


BROKEN_RULES = [residual_keeps_rejected, siblings_not_renormalised, always_first_child]
# (Trying only the first child and then drawing from the residual is NOT a bug: it is exact, only slower.)


# ---- 1. the rule on a synthetic Markov chain -------------------------------------------------------------
def _top2_tree(context: int, depth: int) -> tuple[list[int], DraftTree]:
    """Top-2 children per node, `depth` levels: a deterministic tree, as the proposer builds.

    The children are the target's own two most probable tokens (any deterministic choice keeps the law
    exact): the second sibling then always carries real mass, so a wrong sibling rule shifts the law well
    past the bound. The drafter's matrix would put near-empty tokens second on most rows."""
    tokens, parents, frontier = [], [], [(0, context)]
    for _ in range(depth):
        grown = []
        for node, token in frontier:
            for child in TARGET_TRANSITIONS[token].topk(2).indices.tolist():
                tokens.append(child)
                parents.append(node)
                grown.append((len(tokens), child))
        frontier = grown
    return tokens, DraftTree(parents=parents)


START = 0


def _exact_law_from(start: int, num_tokens: int) -> dict[tuple[int, ...], float]:
    law = {(): 1.0}
    for _ in range(num_tokens):
        law = {prefix + (token,): mass * float(TARGET_TRANSITIONS[prefix[-1] if prefix else start, token])
               for prefix, mass in law.items() for token in range(4)}
    return law


def _markov_sequence(rule, num_tokens: int, depth: int, generator: torch.Generator) -> tuple[int, ...]:
    sequence = [START]
    while len(sequence) - 1 < num_tokens:
        tokens, tree = _top2_tree(sequence[-1], depth)
        target_probs = TARGET_TRANSITIONS[[sequence[-1]] + tokens]
        path, next_token, _ = rule(torch.tensor(tokens), tree, target_probs, generator)
        sequence += [tokens[node - 1] for node in path] + [next_token]
    return tuple(sequence[1 : num_tokens + 1])


def _sequence_tv(rule, num_samples: int, num_tokens: int, depth: int) -> float:
    generator = torch.Generator().manual_seed(0)
    counts = Counter(_markov_sequence(rule, num_tokens, depth, generator) for _ in range(num_samples))
    return total_variation(counts, _exact_law_from(START, num_tokens), num_samples)


def test_tree_rule_reproduces_target_distribution_on_markov_chain() -> None:
    """Joint law of the first 3 tokens: a whole depth-2 tree block and its bonus token."""
    num_samples, num_tokens = 4000, 3
    bound = tv_bound(4**num_tokens, num_samples)
    assert _sequence_tv(accept_tree_sampled, num_samples, num_tokens, depth=2) < bound
    for broken in BROKEN_RULES:
        assert _sequence_tv(broken, num_samples, num_tokens, depth=2) > bound, broken.__name__


# ---- 2. the engine end to end ------------------------------------------------------------------------------
TREE = TreeShape(size=4, depth=2, top_k=2, min_probability=0.0, min_node_probability=0.0, width=None)  # EAGLE-2: both children expanded
# The drafter's first-choice path with runner-up leaves: fed by one-token steps, committed by a crop.
PATH_TREE = TreeShape(size=4, depth=2, top_k=2, min_probability=0.0, min_node_probability=0.0, width=1)
MAX_NEW_TOKENS = 4  # the prefill token, then a depth-2 tree block and its bonus token (or more blocks)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "gemma3"])
def image_case(request):
    torch.set_num_threads(1)
    pair = build_tiny_pair(request.param)
    drafter = noisy_multimodal_copy(pair.target, len(pair.tokenizer), noise=0.3)
    return pair, drafter, prompt_inputs(pair, "Describe the image.", random_image(21))


def _tree_counts(pair, drafter, inputs, num_samples: int, first_seed: int = 0, tree: TreeShape = TREE
                 ) -> tuple[Counter, int]:
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor)
    counts: Counter = Counter()
    branch_accepted = 0
    for seed in range(first_seed, first_seed + num_samples):
        output = generator.generate_from_inputs(
            inputs, max_new_tokens=MAX_NEW_TOKENS, strategy="tree", tree=tree, temperature=SETTINGS.temperature,
            top_k=SETTINGS.top_k, repetition_penalty=SETTINGS.repetition_penalty, seed=seed, eos_token_id=[])
        counts[tuple(output.generated_ids[0].tolist())] += 1
        branch_accepted += output.stats.branch_accepted
    return counts, branch_accepted


@pytest.mark.parametrize("tree", [TREE, PATH_TREE], ids=["eagle", "width-1"])
def test_engine_tree_samples_from_target_distribution(image_case, monkeypatch, tree: TreeShape) -> None:
    pair, drafter, inputs = image_case
    exact = _exact_law(pair.target, inputs, MAX_NEW_TOKENS)
    num_samples = 600
    counts, branch_accepted = _tree_counts(pair, drafter, inputs, num_samples, tree=tree)
    assert branch_accepted > 0, "no second child was ever accepted: the sibling recursion was not exercised"
    tv = total_variation(counts, exact, num_samples)
    assert tv < tv_bound(len(exact), num_samples), (tv, len(exact))
    # The engine really calls the tree rule: a blatant bug in it shows (subtle ones: the Markov test above).
    monkeypatch.setattr(engine_module, "accept_tree_sampled", always_first_child)
    broken_counts, _ = _tree_counts(pair, drafter, inputs, 100, first_seed=10**6, tree=tree)
    broken_tv = total_variation(broken_counts, exact, 100)
    assert broken_tv > tv_bound(len(exact), 100), broken_tv
