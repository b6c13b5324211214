"""The speculative generation engine: draft with a small model, verify with the target, lose nothing.

- `engine.py`: `SpeculativeGenerator` (caches, vision-once, draft/verify loop) and `TargetAsDrafter`.
- `sampling.py`: warping identical to `generate()`, greedy and stochastic acceptance rules.
- `stats.py`: `GenerationStats` (accepted lengths, α, per-position acceptance, forwards, timings).
"""

from massv.speculative.engine import SpeculativeGenerator, SpeculativeOutput, TargetAsDrafter
from massv.speculative.sampling import SamplingConfig, verify_greedy, verify_sampled
from massv.speculative.stats import GenerationStats

__all__ = [
    "GenerationStats",
    "SamplingConfig",
    "SpeculativeGenerator",
    "SpeculativeOutput",
    "TargetAsDrafter",
    "verify_greedy",
    "verify_sampled",
]
