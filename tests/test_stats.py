"""`GenerationStats` and `merge` against counts done by hand: every reported MAL and α comes from here."""

from __future__ import annotations

import pytest

from massv.speculative import GenerationStats


def _request(steps: list[tuple[int, int, int, int, bool]], num_draft_tokens: int = 4) -> GenerationStats:
    """Stats of one request from (proposed, judged, accepted, emitted, budget_limited) per step."""
    stats = GenerationStats(num_draft_tokens=num_draft_tokens, prompt_tokens=10)
    for proposed, judged, accepted, emitted, limited in steps:
        stats.record_step(proposed, judged, accepted, emitted, budget_limited=limited)
    stats.new_tokens = 1 + sum(step[3] for step in steps)
    return stats


# Request A: γ = 4. Step 1 accepts 2 of 4 (3 judged), step 2 accepts all 4 (+ bonus), step 3 rejects the
# first draft, step 4 is clipped by the budget to 2 drafts and accepts both.
REQUEST_A = [(4, 3, 2, 3, False), (4, 4, 4, 5, False), (4, 1, 0, 1, False), (2, 2, 2, 3, True)]
# Request B: step 1 accepts 1 of 4; step 2 accepts an EOS as its 3rd draft (emitted 3, nothing after it).
REQUEST_B = [(4, 2, 1, 2, False), (3, 3, 3, 3, False)]


def test_one_request_by_hand() -> None:
    stats = _request(REQUEST_A)
    assert stats.verification_steps == 4
    assert stats.mean_accepted_length == pytest.approx((3 + 5 + 1 + 3) / 4)
    assert stats.mean_accepted_length_full_blocks == pytest.approx((3 + 5 + 1) / 3)
    assert stats.mean_accepted_drafts == pytest.approx((2 + 4 + 0 + 2) / 4)
    assert stats.acceptance_rate == pytest.approx(8 / 10)  # accepted / judged
    assert stats.accepted_over_proposed == pytest.approx(8 / 14)
    # position j: judged in steps with judged > j; accepted in steps with accepted > j
    assert stats.position_judged == [4, 3, 2, 1]
    assert stats.position_accepted == [3, 3, 1, 1]
    assert stats.position_acceptance == pytest.approx([3 / 4, 3 / 3, 1 / 2, 1.0])


def test_merge_pools_counts_by_hand() -> None:
    first, second = _request(REQUEST_A), _request(REQUEST_B)
    first.drafting_seconds, second.drafting_seconds = 1.0, 0.5
    first.verifying_seconds, second.verifying_seconds = 2.0, 0.5
    first.total_seconds, second.total_seconds = 4.0, 1.5
    merged = GenerationStats.merge([first, second])
    assert merged.verification_steps == 6
    assert merged.accepted_lengths == [3, 5, 1, 3, 2, 3]
    assert merged.mean_accepted_length == pytest.approx(17 / 6)
    assert merged.mean_accepted_length_full_blocks == pytest.approx(14 / 5)
    # token-weighted, not the mean of the two requests' rates (0.8 and 4/5 = 0.8 would hide a wrong pool)
    assert merged.acceptance_rate == pytest.approx((8 + 4) / (10 + 5))
    assert merged.accepted_over_proposed == pytest.approx(12 / 21)
    assert merged.position_judged == [6, 5, 3, 1]
    assert merged.position_accepted == [5, 4, 2, 1]
    assert merged.new_tokens == first.new_tokens + second.new_tokens == 13 + 6
    assert merged.prompt_tokens == 20
    assert merged.decode_seconds == pytest.approx(4.0)
    assert merged.decode_tokens_per_second == pytest.approx(17 / 4.0)
    assert merged.tokens_per_second == pytest.approx(19 / 5.5)
    assert merged.stopped_by == "merged" and merged.num_draft_tokens == 4


def test_merge_of_nothing_is_empty() -> None:
    merged = GenerationStats.merge([])
    assert merged.verification_steps == 0 and merged.mean_accepted_length == 0.0 and merged.acceptance_rate == 0.0


@pytest.mark.parametrize("step", [(4, 5, 2, 3), (4, 3, 4, 5), (4, 3, 2, 4)])
def test_inconsistent_steps_are_refused(step) -> None:
    """judged > proposed, accepted > judged, or more emitted than accepted + 1: a bug upstream, not a stat."""
    with pytest.raises(ValueError, match="inconsistent step"):
        GenerationStats(num_draft_tokens=4).record_step(*step)


def test_to_dict_holds_every_derived_number() -> None:
    data = _request(REQUEST_A).to_dict()
    assert data["mean_accepted_length_full_blocks"] == pytest.approx(3.0)
    assert data["acceptance_rate"] == pytest.approx(0.8)
    assert data["budget_limited"] == [False, False, False, True]
