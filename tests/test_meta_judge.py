"""Meta-Rewarding: response selection, battles, Bradley-Terry Elo, judge-pair selection, the score quota."""

from __future__ import annotations

import pytest

from harness.judging.meta import (
    ScoreQuota,
    battle_outcome,
    elo_scores,
    judgement_pairs,
    quota_cap,
    select_judge_pair,
    select_response_for_meta,
)
from harness.judging.parse import DEFAULT_SCORE_REGEX


def J(text, score):
    return {"text": text, "score": score}


def test_select_response_for_meta_picks_highest_variance():
    responses = [
        {"is_end": True, "judgements": [J("a", 3.0), J("b", 3.0), J("c", 3.0)]},  # var 0
        {"is_end": True, "judgements": [J("a", 1.0), J("b", 3.0), J("c", None)]},  # var 1
        {"is_end": True, "judgements": [J("a", 0.0), J("b", 4.0), J("c", 2.0)]},  # var 8/3: the pick
        {"is_end": False, "judgements": [J("a", 0.0), J("b", 5.0)]},  # var 6.25 but not ended
        {"is_end": True, "judgements": [J("a", 5.0), J("b", None)]},  # one valid: no variance
    ]
    assert select_response_for_meta(responses) == 2


def test_select_response_for_meta_ties_and_none():
    same = [J("a", 1.0), J("b", 3.0)]
    assert select_response_for_meta([{"is_end": True, "judgements": same}] * 2) == 0
    assert select_response_for_meta([{"is_end": True, "judgements": [J("a", 2.0), J("b", 2.0)]}]) is None
    assert select_response_for_meta([]) is None


def test_judgement_pairs_skip_identical_and_unparseable():
    judgements = [
        J("Good.\nScore: 4", 4.0),
        J("Good.\nScore: 2", 2.0),  # same text as 0 once the score is stripped
        J("Weak.\nScore: 1", 1.0),
        J("no verdict", None),
        J("Fine.\nScore: 3", 3.0),
    ]
    assert judgement_pairs(judgements, DEFAULT_SCORE_REGEX) == [(0, 2), (0, 4), (1, 2), (1, 4), (2, 4)]


@pytest.mark.parametrize("ab,ba,expected", [
    ("A", "B", 1.0),   # i wins in both orders
    ("B", "A", 0.0),   # j wins in both orders
    ("A", "A", 0.5),   # position bias: tie
    ("B", "B", 0.5),
    (None, "B", None),  # unparseable verdict: battle dropped
    ("A", None, None),
    (None, None, None),
])
def test_battle_outcome_table(ab, ba, expected):
    assert battle_outcome(ab, ba) == expected


def test_elo_transitive_order_and_pair_selection():
    # 0 beats 1, 1 beats 2, 0 beats 2, each in both orders (outcome 1.0 for the first of the pair)
    battles = {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 1.0}
    elos = elo_scores(3, battles)
    assert elos[0] > elos[1] > elos[2]
    assert elos[1] == pytest.approx(1000.0, abs=1e-3)  # the fit is centred: the middle one stays at 1000
    assert all(abs(e) < 1e5 for e in elos)  # separable data stays finite
    judgements = [J("best", 4.0), J("mid", 3.0), J("worst", 1.0)]
    assert select_judge_pair(judgements, elos, DEFAULT_SCORE_REGEX) == (0, 2)
    # the same result however the battles are keyed or inserted
    assert elo_scores(3, {(2, 1): 0.0, (1, 0): 0.0, (2, 0): 0.0}) == elos
    assert elo_scores(3, dict(reversed(list(battles.items())))) == elos


def test_elo_two_player_hand_check():
    # one battle won by 0: the L2-penalised fit gives coefficients +-d/2 with d(1 + e^d) = 4C (C = 100)
    import math

    elos = elo_scores(2, {(0, 1): 1.0})
    d = (elos[0] - elos[1]) / 400
    assert d * (1 + math.exp(d)) == pytest.approx(400, rel=1e-4)
    assert elos[0] + elos[1] == pytest.approx(2000)


def test_elo_keyed_by_pair_a_dropped_battle_does_not_shift_others():
    # 4 judgements; the battle (1, 2) was dropped (unparseable). Keyed by pair, the remaining results keep their
    # meaning; a positional list would have given (1, 3)'s result to (1, 2) and so on.
    full = {(0, 1): 1.0, (0, 2): 1.0, (0, 3): 1.0, (1, 3): 1.0, (2, 3): 1.0}
    elos = elo_scores(4, full)
    assert elos[0] == max(elos) and elos[3] == min(elos)
    assert elos[1] == pytest.approx(elos[2], abs=1e-6)  # symmetric roles: equal
    # with the battle present as a tie, the picture is the same
    assert elo_scores(4, {**full, (1, 2): 0.5}) == pytest.approx(elos, abs=1e-3)
    judgements = [J("a", 5.0), J("b", 4.0), J("c", 3.0), J("d", 1.0)]
    assert select_judge_pair(judgements, elos, DEFAULT_SCORE_REGEX) == (0, 3)


