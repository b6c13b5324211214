"""Tree drafting and adaptive chains are lossless, and the tree's masks, positions and KV gather are exact.

Tiny real architectures of both families (Gemma3's sliding-window layers included), image prompts, and
drafters that agree with the target only partly (tests/engine_helpers.py), so trees are accepted along
side branches and rejected part-way: the cases where a wrong mask, position or gather would show.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from massv.families import FamilyAdapter, get_adapter
from massv.speculative import (
    CommittedTokens,
    DraftRequest,
    SamplingConfig,
    SpeculativeGenerator,
    TargetVerifier,
    proposer_class_for,
)
from massv.speculative.proposers.language_model import CausalLMProposer
from massv.speculative.proposers.tree import NodePool, TreeProposer
from massv.speculative.strategy import AdaptiveLength, LengthController, TreeShape
from massv.speculative.tree import DraftTree, keep_tail_entries
from massv.tiny import TinyPair, build_tiny_pair
from tests.conftest import prompt_inputs, random_image
from tests.engine_helpers import noisy_multimodal_copy, noisy_text_copy

PROMPTS = ["Describe the image.", "What colour is the square?", "How many circles are there?",
           "Where is the red star?", "Write a caption."]
NOISE = 0.5
SHARPEN = 60.0  # output-embedding scale that makes a tiny random drafter's confidence vary across (0, 1)
# EAGLE-2 (every depth expands top_k nodes) small and fixed-depth; the default (width 1: the first-choice
# path with runner-up leaves); EAGLE-2 at this project's earlier default shape
TREES = (TreeShape(size=6, depth=3, top_k=2, min_probability=0.0, min_node_probability=0.0, width=None), TreeShape(),
         TreeShape(size=16, depth=10, top_k=3, min_probability=0.25, width=None, min_node_probability=0.0))


@dataclass
class Setup:
    pair: TinyPair
    adapter: FamilyAdapter
    drafters: dict
    cases: list
    references: dict

    def reference(self, index: int, max_new_tokens: int) -> list[int]:
        key = (index, max_new_tokens)
        if key not in self.references:
            inputs = self.cases[index]
            output = self.pair.target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            self.references[key] = output[0, inputs["input_ids"].shape[1]:].tolist()
        return self.references[key]

    def reference_without_eos(self, index: int, max_new_tokens: int) -> list[int]:
        inputs = self.cases[index]
        output = self.pair.target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None)
        return output[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "gemma3"])
def setup(request) -> Setup:
    torch.set_num_threads(1)
    pair = build_tiny_pair(request.param)
    drafters = {"noisy-multimodal": noisy_multimodal_copy(pair.target, len(pair.tokenizer), NOISE),
                "noisy-text": noisy_text_copy(pair.target, NOISE)}
    cases = [prompt_inputs(pair, prompt, random_image(40 + index)) for index, prompt in enumerate(PROMPTS)]
    cases.append(prompt_inputs(pair, "Describe a red circle.", None))  # no image at all
    return Setup(pair, get_adapter(pair.target.config), drafters, cases, {})


# ---- 1. greedy: identical to target.generate -----------------------------------------------------------
@pytest.mark.parametrize("drafter_kind", ["noisy-multimodal", "noisy-text"])
def test_greedy_tree_matches_target_generate(setup: Setup, drafter_kind: str) -> None:
    generator = SpeculativeGenerator(setup.pair.target, setup.drafters[drafter_kind], setup.pair.processor)
    branch_accepted = rejected_blocks = 0
    for index in range(len(setup.cases)):
        for shape, max_new_tokens in zip(TREES, (29, 23, 26)):
            output = generator.generate_from_inputs(setup.cases[index], max_new_tokens=max_new_tokens,
                                                    strategy="tree", tree=shape)
            stats = output.stats
            assert output.generated_ids[0].tolist() == setup.reference(index, max_new_tokens), (index, shape)
            assert stats.target_forwards == 1 + stats.verification_steps
            assert sum(stats.accepted_lengths) == max_new_tokens - 1
            assert all(proposed <= shape.size for proposed in stats.proposed_drafts)
            assert len(stats.position_judged) <= shape.depth
            branch_accepted += stats.branch_accepted
            rejected_blocks += sum(judged > accepted for judged, accepted in zip(stats.judged_drafts, stats.accepted_drafts))
    # Accepted nodes that were not the drafter's first choice: the path gather moved entries, not a prefix.
    assert branch_accepted >= 5, branch_accepted
    assert rejected_blocks >= 5, rejected_blocks


@pytest.mark.parametrize("drafter_kind", ["noisy-multimodal", "noisy-text"])
def test_greedy_adaptive_matches_target_generate(setup: Setup, drafter_kind: str) -> None:
    generator = SpeculativeGenerator(setup.pair.target, setup.drafters[drafter_kind], setup.pair.processor)
    lengths = set()
    for index in range(len(setup.cases)):
        for adaptive in (AdaptiveLength(), AdaptiveLength(max_tokens=6, confidence_threshold=None)):
            output = generator.generate_from_inputs(setup.cases[index], max_new_tokens=23, num_draft_tokens=3,
                                                    strategy="adaptive", adaptive=adaptive)
            assert output.generated_ids[0].tolist() == setup.reference(index, 23)
            assert all(proposed <= adaptive.max_tokens for proposed in output.stats.proposed_drafts)
            lengths |= set(output.stats.proposed_drafts)
    assert len(lengths) >= 3, lengths  # the length did adapt


def test_width_one_feeds_only_the_first_choice_path_with_one_token_steps(setup: Setup, monkeypatch) -> None:
    """`width=1`: no depth goes through the masked node forward, the fed nodes are the tree's first nodes (its
    first-choice path), each later node is a leaf child of one of them, and the output is still the target's."""
    generator = SpeculativeGenerator(setup.pair.target, setup.drafters["noisy-multimodal"], setup.pair.processor)
    shape = TreeShape(size=10, depth=6, top_k=3, width=1, min_probability=0.0, min_node_probability=0.0)
    masked_calls, trees = [], []
    original_nodes = CausalLMProposer.forward_nodes
    original_propose = TreeProposer.propose
    monkeypatch.setattr(CausalLMProposer, "forward_nodes",
                        lambda self, *args, **kwargs: masked_calls.append(1) or original_nodes(self, *args, **kwargs))

    def recording_propose(self, sequence, max_tokens):
        proposal = original_propose(self, sequence, max_tokens)
        trees.append((proposal.tree, sorted(self.node_slots)))
        return proposal

    monkeypatch.setattr(TreeProposer, "propose", recording_propose)
    output = generator.generate_from_inputs(setup.cases[0], max_new_tokens=29, strategy="tree", tree=shape)
    assert output.generated_ids[0].tolist() == setup.reference(0, 29)
    assert not masked_calls
    assert any(tree.num_nodes > tree.depth for tree, _ in trees)  # runner-up leaves were verified too
    for tree, fed in trees:
        path = tree.path_to(tree.depth) if tree.depth else []
        assert path == list(range(1, tree.depth + 1))  # the first-choice path comes first...
        assert all(tree.is_first_child(node) for node in path)
        assert fed == list(range(1, len(fed) + 1)) and len(fed) <= tree.depth  # ...and only it was fed
        for node in range(tree.depth + 1, tree.num_nodes + 1):  # the rest: leaves under fed path nodes
            assert tree.parents[node - 1] <= len(fed) and not tree.children(node)


