"""Compare drafting strategies (chain γ sweep, adaptive chain, tree-size sweep) on the same prompts, one process.

`compare_strategies` is the public entry point: eval/bench_strategies.py writes its rows to JSON, markdown
and a plot, and the demo report can call it for its per-strategy rows of the full MASSV drafter. Every
row pools its requests (counts and times summed, so ratios are token-weighted):

- `tokens_per_target_forward`: MAL (tokens emitted per verification forward, bonus included);
- `tokens_per_second`: new tokens over the engine's wall time, vision and prefill included; the median
  over `repeats` passes. Configurations are interleaved per *request* (each prompt runs under every
  configuration, in a rotating order, before the next prompt), so load from other jobs on a shared machine
  falls on all rows alike instead of on whichever row happened to run during it;
- `speedup`: over `target.generate` on the same prompts, timed inside the same interleaving;
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
    compiled: bool = False  # the drafter's steps on the static cache through torch.compile (`compile_drafter`)

    def kwargs(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "num_draft_tokens": self.num_draft_tokens, "tree": self.tree,
                "adaptive": self.adaptive}

    def describe(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "strategy": self.strategy, "compiled": self.compiled}
        if self.strategy == "tree":
            data.update(tree_size=self.tree.size, tree_depth=self.tree.depth, tree_top_k=self.tree.top_k,
                        tree_width=self.tree.expanded_per_depth,
                        tree_min_node_probability=self.tree.min_node_probability,
                        tree_min_probability=self.tree.min_probability)
        else:
            data["num_draft_tokens"] = self.num_draft_tokens
        if self.strategy == "adaptive":
            settings = self.adaptive or AdaptiveLength()
            data.update(max_tokens=settings.max_tokens, confidence_threshold=settings.confidence_threshold)
        return data


def default_runs(gammas: tuple[int, ...] = tuple(range(1, 9)), tree_sizes: tuple[int, ...] = (6, 10, 16),
                 tree_depth: int = 16, tree_top_k: int = 3, tree_min_probability: float = 0.4,
                 adaptive_start: int = 5, compiled: bool = False,
                 tree_widths: tuple[int | None, ...] = (1,), tree_min_node_probability: float = 0.1
                 ) -> list[StrategyRun]:
    """The γ sweep, the adaptive chain (starting at γ = `adaptive_start`) and the tree-size sweep, once per
    tree width (None: `tree_top_k`, EAGLE-2; names say the width unless it is 1); with `compiled`, the same
    rows again with the compiled drafter (names ending in "compiled")."""
    def sweep(suffix: str, compile_drafter: bool) -> list[StrategyRun]:
        runs = [StrategyRun(f"chain γ={gamma}{suffix}", "chain", gamma, compiled=compile_drafter) for gamma in gammas]
        runs.append(StrategyRun(f"adaptive{suffix}", "adaptive", adaptive_start, adaptive=AdaptiveLength(),
                                compiled=compile_drafter))
        for width in tree_widths:
            label = "" if width == 1 else f" width={width or tree_top_k}"
            runs += [StrategyRun(f"tree n={size}{label}{suffix}", "tree", compiled=compile_drafter,
                                 tree=TreeShape(size=size, depth=tree_depth, top_k=tree_top_k,
                                                min_probability=tree_min_probability, width=width,
                                                min_node_probability=tree_min_node_probability))
                     for size in tree_sizes]
        return runs

    return sweep("", False) + (sweep(", compiled", True) if compiled else [])


@dataclass
class _Row:
    run: StrategyRun
    stats: list[GenerationStats] = field(default_factory=list)  # first pass only: counts are deterministic
    tokens_per_second: list[float] = field(default_factory=list)  # one per pass
    identical: int = 0
    requests: int = 0


def target_references(target: Any, cases: list[Any], max_new_tokens: int) -> list[list[int]]:
    """Greedy `target.generate` outputs: what every greedy row must reproduce token for token."""
    references = []
    for inputs in cases:
        with torch.no_grad():
            output = target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        references.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    return references


def compare_strategies(target: Any, drafter: Any, processor: Any, cases: list[Any], runs: list[StrategyRun],
                       temperature: float, max_new_tokens: int, references: list[list[int]] | None = None,
                       repeats: int = 3, seed: int = 0, compile_max_length: int = 1024,
                       compile_backend: str = "inductor") -> tuple[list[dict[str, Any]], float]:
    """Every configuration on every case, `repeats` times, interleaved per request; rows and the target's tok/s.

    Compiled rows share one `compile_drafter=True` generator, warmed up on the first case (untimed) so that
    the timed passes measure decoding, not compilation.
    """
    generators = {False: SpeculativeGenerator(target, drafter, processor)}
    if any(run.compiled for run in runs):
        generators[True] = SpeculativeGenerator(target, drafter, processor, compile_drafter=True,
                                                compile_max_length=compile_max_length, compile_backend=compile_backend)
        for run in runs:
            if run.compiled:
                generators[True].generate_from_inputs(cases[0], max_new_tokens=max_new_tokens,
                                                      temperature=temperature, seed=seed, **run.kwargs())
    rows = [_Row(run) for run in runs]
    slots: list[_Row | None] = [None, *rows]  # None: the target alone, timed in the same rotation
    target_tokens = [0] * repeats
    target_seconds = [0.0] * repeats
    sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
    for repeat in range(repeats):
        tokens = [0] * len(rows)
        seconds = [0.0] * len(rows)
        for index, inputs in enumerate(cases):
            shift = (index + repeat) % len(slots)
            for slot in slots[shift:] + slots[:shift]:
                if slot is None:
                    torch.manual_seed(seed + index)
                    start = time.perf_counter()
                    with torch.no_grad():
                        output = target.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
                    target_seconds[repeat] += time.perf_counter() - start
                    target_tokens[repeat] += output.shape[1] - inputs["input_ids"].shape[1]
                    continue
                position = rows.index(slot)
                result = generators[slot.run.compiled].generate_from_inputs(
                    inputs, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + index,
                    **slot.run.kwargs())
                tokens[position] += result.stats.new_tokens
                seconds[position] += result.stats.total_seconds
                if repeat == 0:
                    slot.stats.append(result.stats)
                    slot.requests += 1
                    if references is not None and temperature == 0:
                        slot.identical += result.generated_ids[0].tolist() == references[index]
        for position, row in enumerate(rows):
            row.tokens_per_second.append(tokens[position] / seconds[position])
        logger.info("T=%g pass %d: target %.1f tok/s; %s", temperature, repeat,
                    target_tokens[repeat] / target_seconds[repeat],
                    ", ".join(f"{row.run.name} {row.tokens_per_second[-1]:.1f}" for row in rows))
    target_speed = statistics.median(count / time_spent for count, time_spent in zip(target_tokens, target_seconds))
    return [_summary(row, temperature, target_speed) for row in rows], target_speed


def _summary(row: _Row, temperature: float, target_speed: float) -> dict[str, Any]:
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
        speedup=statistics.median(row.tokens_per_second) / target_speed,
        new_tokens=merged.new_tokens,
        requests=row.requests,
        identical=row.identical if temperature == 0 else None,
    )
    return data
