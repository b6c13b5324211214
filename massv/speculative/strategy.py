"""How much to draft per block: a fixed chain of γ, a chain whose length adapts per request, or a tree.

- `chain`: γ drafts every block (`num_draft_tokens`).
- `adaptive`: a chain whose length follows Hugging Face's heuristic (+2 after a fully accepted block, -1
  after a rejection) and which, under greedy decoding, stops early when the drafter's probability of its
  own guess falls below a threshold (HF's `assistant_confidence_threshold`): it knows when it is guessing.
- `tree`: EAGLE-2's dynamic draft tree (`massv.speculative.proposers.tree`), verified in one target forward.

The settings are plain frozen dataclasses so a benchmark or the CLI can name a configuration exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("chain", "tree", "adaptive")


@dataclass(frozen=True)
class TreeShape:
    """An EAGLE-2 draft tree: `depth` drafter forwards, `top_k` children per expanded node, `size` nodes kept.

    The target scores every node, so `size` is the verification width. The defaults (16 nodes, depth 10,
    top-3, stop below path probability 0.25) were chosen on a validation world (held-out seed 2, not the
    reported seed 1) on a 2-core CPU, where a drafter forward costs about a sixth of a target forward;
    EAGLE-2's GPU defaults are 60 nodes, depth 6, top-10.

    `min_probability`: stop growing before `depth` once no frontier node's path has at least this drafter
    probability. A deeper layer's nodes are accepted about as often as their path probabilities say (the
    drafter's estimate), so when all of them are unlikely another drafter forward costs more than it
    brings. 0 gives EAGLE-2's fixed depth.
    """

    size: int = 16
    depth: int = 10
    top_k: int = 3
    min_probability: float = 0.25

    def __post_init__(self) -> None:
        for name in ("size", "depth", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tree {name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.min_probability < 1.0:
            raise ValueError(f"tree min_probability must lie in [0, 1), got {self.min_probability!r}")


@dataclass(frozen=True)
class AdaptiveLength:
    """Per-request chain length: starts at γ, +2 after full acceptance, -1 after a rejection, in [1, max_tokens].

    `confidence_threshold`: under greedy decoding the drafter stops a block when its probability of its guess
    is below this (None: never); a block cut short that way and fully accepted leaves the length unchanged.
    Sampling uses the +2/-1 rule alone: a sampled draft is kept with probability min(1, p/q), which the
    drafter's q(x) does not predict (a drafter identical to the target is always accepted, however low q(x)).
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
    """One request's current chain length under `AdaptiveLength` (HF's `num_assistant_tokens` heuristic)."""

    def __init__(self, start: int, settings: AdaptiveLength) -> None:
        self.settings = settings
        self.length = max(1, min(start, settings.max_tokens))

    def update(self, requested: int, proposed: int, accepted: int) -> None:
        """After a block that asked for `requested` drafts, got `proposed`, and kept `accepted` of them."""
        if accepted < proposed:
            self.length = max(1, self.length - 1)
        elif proposed == requested:
            self.length = min(self.settings.max_tokens, self.length + 2)


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    return strategy