def test_every_tree_lists_its_first_choice_path_first(setup: Setup) -> None:
    """EAGLE-2 trees too: following first children from the root visits nodes 1, 2, ..., so accepting that
    path keeps a prefix of the verified nodes (a crop of both caches); siblings stay in drafter order."""
    drafter = setup.drafters["noisy-text"]
    inputs = setup.cases[3]
    adapter, target = setup.adapter, setup.pair.target
    request = DraftRequest(target=target, adapter=adapter, prompt_ids=inputs["input_ids"], image_inputs={},
                           vision_features={}, settings=SamplingConfig(), eos_token_ids=frozenset(), replacement_id=0)
    proposer = TreeProposer(proposer_class_for(drafter)(drafter, request), TreeShape(size=12, depth=5, top_k=3,
                                                                                   min_probability=0.0, width=None,
                                                                                   min_node_probability=0.0))
    sequence = CommittedTokens(inputs["input_ids"], capacity=64)
    sequence.append([11])
    with torch.no_grad():
        proposer.prefill(sequence)
        tree = proposer.propose(sequence, 5).tree
    node, path = 0, []
    while tree.children(node):
        node = tree.children(node)[0]
        path.append(node)
    assert path == list(range(1, len(path) + 1)) and len(path) >= 2
    assert tree.depths != sorted(tree.depths)  # not breadth-first: a depth-2 sibling follows the deep path


