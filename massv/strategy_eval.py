"""Compare drafting strategies (chain γ sweep, adaptive chain, tree-size sweep) on the same prompts, one process.

`compare_strategies` is the public entry point: eval/bench_strategies.py writes its rows to JSON, markdown
and a plot, and the demo report can call it for its per-strategy rows of the full MASSV drafter. Every
row pools its requests (counts and times summed, so ratios are token-weighted):

- `tokens_per_target_forward`: MAL (tokens emitted per verification forward, bonus included);
- `tokens_per_second`: new tokens over the engine's wall time, vision and prefill included; the median
  over `repeats` interleaved passes (configurations run round-robin, so drift hits all alike);
- `position_acceptance`: per block position (a tree: per depth);
- `identical` / `requests`: greedy outputs equal to `target.generate(do_sample=False)`.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from massv.speculative import GenerationStats, SpeculativeGenerator
from massv.speculative.strategy import AdaptiveLength, TreeShape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StrategyRun:
    """One configuration: a name, the strategy and its parameters."""

    name: str
    strategy: str = "chain"
    num_draft_tokens: int = 5
    tree: TreeShape | None = None
    adaptive: AdaptiveLength | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "num_draft_tokens": self.num_draft_tokens, "tree": self.tree,
                "adaptive": self.adaptive}

    def describe(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "strategy": self.strategy}
        if self.strategy == "tree":
            data.update(tree_size=self.tree.size, tree_depth=self.tree.depth, tree_top_k=self.tree.top_k)
        else:
            data["num_draft_tokens"] = self.num_draft_tokens
        if self.strategy == "adaptive":
            settings = self.adaptive or AdaptiveLength()
            data.update(max_tokens=settings.max_tokens, confidence_threshold=settings.confidence_threshold)
        return data


def default_runs(gammas: tuple[int, ...] = tuple(range(1, 9)), tree_sizes: tuple[int, ...] = (4, 8, 16, 24, 32),
                 tree_depth: int = 6, tree_top_k: int = 4, adaptive_start: int = 5) -> list[StrategyRun]:
    """The γ sweep, the adaptive chain (starting at γ = `adaptive_start`) and the tree-size sweep."""
    runs = [StrategyRun(f"chain γ={gamma}", "chain", gamma) for gamma in gammas]
    runs.append(StrategyRun("adaptive", "adaptive", adaptive_start, adaptive=AdaptiveLength()))
    runs += [StrategyRun(f"tree n={size}", "tree", tree=TreeShape(size=size, depth=tree_depth, top_k=tree_top_k))
             for size in tree_sizes]
    return runs


@dataclass
class _Row:
    run: StrategyRun
    stats: list[GenerationStats] = field(default_factory=list)  # first pass only: counts are deterministic
    tokens_per_second: list[float] = field(default_factory=list)  # one per pass
    identical: int = 0
    requests: int = 0


def target_references(target: Any, cases: list[Any], max_new_tokens: int, repeats: int = 1
                      ) -> tuple[list[list[int]], float]:
    """Greedy `target.generate` outputs and the target alone's tokens/s (median over `repeats` passes)."""
    references, rates = [], []
    for repeat in range(repeats):
        tokens, seconds = 0, 0.0
        for index, inputs in enumerate(cases):
            start = time.perf_counter()
            with torch.no_grad():
                output = target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            seconds += time.perf_counter() - start
            new = output[0, inputs["input_ids"].shape[1]:].tolist()
            tokens += len(new)
            if repeat == 0:
                references.append(new)
        rates.append(tokens / seconds)
    return references, statistics.median(rates)


def compare_strategies(target: Any, drafter: Any, processor: Any, cases: list[Any], runs: list[StrategyRun],
                       temperature: float, max_new_tokens: int, references: list[list[int]] | None = None,
                       repeats: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Run every configuration over `cases` `repeats` times (round-robin) and summarise each as a row."""
    generator = SpeculativeGenerator(target, drafter, processor)
    rows = [_Row(run) for run in runs]
    for repeat in range(repeats):
        order = rows[repeat % len(rows):] + rows[: repeat % len(rows)]
        for row in order:
            tokens, seconds = 0, 0.0
            for index, inputs in enumerate(cases):
                output = generator.generate_from_inputs(
                    inputs, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + index,
                    **row.run.kwargs())
                tokens += output.stats.new_tokens
                seconds += output.stats.total_seconds
                if repeat == 0:
                    row.stats.append(output.stats)
                    row.requests += 1
                    if references is not None and temperature == 0:
                        row.identical += output.generated_ids[0].tolist() == references[index]
            row.tokens_per_second.append(tokens / seconds)
            logger.info("%s T=%g pass %d: %.1f tok/s", row.run.name, temperature, repeat, tokens / seconds)
    return [_summary(row, temperature) for row in rows]


def _summary(row: _Row, temperature: float) -> dict[str, Any]:
    merged = GenerationStats.merge(row.stats)
    data = row.run.describe()
    data.update(
        temperature=temperature,
        tokens_per_target_forward=merged.mean_accepted_length,
        mean_accepted_length_full_blocks=merged.mean_accepted_length_full_blocks,
        acceptance_rate=merged.acceptance_rate,
        drafts_per_block=sum(merged.proposed_drafts) / max(merged.verification_steps, 1),
        drafter_forwards_per_block=(merged.drafter_forwards - len(row.stats)) / max(merged.verification_steps, 1),
        position_acceptance=merged.position_acceptance,
        branch_accepted=merged.branch_accepted,
        tokens_per_second=statistics.median(row.tokens_per_second),
        tokens_per_second_runs=row.tokens_per_second,
        new_tokens=merged.new_tokens,
        requests=row.requests,
        identical=row.identical if temperature == 0 else None,
    )
    return data
