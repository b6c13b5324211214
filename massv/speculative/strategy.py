"""How much to draft per block: a fixed chain of γ, a chain whose length adapts per request, or a tree.

- `chain`: γ drafts every block (`num_draft_tokens`).
- `adaptive`: a chain whose length, under greedy decoding, the drafter's confidence sets block by block (it
  stops once its probability that the whole block is right falls below a threshold: it knows when it is
  guessing), and which under sampling follows Hugging Face's heuristic (+2 after a fully accepted block,
  -1 after a rejection).
- `tree`: EAGLE-2's dynamic draft tree (`massv.speculative.proposers.tree`), verified in one target forward.

The settings are plain frozen dataclasses so a benchmark or the CLI can name a configuration exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("chain", "tree", "adaptive")


@dataclass(frozen=True)
class TreeShape:
    """An EAGLE-2 draft tree: `depth` drafter forwards, `top_k` children per expanded node, `size` nodes kept.

    `width`: how many of the newest depth's nodes are expanded (fed to the drafter) per depth; None: `top_k`,
    as in EAGLE-2. `width=1` expands only the drafter's best path: every depth is then a plain one-token
    drafter step on a causal cache (no tree mask, the compiled step when there is one, a crop to commit), and
    the tree is that path plus each of its nodes' `top_k - 1` runner-up children as leaves, which the target
    verifies in the same forward. Where a drafter forward is not much cheaper than a target one per token
    (CPUs, small targets), that is most of a tree's gain for a chain's drafting cost.

    The target scores every node, so `size` is the verification width. The defaults (at most 16 nodes and
    depth 16, top-3, width 1, growth stops below path probability 0.4, nodes below 0.1 left out) were chosen
    on a validation world (held-out seed 2, not the reported seed 1) on a 2-core CPU, where a drafter forward
    costs about an eighth of a target forward and every verified node adds to the target's time
    (`eval/results/strategies_adaptive.md`). On a GPU, where verifying 60 nodes costs what verifying 6 does,
    EAGLE-2's shape is the one to start from:
    `TreeShape(size=60, depth=6, top_k=10, width=10, min_probability=0.0, min_node_probability=0.0)`.

    `min_node_probability`: a node is verified only if the drafter's probability of its path is at least
    this. EAGLE-2 keeps the `size` most probable nodes whatever their value (0), which is right where a wider
    verification is free; where each verified node costs target compute, a node that unlikely yields less
    (about its probability, in tokens) than it costs.

    `min_probability`: stop growing before `depth` once no frontier node's path has at least this drafter
    probability. A deeper layer's nodes are accepted about as often as their path probabilities say (the
    drafter's estimate), so when all of them are unlikely another drafter forward costs more than it
    brings. 0 gives EAGLE-2's fixed depth.
    """

    size: int = 16
    depth: int = 16
    top_k: int = 3
    min_probability: float = 0.4
    width: int | None = 1
    min_node_probability: float = 0.1

    def __post_init__(self) -> None:
        for name in ("size", "depth", "top_k", "width"):
            value = getattr(self, name)
            if name == "width" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tree {name} must be an integer >= 1, got {value!r}")

    @property
    def expanded_per_depth(self) -> int:
        """Nodes fed to the drafter per depth (`width`, else EAGLE-2's `top_k`)."""
        return self.width if self.width is not None else self.top_k
        for name in ("min_probability", "min_node_probability"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"tree {name} must lie in [0, 1), got {value!r}")


@dataclass(frozen=True)
class AdaptiveLength:
    """Per-request chain length, up to `max_tokens` drafts per block.

    Greedy with a `confidence_threshold`: each block drafts until the drafter's probability that the whole
    block so far is right (the product of its probabilities of its own guesses) falls below the threshold.
    Greedy drafts survive iff they are the target's argmax, which a distilled drafter's confidence tracks
    (`eval/results/strategies_adaptive.md`), so the drafter's own estimate, block by block, sets the length;
    the +2/-1 rule below, a proxy for the same thing that lags one block behind, is not applied then.

    Sampling, or `confidence_threshold=None`: Hugging Face's heuristic, starting at γ: +2 after a fully
    accepted block, -1 after a rejection, in [1, max_tokens]. A sampled draft is kept with probability
    min(1, p/q), which the drafter's q(x) does not predict (a drafter identical to the target is always
    accepted, however low q(x)).
    """

    max_tokens: int = 16
    confidence_threshold: float | None = 0.4

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"adaptive max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        threshold = self.confidence_threshold
        if threshold is not None and not 0.0 <= threshold < 1.0:
            raise ValueError(f"confidence_threshold must lie in [0, 1) or be None, got {threshold!r}")


class LengthController:
    """One request's current chain length under `AdaptiveLength`.

    `confidence_decides`: the proposer stops each block on the drafter's confidence (greedy with a threshold),
    so every block may draft `max_tokens`; else HF's `num_assistant_tokens` heuristic moves the length."""

    def __init__(self, start: int, settings: AdaptiveLength, confidence_decides: bool = False) -> None:
        self.settings = settings
        self.confidence_decides = confidence_decides
        self.length = settings.max_tokens if confidence_decides else max(1, min(start, settings.max_tokens))

    def update(self, requested: int, proposed: int, accepted: int) -> None:
        """After a block that asked for `requested` drafts, got `proposed`, and kept `accepted` of them."""
        if self.confidence_decides:
            return
        if accepted < proposed:
            self.length = max(1, self.length - 1)
        elif proposed == requested:
            self.length = min(self.settings.max_tokens, self.length + 2)


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    return strategy
