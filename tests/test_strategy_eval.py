"""`compare_strategies`: every row on every prompt, greedy rows checked against the target, and compiled rows
(the drafter on its static cache) drafting exactly what the eager rows draft."""

from __future__ import annotations

import pytest
import torch

from massv.speculative.strategy import TreeShape
from massv.strategy_eval import StrategyRun, compare_strategies, default_runs, target_references
from massv.tiny import build_tiny_pair
from tests.conftest import prompt_inputs, random_image
from tests.engine_helpers import noisy_multimodal_copy


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_compiled_rows_draft_and_accept_what_the_eager_rows_do() -> None:
    pair = build_tiny_pair("qwen2_5_vl")
    drafter = noisy_multimodal_copy(pair.target, len(pair.tokenizer), noise=0.5)
    cases = [prompt_inputs(pair, "What colour is the square?", random_image(seed)) for seed in range(2)]
    tree = TreeShape(size=6, depth=4, top_k=2, min_probability=0.0, min_node_probability=0.0)
    runs = [StrategyRun("chain γ=3", "chain", 3), StrategyRun("tree", "tree", tree=tree),
            StrategyRun("chain γ=3, compiled", "chain", 3, compiled=True),
            StrategyRun("tree, compiled", "tree", tree=tree, compiled=True)]
    references = target_references(pair.target, cases, 12)
    rows, target_speed = compare_strategies(pair.target, drafter, pair.processor, cases, runs, 0.0, 12,
                                            references=references, repeats=1, compile_max_length=256,
                                            compile_backend="eager")
    by_name = {row["name"]: row for row in rows}
    assert target_speed > 0
    assert all(row["identical"] == row["requests"] == 2 for row in rows)
    for name in ("chain γ=3", "tree"):
        eager, compiled = by_name[name], by_name[f"{name}, compiled"]
        assert compiled["compiled"] and not eager["compiled"]
        assert compiled["tokens_per_target_forward"] == eager["tokens_per_target_forward"]
        assert compiled["position_acceptance"] == eager["position_acceptance"]
    assert by_name["tree"]["branch_accepted"] == by_name["tree, compiled"]["branch_accepted"]


def test_default_runs_add_a_compiled_copy_of_every_row_on_request() -> None:
    eager = default_runs(gammas=(2, 5), tree_sizes=(8,))
    both = default_runs(gammas=(2, 5), tree_sizes=(8,), compiled=True)
    assert [run.name for run in eager] == ["chain γ=2", "chain γ=5", "adaptive", "tree n=8"]
    assert [run.name for run in both[len(eager):]] == [f"{run.name}, compiled" for run in eager]
    assert all(run.compiled for run in both[len(eager):]) and not any(run.compiled for run in eager)
