"""Chosen/rejected selection, length control, bad samples and judge-pair mixing, against hand-worked cases."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.pairs import bad_sample_stats, judge_cap, mix_judge_pairs, select_pair


def R(text, mean, num_tokens=10, var=0.0, is_end=True):
    return {"text": text, "num_tokens": num_tokens, "is_end": is_end, "mean": mean, "var": var}


def test_rho0_max_min_with_variance_ties():
    responses = [
        R("a", 4.0, var=1.0),
        R("b", 4.0, var=0.0),  # max mean, lowest variance: chosen
        R("c", 2.0, var=0.5),  # min mean, tie on variance with d: the first is rejected
        R("d", 2.0, var=0.5),
        R("e", 1.0, is_end=False),  # lower, but did not end: excluded
        R("f", None, var=None),  # no valid score: excluded
    ]
    assert select_pair(responses, 0.0) == {"chosen": 1, "rejected": 2, "bad": False, "reason": None}


def test_length_control_picks_shorter_chosen():
    # Smax 5, Smin 1, rho 0.2: chosen window [0.8*5 + 0.2*1, 5] = [4.2, 5] -> {0 (100 tok), 1 (40 tok)}: shortest 1
    #                          rejected window [1, 0.8*1 + 0.2*5] = [1, 1.8] -> {3 (50 tok), 4 (90 tok)}: longest 4
    responses = [R("a", 5.0, 100), R("b", 4.5, 40), R("c", 3.0, 20), R("d", 1.0, 50), R("e", 1.5, 90)]
    assert select_pair(responses, 0.0)["chosen"] == 0 and select_pair(responses, 0.0)["rejected"] == 3
    pick = select_pair(responses, 0.2)
    assert (pick["chosen"], pick["rejected"], pick["bad"]) == (1, 4, False)
    assert responses[pick["chosen"]]["num_tokens"] < responses[0]["num_tokens"]


def test_length_control_ties_and_bounds():
    # equal lengths in the chosen window: the higher mean, then the first
    assert select_pair([R("a", 4.6, 30), R("b", 5.0, 30), R("c", 1.0, 10)], 0.2)["chosen"] == 1
    assert select_pair([R("a", 5.0, 30), R("b", 5.0, 30), R("c", 1.0, 10)], 0.2)["chosen"] == 0
    # equal lengths in the rejected window: the lower mean
    assert select_pair([R("a", 5.0, 10), R("b", 1.5, 30), R("c", 1.0, 30)], 0.2)["rejected"] == 2
    # rho 0.5, Smax 4, Smin 2: both windows end at 3.0 exactly, and 3.0 is inside
    pick = select_pair([R("a", 4.0, 50), R("b", 3.0, 10), R("c", 2.0, 40)], 0.5)
    assert (pick["chosen"], pick["rejected"]) == (1, 2)
    # rho 0.1 with 0.1 not exact in binary: 0.9*5 + 0.1*0 = 4.5 must include a 4.5
    assert select_pair([R("a", 5.0, 50), R("b", 4.5, 10), R("c", 0.0, 40)], 0.1)["chosen"] == 1


def test_length_control_without_score_gap_is_bad():
    # rho 1: chosen = shortest, rejected = longest overall; here that would prefer the lower-scored response
    pick = select_pair([R("a", 4.0, 50), R("b", 2.0, 10)], 1.0)
    assert pick["bad"] and pick["chosen"] is None and "gap" in pick["reason"]


@pytest.mark.parametrize("responses,reason", [
    ([R("a", 3.0), R("b", 3.0), R("c", 3.0)], "all scores equal"),
    ([R("same", 4.0), R("same", 1.0)], "identical"),
    ([R("a", 4.0), R("b", None), R("c", 1.0, is_end=False)], "fewer than two"),
    ([], "fewer than two"),
])
def test_bad_samples(responses, reason):
    for rho in (0.0, 0.3):
        pick = select_pair(responses, rho)
        assert pick["bad"] and pick["chosen"] is None and pick["rejected"] is None and reason in pick["reason"]


def test_select_pair_rejects_bad_rho():
    with pytest.raises(ValueError, match="length_control"):
        select_pair([R("a", 1.0), R("b", 2.0)], 1.5)


# ------------------------------------------------------------------------------------------------ mixing
def test_mix_hand_example():
    policy = [("p", i) for i in range(10)]
    judge = [("j", i) for i in range(5)]
    items, stats = mix_judge_pairs(policy, judge, 4, 0.25, random.Random(0))
    # cap floor(0.25 * 4) = 1: three full batches of 3 policy + 1 judge, then 1 policy pair alone (one judge pair
    # would be half of a batch of 2); 3 judge pairs used, 2 dropped
    assert stats["judge_cap"] == 1
    assert stats["batch_sizes"] == [4, 4, 4, 1] and stats["judge_per_batch"] == [1, 1, 1, 0]
    assert (stats["num_judge"], stats["num_judge_dropped"], stats["num_policy"]) == (3, 2, 10)
    assert sorted(x for x in items if x[0] == "p") == policy  # policy pairs all used
    assert sorted(x for x in items[:4] if x[0] == "p") == policy[:3]  # and batch by batch in their order
    assert items == mix_judge_pairs(policy, judge, 4, 0.25, random.Random(0))[0]


def test_mix_cap_uses_floor_without_float_surprise():
    assert judge_cap(20, 0.15) == 3  # 0.15 * 20 == 2.9999999999999996 in floats
    assert judge_cap(64, 0.1) == 6
    assert judge_cap(7, 0.0) == 0


def test_mix_rejects_bad_arguments():
    with pytest.raises(ValueError):
        mix_judge_pairs([1], [2], 4, -1.0, random.Random(0))
    with pytest.raises(ValueError):
        mix_judge_pairs([1], [2], 0, 0.1, random.Random(0))


@settings(max_examples=200, deadline=None)
@given(
    n_policy=st.integers(0, 70),
    n_judge=st.integers(0, 70),
    gbs=st.integers(1, 16),
    pcnt=st.one_of(st.sampled_from([0.0, 0.1, 0.15, 0.25, 0.5, 1.0]), st.floats(0, 1)),
    seed=st.integers(0, 2**32),
)
def test_mix_never_exceeds_the_cap_and_is_deterministic(n_policy, n_judge, gbs, pcnt, seed):
    policy = [("p", i) for i in range(n_policy)]
    judge = [("j", i) for i in range(n_judge)]
    items, stats = mix_judge_pairs(policy, judge, gbs, pcnt, random.Random(seed))
    assert (items, stats) == mix_judge_pairs(policy, judge, gbs, pcnt, random.Random(seed))
    cap = math.floor(pcnt * gbs + 1e-9)
    start = p_start = 0
    for size in stats["batch_sizes"]:
        batch = items[start : start + size]
        start += size
        n_j = sum(1 for x in batch if x[0] == "j")
        assert sorted(x for x in batch if x[0] == "p") == policy[p_start : p_start + size - n_j]  # in order
        p_start += size - n_j
        assert 1 <= size <= gbs
        assert n_j <= cap and n_j <= math.floor(pcnt * size + 1e-9)
    assert start == len(items)
    assert stats["batch_sizes"][:-1] == [gbs] * (len(stats["batch_sizes"]) - 1)  # only the last may be short
    assert p_start == n_policy
    used = [x for x in items if x[0] == "j"]
    assert len(set(used)) == len(used) == stats["num_judge"]
    assert stats["num_judge"] + stats["num_judge_dropped"] == n_judge
    if cap > 0 and n_policy >= n_judge * gbs:  # room for every judge pair: none dropped
        assert stats["num_judge_dropped"] == 0


def test_bad_sample_stats_conventions():
    # 8 prompts, 4 responses each: 3 bad samples -> 3/8; 5 responses not ended -> 5/32
    assert bad_sample_stats(num_bad=3, num_not_ended=5, num_prompts=8, num_responses_to_gen=4) == {
        "bad_samples_per_GBS": 0.375,
        "bad_ends_per_GBS": 5 / 32,
    }
    assert bad_sample_stats(0, 0, 0, 4) == {"bad_samples_per_GBS": 0.0, "bad_ends_per_GBS": 0.0}