def test_a_prefix_gather_is_a_crop_and_matches_the_general_gather() -> None:
    """`keep_tail_entries` keeps a prefix of the tail by cropping; the same keep through the general gather
    (an out-of-order keep, then the prefix) leaves the same tensors."""
    torch.manual_seed(0)
    keys = [torch.randn(1, 2, 9, 4) for _ in range(2)]
    values = [torch.randn(1, 2, 9, 4) for _ in range(2)]

    def cache_with_entries() -> DynamicCache:
        cache = DynamicCache()
        for layer, (key, value) in enumerate(zip(keys, values)):
            cache.update(key.clone(), value.clone(), layer)
        return cache

    cropped = cache_with_entries()
    keep_tail_entries(cropped, 5, [0, 1, 2])
    gathered = cache_with_entries()
    keep_tail_entries(gathered, 5, [1, 0, 2])  # the general path, then swap the first two back by hand
    for layer in range(2):
        assert cropped.layers[layer].keys.shape[-2] == 7
        expected_keys, expected_values = keys[layer][..., :7, :], values[layer][..., :7, :]
        assert torch.equal(cropped.layers[layer].keys, expected_keys)
        assert torch.equal(cropped.layers[layer].values, expected_values)
        swapped = gathered.layers[layer].keys[..., [0, 1, 2, 3, 5, 4, 6], :]
        assert torch.equal(swapped, expected_keys)


def test_node_pool_expands_the_best_finite_non_eos_nodes() -> None:
    pool = NodePool()
    pool.add_children([-1], 1, [[5, 7, 9]], [[-0.1, -1.0, -2.0]])
    pool.add_children([0, 1], 2, [[2, 3], [4, 6]], [[-0.5, float("-inf")], [-0.2, -0.3]])
    assert pool.scores[3:] == pytest.approx([-0.6, float("-inf"), -1.2, -1.3])
    assert pool.parents == [-1, -1, -1, 0, 0, 1, 1] and pool.depths == [1, 1, 1, 2, 2, 2, 2]
    assert pool.expandable(3, 2, frozenset(), float("-inf")) == [3, 5]
    assert pool.expandable(3, 2, frozenset({2}), float("-inf")) == [5, 6]  # an EOS draft is never expanded
    assert pool.expandable(3, 3, frozenset(), -0.5) == []  # the best path is below the floor: stop growing
    assert pool.expandable(0, 2, frozenset(), float("-inf")) == [0, 3]
    assert pool.path_to(6) == [6, 1]
    tied = NodePool()
    tied.add_children([-1], 1, [[1, 2, 3]], [[-1.0, -0.5, -0.5]])
    assert tied.expandable(0, 2, frozenset(), float("-inf")) == [1, 2]  # ties keep the drafter's order


def test_min_node_probability_leaves_out_unlikely_nodes() -> None:
    """Only nodes whose path probability reaches the floor are verified (the size cap aside), best first."""
    pool = NodePool()
    pool.add_children([-1], 1, [[5, 7, 9]], [[math.log(0.6), math.log(0.3), math.log(0.05)]])
    pool.add_children([0, 1], 2, [[2, 3], [4, 6]], [[math.log(0.5), math.log(0.3)], [math.log(0.9), math.log(0.1)]])
    for floor, expected in ((0.0, 7), (0.1, 5), (0.25, 4)):
        shape = TreeShape(size=16, min_node_probability=floor)
        tree, kept = TreeProposer._best_tree(SimpleNamespace(shape=shape), pool)
        assert tree.num_nodes == len(kept) == expected, floor
        assert all(math.exp(pool.scores[index]) >= floor - 1e-9 for index in kept)
        assert kept[:2] == [0, 3]  # the first-choice path (0.6, then 0.6 x 0.5) leads
    tree, kept = TreeProposer._best_tree(SimpleNamespace(shape=TreeShape(size=3, min_node_probability=0.0)), pool)
    assert sorted(kept) == [0, 1, 3]  # the size cap keeps the three most probable: 0.6, 0.3, 0.3 (parent first)


