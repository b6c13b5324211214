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


def test_merge_sums_forwards_and_keeps_gamma_of_a_single_run() -> None:
    first, second = _request(REQUEST_A, num_draft_tokens=4), _request(REQUEST_B, num_draft_tokens=4)
    first.target_forwards, second.target_forwards = 5, 3
    first.drafter_forwards, second.drafter_forwards = 13, 8
    merged = GenerationStats.merge([first, second])
    assert (merged.target_forwards, merged.drafter_forwards) == (8, 21)
    single = GenerationStats.merge([_request(REQUEST_B, num_draft_tokens=3)])
    assert single.num_draft_tokens == 3 and single.accepted_lengths == [2, 3]
    assert GenerationStats.merge([]).num_draft_tokens == 0


def test_a_request_without_steps_or_time_reports_zeros() -> None:
    """No verification step, no judged draft, no time: every ratio is 0, never a division error or a 1."""
    stats = GenerationStats(num_draft_tokens=4)
    for name in ("mean_accepted_length", "mean_accepted_length_full_blocks", "mean_accepted_drafts",
                 "acceptance_rate", "accepted_over_proposed", "tokens_per_second", "decode_tokens_per_second"):
        assert getattr(stats, name) == 0.0, name
    limited_only = _request([(2, 2, 2, 3, True)])  # every step cut by the budget: no full block to average
    assert limited_only.mean_accepted_length_full_blocks == 0.0
    assert limited_only.mean_accepted_length == 3.0


def test_positions_never_judged_report_zero_acceptance() -> None:
    stats = GenerationStats(num_draft_tokens=4, position_judged=[2, 0], position_accepted=[1, 0])
    assert stats.position_acceptance == [0.5, 0.0]


def test_decode_rate_counts_fractions_of_a_second() -> None:
    stats = _request(REQUEST_B)
    stats.drafting_seconds, stats.verifying_seconds, stats.total_seconds = 0.25, 0.25, 0.8
    assert stats.decode_tokens_per_second == pytest.approx(5 / 0.5)
    assert stats.tokens_per_second == pytest.approx(6 / 0.8)


def test_a_step_is_a_full_block_unless_said_otherwise() -> None:
    stats = GenerationStats(num_draft_tokens=4)
    stats.record_step(4, 3, 2, 3)
    assert stats.budget_limited == [False] and stats.mean_accepted_length_full_blocks == 3.0