def test_elo_no_battles_or_only_ties():
    assert elo_scores(3, {}) == [1000.0, 1000.0, 1000.0]
    ties = elo_scores(3, {(0, 1): 0.5, (1, 2): 0.5, (0, 2): 0.5})
    assert ties == [1000.0, 1000.0, 1000.0]
    assert select_judge_pair([J("a", 4.0), J("b", 3.0), J("c", 2.0)], ties, DEFAULT_SCORE_REGEX) is None  # bad sample
    cycle = elo_scores(3, {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 0.0})  # rock-paper-scissors: no winner
    assert select_judge_pair([J("a", 4.0), J("b", 3.0), J("c", 2.0)], cycle, DEFAULT_SCORE_REGEX) is None


def test_elo_rejects_bad_battles():
    with pytest.raises(ValueError):
        elo_scores(2, {(0, 2): 1.0})
    with pytest.raises(ValueError):
        elo_scores(2, {(0, 0): 1.0})


def test_select_judge_pair_bad_samples():
    elos = [1500.0, 1000.0, 500.0]
    assert select_judge_pair([J("a", 4.0), J("b", 3.0), J("c", 2.0)], elos, DEFAULT_SCORE_REGEX) == (0, 2)
    assert select_judge_pair([J("a", 4.0), J("b", 3.0), J("c", 4.0)], elos, DEFAULT_SCORE_REGEX) is None  # equal scores
    assert select_judge_pair([J("a", 4.0), J("b", 3.0), J("c", None)], elos, DEFAULT_SCORE_REGEX) is None  # score missing
    same = [J("Same.\nScore: 4", 4.0), J("b", 3.0), J("Same.\nScore: 2", 2.0)]
    assert select_judge_pair(same, elos, DEFAULT_SCORE_REGEX) is None  # identical texts once scores are stripped
    assert select_judge_pair([J("a", 4.0), J("b", 3.0), J("c", 2.0)], [1500.0, 1500.0, 500.0], DEFAULT_SCORE_REGEX) is None  # argmax tie
    assert select_judge_pair([J("a", 4.0), J("b", 3.0), J("c", 2.0)], [1500.0, 500.0, 500.0], DEFAULT_SCORE_REGEX) is None  # argmin tie


def test_score_quota_sequence():
    # classes 0..5 start at 1 each (total 6); max share 0.4; cap 3
    q = ScoreQuota(0, 5, max_relative_pcnt=0.4, cap=3)
    assert q.accept(5)      # 1/6 < 0.4, 1 < 3 -> counts[5] = 2, total 7
    assert q.accept(5.0)    # 2/7 < 0.4, 2 < 3 -> 3, total 8
    assert not q.accept(5)  # 3/8 < 0.4 but 3 is not < cap 3
    assert q.accept(4)      # 1/8 -> counts[4] = 2, total 9
    assert q.counts["5"] == 3 and q.counts["4"] == 2
    assert q.accept(4) and not q.accept(4)  # 2/9 -> 3; then 3 is not < cap 3


def test_score_quota_share_bound():
    q = ScoreQuota(0, 5, max_relative_pcnt=0.4, cap=100)
    assert [q.accept(5) for _ in range(4)] == [True, True, True, False]  # 1/6, 2/7, 3/8 pass; 4/9 = 0.44 fails
    assert q.accept(4.5)  # a fractional class starts at 1: 1/10
    assert q.counts["4.5"] == 2


def _accepted_per_class(num_prompts: int) -> int:
    """Judge pairs a score class takes in an iteration of num_prompts, as run_meta_judge builds the quota."""
    q = ScoreQuota(0, 5, max_relative_pcnt=1.0, cap=quota_cap(num_prompts, 0, 5))
    return sum(q.accept(4) for _ in range(100))


@pytest.mark.parametrize("prompts,nemo_cap,taken", [(8, 0, 1), (25, 1, 1), (26, 1, 1), (64, 2, 1), (100, 4, 3),
                                                    (1000, 40, 39)])
def test_one_quota_rule_nemos_at_any_prompt_count(prompts, nemo_cap, taken):
    """NeMo: a class is taken while counts[s] (starting at 1) < int(samples / (high - low)^2), i.e. int(...) - 1
    pairs. Below 50 prompts that is none at all: the floor keeps one pair per class, and from 50 prompts up the
    count is exactly NeMo's."""
    assert int(prompts / 25) == nemo_cap
    assert _accepted_per_class(prompts) == taken
    if nemo_cap >= 2:
        assert taken == nemo_cap - 1


def test_judgements_that_did_not_end_never_battle():
    judgements = [{"text": "full reason. Score: 4", "score": 4.0, "is_end": True},
                  {"text": "cut off reason. Score: 1", "score": 1.0, "is_end": False},
                  {"text": "other reason. Score: 2", "score": 2.0, "is_end": True}]
    assert judgement_pairs(judgements, DEFAULT_SCORE_REGEX) == [(0, 2)]


def test_judgement_pairs_strip_with_the_configured_regex():
    """'Rating: N' judgements that differ only in the rating are one text to the meta-judge, not a pair."""
    judgements = [J("Fine answer. Rating: 4", 4.0), J("Fine answer. Rating: 2", 2.0)]
    assert judgement_pairs(judgements, "Rating: {{ reward }}") == []
    assert select_judge_pair(judgements, [1500.0, 500.0], "Rating: {{ reward }}") is None
