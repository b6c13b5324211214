"""What one speculative generation did: acceptance, forwards and where the time went.

Definitions (the numbers papers report differ in exactly these choices, so they are spelled out):

- A *verification step* is one target forward over `[last emitted token] + drafts`. The target's prompt
  forward (prefill) is NOT a verification step: it emits the first new token on its own.
- `accepted_lengths[i]`: tokens emitted by verification step i, counting the target's own token (the
  correction after a rejection, or the bonus token after full acceptance). Range 1..γ+1; fewer only when an
  accepted draft is an end-of-sequence token (nothing after it is emitted).
- Mean accepted length `MAL = sum(accepted_lengths) / verification_steps` (tokens per target forward, bonus
  included). `mean_accepted_drafts`: accepted draft tokens only, per step (= MAL - 1 unless an accepted
  end-of-sequence draft ended the last step).
- `acceptance_rate` α = accepted drafts / *judged* drafts. A rejection ends a block, so the drafts after it
  are never judged; judged = accepted + rejected. This is the estimator of the per-token acceptance
  probability in the speedup formula (1 - α^(γ+1)) / ((1 - α)(γc + 1)).
  `accepted_over_proposed` = accepted / all drafted tokens, the stricter number some papers use.
- `position_acceptance[j]`: of the drafts at block position j that were judged, the fraction accepted.
- `mean_accepted_length_full_blocks`: MAL over the steps whose drafting the `max_new_tokens` budget did not
  cut short. The last block of a request is usually clipped, so plain MAL depends on `max_new_tokens` (a
  perfect drafter at γ = 4 reads 5.00, 3.67 or 3.00); this one does not (5.00).
- Trees: `proposed_drafts` counts every node the target scored; block position j is depth j + 1 of the
  tree (judged when the accepted path reached depth j and had children there). `branch_accepted` counts
  accepted nodes that were not their parent's first (most probable) child: what a chain would have missed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from massv.speculative.tree import DraftTree


@dataclass
class GenerationStats:
    """Counters and timings for one request (batch size 1)."""

    num_draft_tokens: int = 0  # γ requested (a tree: its size; adaptive: the longest allowed chain)
    strategy: str = "chain"  # "chain", "adaptive" or "tree"
    prompt_tokens: int = 0
    new_tokens: int = 0  # tokens emitted, prefill token included
    accepted_lengths: list[int] = field(default_factory=list)  # per verification step, bonus/correction included
    accepted_drafts: list[int] = field(default_factory=list)  # per verification step, drafts accepted
    proposed_drafts: list[int] = field(default_factory=list)  # per verification step, drafts the drafter produced
    judged_drafts: list[int] = field(default_factory=list)  # per verification step, drafts the verifier ruled on
    budget_limited: list[bool] = field(default_factory=list)  # per verification step, drafting cut by max_new_tokens
    position_judged: list[int] = field(default_factory=list)  # per block position
    position_accepted: list[int] = field(default_factory=list)  # per block position
    branch_accepted: int = 0  # trees: accepted nodes that were not their parent's first child
    target_forwards: int = 0  # prefill included
    drafter_forwards: int = 0  # drafter prompt forward included
    stopped_by: str = ""  # "eos" or "max_new_tokens"
    vision_seconds: float = 0.0  # vision encoder, once per request
    prefill_seconds: float = 0.0  # target prompt forward + drafter prompt forward
    drafting_seconds: float = 0.0  # drafter forwards after its prompt, plus choosing drafts
    verifying_seconds: float = 0.0  # target verification forwards, acceptance, cache rollback
    total_seconds: float = 0.0  # wall time of the whole request (input preparation excluded)

    # ---- recording ------------------------------------------------------------------------------------
    def record_step(self, proposed: int, judged: int, accepted: int, emitted: int, budget_limited: bool = False) -> None:
        """One verification step; `judged` = accepted + (1 if a draft was rejected)."""
        if not 0 <= accepted <= judged <= proposed or emitted > accepted + 1:
            raise ValueError(f"inconsistent step: proposed {proposed}, judged {judged}, accepted {accepted}, "
                             f"emitted {emitted}")
        self.budget_limited.append(budget_limited)
        self.proposed_drafts.append(proposed)
        self.judged_drafts.append(judged)
        self.accepted_drafts.append(accepted)
        self.accepted_lengths.append(emitted)
        while len(self.position_judged) < judged:
            self.position_judged.append(0)
            self.position_accepted.append(0)
        for position in range(judged):
            self.position_judged[position] += 1
            if position < accepted:
                self.position_accepted[position] += 1

    def record_tree_path(self, tree: DraftTree, path: list[int]) -> None:
        """Count the accepted nodes of a tree block that were not their parent's first child."""
        self.branch_accepted += sum(not tree.is_first_child(node) for node in path)

    # ---- derived --------------------------------------------------------------------------------------
    @property
    def verification_steps(self) -> int:
        return len(self.accepted_lengths)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step, bonus/correction token included (MAL)."""
        return sum(self.accepted_lengths) / self.verification_steps if self.verification_steps else 0.0

    @property
    def mean_accepted_length_full_blocks(self) -> float:
        """MAL over steps not cut short by the `max_new_tokens` budget (see module docstring)."""
        full = [length for length, limited in zip(self.accepted_lengths, self.budget_limited) if not limited]
        return sum(full) / len(full) if full else 0.0

    @property
    def mean_accepted_drafts(self) -> float:
        """Draft tokens accepted per verification step (MAL without the target's own token)."""
        return sum(self.accepted_drafts) / self.verification_steps if self.verification_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """α = accepted / judged drafts (see module docstring)."""
        judged = sum(self.judged_drafts)
        return sum(self.accepted_drafts) / judged if judged else 0.0

    @property
    def accepted_over_proposed(self) -> float:
        proposed = sum(self.proposed_drafts)
        return sum(self.accepted_drafts) / proposed if proposed else 0.0

    @property
    def position_acceptance(self) -> list[float]:
        return [accepted / judged if judged else 0.0 for accepted, judged in zip(self.position_accepted, self.position_judged)]

    @property
    def decode_seconds(self) -> float:
        return self.drafting_seconds + self.verifying_seconds

    @property
    def tokens_per_second(self) -> float:
        """End to end: all new tokens over the whole request (vision and prefill included)."""
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode only: tokens from verification steps over drafting + verifying time."""
        emitted = sum(self.accepted_lengths)
        return emitted / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Raw fields plus every derived number, JSON-ready."""
        data = asdict(self)
        for name in (
            "verification_steps", "mean_accepted_length", "mean_accepted_length_full_blocks", "mean_accepted_drafts", "acceptance_rate",
            "accepted_over_proposed", "position_acceptance", "decode_seconds", "tokens_per_second",
            "decode_tokens_per_second",
        ):
            data[name] = getattr(self, name)
        return data

    @classmethod
    def merge(cls, runs: list[GenerationStats]) -> GenerationStats:
        """Pooled stats over many requests: counts and times summed, so ratios are token-weighted."""
        merged = cls(num_draft_tokens=runs[0].num_draft_tokens if runs else 0, stopped_by="merged",
                     strategy=runs[0].strategy if runs else "chain")
        for run in runs:
            merged.prompt_tokens += run.prompt_tokens
            merged.new_tokens += run.new_tokens
            merged.accepted_lengths += run.accepted_lengths
            merged.accepted_drafts += run.accepted_drafts
            merged.proposed_drafts += run.proposed_drafts
            merged.judged_drafts += run.judged_drafts
            merged.budget_limited += run.budget_limited
            width = max(len(merged.position_judged), len(run.position_judged))
            merged.position_judged += [0] * (width - len(merged.position_judged))
            merged.position_accepted += [0] * (width - len(merged.position_accepted))
            for position, (judged, accepted) in enumerate(zip(run.position_judged, run.position_accepted)):
                merged.position_judged[position] += judged
                merged.position_accepted[position] += accepted
            merged.target_forwards += run.target_forwards
            merged.branch_accepted += run.branch_accepted
            merged.drafter_forwards += run.drafter_forwards
            for name in ("vision_seconds", "prefill_seconds", "drafting_seconds", "verifying_seconds", "total_seconds"):
                setattr(merged, name, getattr(merged, name) + getattr(run, name))
        return merged
