"""The speculative generation engine: draft with a small model, verify with the target, lose nothing.

- `engine.py`: `SpeculativeGenerator`, the loop as numbered steps (propose, verify, accept, commit).
- `target.py`: `TargetVerifier`, the target's side (prefill, verify with explicit positions and mask, rollback).
- `proposers/`: the drafting seam (`Proposer`, `Proposal`) and one proposer per drafter kind, picked by a registry.
- `acceptance.py`: greedy and sampled acceptance rules for chains and trees, on tensors.
- `strategy.py`: chain / adaptive chain / tree settings (`TreeShape`, `AdaptiveLength`).
- `tree.py`: `DraftTree`, its ancestor masks and per-node positions, the KV gather of an accepted path.
- `sampling.py`: the settings `generate()` resolves and its logits processors, run on whole blocks.
- `stats.py`: `GenerationStats` (accepted lengths, α, per-position acceptance, forwards, timings).
"""

from massv.speculative.acceptance import (
    accept_greedy,
    accept_sampled,
    accept_tree_greedy,
    accept_tree_sampled,
    residual_distribution,
)
from massv.speculative.engine import SpeculativeGenerator, SpeculativeOutput, UnsupportedInputError
from massv.speculative.proposers import (
    CommittedTokens,
    CrossTokenizerDrafter,
    DrafterPairError,
    DraftRequest,
    Proposal,
    Proposer,
    TargetAsDrafter,
    proposer_class_for,
    register_proposer,
)
from massv.speculative.sampling import SamplingConfig, ScoreProcessor, UnsupportedSettingError
from massv.speculative.stats import GenerationStats
from massv.speculative.strategy import STRATEGIES, AdaptiveLength, TreeShape
from massv.speculative.target import TargetVerifier, new_rollback_cache
from massv.speculative.tree import DraftTree

__all__ = [
    "STRATEGIES",
    "AdaptiveLength",
    "CommittedTokens",
    "CrossTokenizerDrafter",
    "DraftRequest",
    "DraftTree",
    "DrafterPairError",
    "GenerationStats",
    "Proposal",
    "Proposer",
    "SamplingConfig",
    "ScoreProcessor",
    "SpeculativeGenerator",
    "SpeculativeOutput",
    "TargetAsDrafter",
    "TargetVerifier",
    "TreeShape",
    "UnsupportedInputError",
    "UnsupportedSettingError",
    "accept_greedy",
    "accept_sampled",
    "accept_tree_greedy",
    "accept_tree_sampled",
    "new_rollback_cache",
    "proposer_class_for",
    "register_proposer",
    "residual_distribution",
]