def test_min_probability_stops_growth_early_and_stays_lossless(setup: Setup) -> None:
    """A high path-probability floor spends fewer drafter forwards per block; the output is the same."""
    generator = SpeculativeGenerator(setup.pair.target, setup.drafters["noisy-multimodal"], setup.pair.processor)
    forwards = {}
    for floor in (0.0, 0.9):
        shape = TreeShape(size=16, depth=6, top_k=3, min_probability=floor, min_node_probability=0.0)
        output = generator.generate_from_inputs(setup.cases[0], max_new_tokens=29, strategy="tree", tree=shape)
        assert output.generated_ids[0].tolist() == setup.reference(0, 29)
        forwards[floor] = (output.stats.drafter_forwards - 1) / output.stats.verification_steps
    assert forwards[0.9] < forwards[0.0], forwards


def test_length_controller_leaves_greedy_lengths_to_the_drafter_confidence() -> None:
    controller = LengthController(3, AdaptiveLength(max_tokens=9), confidence_decides=True)
    assert controller.length == 9
    for accepted in (0, 9, 4):
        controller.update(requested=9, proposed=9, accepted=accepted)
        assert controller.length == 9


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_adaptive_greedy_block_stops_where_its_path_confidence_falls_below_the_threshold(setup: Setup,
                                                                                        threshold: float) -> None:
    """Each draft's probability, recomputed by a plain forward of the drafter LM over the block, multiplies
    into the block's path confidence: the block ends at the first draft that takes it below the threshold."""
    drafter = copy.deepcopy(setup.drafters["noisy-text"])
    with torch.no_grad():  # a tiny random LM is almost uniform: sharpen it so that its confidence varies
        drafter.get_output_embeddings().weight.mul_(SHARPEN)
    inputs = setup.cases[3]
    adapter, target = setup.adapter, setup.pair.target
    request = DraftRequest(target=target, adapter=adapter, prompt_ids=inputs["input_ids"], image_inputs={},
                           vision_features={}, settings=SamplingConfig(), eos_token_ids=frozenset(), replacement_id=0,
                           confidence_threshold=threshold)
    proposer = proposer_class_for(drafter)(drafter, request)
    view = adapter.strip_image_tokens(inputs["input_ids"])
    sequence = CommittedTokens(inputs["input_ids"], capacity=128)
    sequence.append([11])
    lengths = set()
    with torch.no_grad():
        proposer.prefill(sequence)
        for _ in range(6):
            drafts = proposer.propose(sequence, 12).token_list
            ids = torch.cat([view, torch.tensor([sequence.generated + drafts])], dim=1)
            probs = torch.softmax(drafter(input_ids=ids).logits[0].float(), dim=-1)
            first = view.shape[1] + len(sequence.generated) - 1  # the row that predicts the first draft
            confidences = [float(probs[first + index, token]) for index, token in enumerate(drafts)]
            path = np.cumprod(confidences)
            assert all(path[:-1] >= threshold), (confidences, threshold)
            assert path[-1] < threshold or len(drafts) == 12
            lengths.add(len(drafts))
            proposer.commit(len(drafts) // 2)
            sequence.append(drafts[: len(drafts) // 2] + [13])
    assert len(lengths) >= 2, lengths


def test_greedy_adaptive_blocks_ask_for_max_tokens_without_the_length_heuristic(setup: Setup) -> None:
    """A threshold of 0 never stops a greedy block: every block drafts `max_tokens` (the budget aside), after
    rejections too, where the +2/-1 rule would have shortened it."""
    generator = SpeculativeGenerator(setup.pair.target, setup.drafters["noisy-text"], setup.pair.processor)
    settings = AdaptiveLength(max_tokens=5, confidence_threshold=0.0)
    output = generator.generate_from_inputs(setup.cases[1], max_new_tokens=40, num_draft_tokens=2,
                                            strategy="adaptive", adaptive=settings, eos_token_id=[])
    stats = output.stats
    assert output.generated_ids[0].tolist() == setup.reference_without_eos(1, 40)
    assert any(accepted < proposed for accepted, proposed in zip(stats.accepted_drafts, stats.proposed_drafts))
    assert all(proposed == 5 for proposed, limited in zip(stats.proposed_drafts, stats.budget_limited) if not limited)


def test_length_controller_follows_hf_heuristic() -> None:
    controller = LengthController(5, AdaptiveLength(max_tokens=8))
    controller.update(requested=5, proposed=5, accepted=5)
    assert controller.length == 7  # full acceptance: +2
    controller.update(requested=7, proposed=7, accepted=7)
    assert controller.length == 8  # capped at max_tokens
    controller.update(requested=8, proposed=8, accepted=2)
    assert controller.length == 7  # a rejection: -1
    controller.update(requested=7, proposed=3, accepted=3)
    assert controller.length == 7  # cut short by the drafter's confidence, all accepted: unchanged
    for _ in range(10):
        controller.update(requested=controller.length, proposed=controller.length, accepted=0)
    assert controller.length == 1


def test_tree_needs_a_language_model_drafter(setup: Setup) -> None:
    from massv.speculative import TargetAsDrafter

    generator = SpeculativeGenerator(setup.pair.target, TargetAsDrafter(setup.pair.target), setup.pair.processor)
    with pytest.raises(ValueError, match="strategy='tree' needs a language-model drafter"):
        generator.generate_from_inputs(setup.cases[0], max_new_tokens=5, strategy="tree")
    with pytest.raises(ValueError, match="strategy must be one of"):
        generator.generate_from_inputs(setup.cases[0], max_new_tokens=5, strategy="beam")
    with pytest.raises(ValueError, match="tree size must be an integer >= 1"):
        TreeShape(size=0)


# ---- 2. the tree forward and the gather are exact ------------------------------------------------------
def _image_inputs(setup: Setup, inputs) -> dict[str, torch.Tensor]:
    return {name: inputs[name] for name in setup.adapter.image_input_names if name in inputs}


def _recompute_logits(setup: Setup, inputs, appended: list[int]) -> torch.Tensor:
    """Next-token logits from one cache-free forward over prompt + `appended` (the reference)."""
    target, adapter = setup.pair.target, setup.adapter
    image_inputs = _image_inputs(setup, inputs)
    input_ids = torch.cat([inputs["input_ids"], torch.tensor([appended], dtype=torch.long)], dim=1)
    kwargs, _ = adapter.target_prefill_kwargs(input_ids, image_inputs, target)
    projected = adapter.encode_images(adapter.vision_modules(target), image_inputs, "projected")
    kwargs.update(adapter.target_image_kwargs(image_inputs, projected))
    with torch.no_grad():
        return target(input_ids=input_ids, use_cache=False, **kwargs).logits[0, -1].float()


def _random_tree(rng: np.random.Generator, size: int) -> DraftTree:
    return DraftTree(parents=[int(rng.integers(0, index + 1)) for index in range(size)])


def test_tree_verification_and_gather_match_recompute(setup: Setup) -> None:
    """Every node's logits equal a recompute over prompt + its path; after the gather the cache is a chain's.

    Ten blocks of random trees and random accepted paths carry the generated part past Gemma3's sliding window.
    """
    target, adapter = setup.pair.target, setup.adapter
    inputs = setup.cases[1]
    image_inputs = _image_inputs(setup, inputs)
    projected = adapter.encode_images(adapter.vision_modules(target), image_inputs, "projected")
    verifier = TargetVerifier(target, adapter)
    rng = np.random.default_rng(11)
    text_vocab = len(setup.pair.tokenizer)
    committed: list[int] = []
    with torch.no_grad():
        verifier.prefill(inputs["input_ids"], image_inputs, projected)
        committed.append(int(rng.integers(10, text_vocab - 10)))
        for block in range(10):
            tree = _random_tree(rng, 7)
            drafts = torch.tensor(rng.integers(10, text_vocab - 10, size=7), dtype=torch.long)
            root = torch.tensor([[committed[-1]]])
            logits = verifier.verify_tree(root, drafts, tree).float()
            for node in (0, int(rng.integers(1, 8))):  # the root and one random node
                path_ids = [int(drafts[index - 1]) for index in tree.path_to(node)]
                reference = _recompute_logits(setup, inputs, committed + path_ids)
                assert torch.allclose(logits[node], reference, atol=1e-4, rtol=0), (block, node)
            leaf = int(rng.integers(0, 8))
            path = tree.path_to(leaf)
            verifier.keep_path(tree.num_nodes, path)
            committed += [int(drafts[node - 1]) for node in path] + [int(rng.integers(10, text_vocab - 10))]
            assert verifier.length == inputs["input_ids"].shape[1] + len(committed) - 1
        # A chain step on the gathered cache: the same logits as a recompute.
        cached = verifier.verify(torch.tensor([[committed[-1]]]))[-1].float()
        verifier.rollback(0)
    assert torch.allclose(cached, _recompute_logits(setup, inputs, committed), atol=1e-4, rtol=0)
    if any(layer.is_sliding for layer in verifier.cache.layers):
        assert len(committed) > target.config.get_text_config().sliding_window  # the window was crossed


@pytest.mark.parametrize("width", [None, 1])
@pytest.mark.parametrize("drafter_kind", ["noisy-multimodal", "noisy-text"])
def test_drafter_cache_after_gather_matches_recompute(setup: Setup, drafter_kind: str, width: int | None) -> None:
    """After rounds of tree drafting and random accepted paths, the drafter's cache equals a fresh one's."""
    drafter = setup.drafters[drafter_kind]
    inputs = setup.cases[2]
    adapter, target = setup.adapter, setup.pair.target
    features = adapter.encode_image_features(adapter.vision_modules(target), _image_inputs(setup, inputs),
                                             ("projected",))
    request = DraftRequest(target=target, adapter=adapter, prompt_ids=inputs["input_ids"],
                           image_inputs=_image_inputs(setup, inputs), vision_features=features,
                           settings=SamplingConfig(), eos_token_ids=frozenset(), replacement_id=0)
    proposer_class = proposer_class_for(drafter)
    shape = TreeShape(size=8, depth=4, top_k=3, min_probability=0.0, min_node_probability=0.0, width=width)

    def started(sequence: CommittedTokens) -> TreeProposer:
        proposer = TreeProposer(proposer_class(drafter, request), shape)
        proposer.prefill(sequence)
        return proposer

    rng = np.random.default_rng(12)
    sequence = CommittedTokens(inputs["input_ids"], capacity=200)
    sequence.append([int(rng.integers(10, 100))])
    proposer = started(sequence)
    side_branches = 0
    with torch.no_grad():
        for _ in range(8):
            proposal = proposer.propose(sequence, shape.depth)
            tree = proposal.tree
            path = tree.path_to(int(rng.integers(0, tree.num_nodes + 1)))
            side_branches += sum(not tree.is_first_child(node) for node in path)
            proposer.commit_path(path)
            sequence.append([proposal.token_list[node - 1] for node in path] + [int(rng.integers(10, 100))])
        cached = proposer.propose(sequence, shape.depth)
        fresh_sequence = CommittedTokens(inputs["input_ids"], capacity=200)
        fresh_sequence.append(sequence.generated)
        fresh = started(fresh_sequence).propose(fresh_sequence, shape.depth)
    assert side_branches > 0
    assert len(sequence.generated) > 16  # past the tiny configs' sliding window
    assert cached.tree.parents == fresh.tree.parents
    assert cached.token_list == fresh.token_list


def test_draft_tree_structure() -> None:
    tree = DraftTree(parents=[0, 0, 1, 1, 2, 3])
    assert tree.depths == [1, 1, 2, 2, 2, 3]
    assert tree.children(0) == [1, 2] and tree.children(1) == [3, 4]
    assert tree.path_to(6) == [1, 3, 6]
    assert tree.is_first_child(3) and not tree.is_first_child(4) and not tree.is_first_child(2)
    ancestors = tree.ancestors()
    assert ancestors[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert ancestors.sum().item() == 1 + 2 + 2 + 3 + 3 + 3 + 4
    with pytest.raises(ValueError, match="parents must precede"):
        DraftTree(parents=[0, 2])
