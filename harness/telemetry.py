"""Pair quality and judge accuracy on the policy's own samples, scored by the task world's oracle.

    stats = pair_quality([(chosen_oracle, rejected_oracle, family), ...])   # pairs/oracle_correct_frac, ...
    acc = own_pairwise_acc({prompt_id: [(judge_score, oracle_score), ...]})  # judge on its own samples

Self-rewarding can only improve the policy when the pairs it trains on are right more often than wrong. These numbers
say, per iteration, whether they were: the share of self-labelled pairs whose chosen response the oracle really
prefers (correct), rates equal (tie) or rates lower (reversed), and the judge's pairwise accuracy on the responses the
policy itself sampled (not on the world's designed responses, where a judge can look better than it is).
"""

from __future__ import annotations

import math
from collections import defaultdict


def _fracs(items: list[tuple[float, float]], prefix: str) -> dict[str, float]:
    n = len(items)
    if not n:
        return {f"{prefix}oracle_correct_frac": math.nan, f"{prefix}oracle_tie_frac": math.nan,
                f"{prefix}oracle_reversed_frac": math.nan, f"{prefix}oracle_pairs": 0}
    return {
        f"{prefix}oracle_correct_frac": sum(c > r for c, r in items) / n,
        f"{prefix}oracle_tie_frac": sum(c == r for c, r in items) / n,
        f"{prefix}oracle_reversed_frac": sum(c < r for c, r in items) / n,
        f"{prefix}oracle_pairs": n,
    }


def pair_quality(pairs: list[tuple[float, float, str]]) -> dict[str, float]:
    """pairs: (oracle score of chosen, of rejected, family). Fractions overall and per family
    (pairs/<family>/oracle_correct_frac ...); they sum to 1 wherever there is a pair."""
    out = _fracs([(c, r) for c, r, _ in pairs], "pairs/")
    by_family = defaultdict(list)
    for c, r, fam in pairs:
        by_family[fam].append((c, r))
    for fam in sorted(by_family):
        out.update(_fracs(by_family[fam], f"pairs/{fam}/"))
    return out


def own_pairwise_acc(groups: dict[str, list[tuple[float | None, float]]]) -> tuple[float, int]:
    """(accuracy, number of pairs): over every two responses to one prompt that the oracle separates, 1 when the
    judge orders them as the oracle does, 1/2 when it scores them equal, 0 when reversed or unparsed. NaN, 0 when
    the oracle separates no pair."""
    pairs, correct = 0, 0.0
    for items in groups.values():
        for a in range(len(items)):
            for b in range(a + 1, len(items)):
                (sa, oa), (sb, ob) = items[a], items[b]
                if oa == ob:
                    continue
                pairs += 1
                if sa is not None and sb is not None:
                    correct += 0.5 if sa == sb else float((sa > sb) == (oa > ob))
    return (correct / pairs if pairs else math.nan), pairs


def sample_quality(groups: dict[str, list[tuple[float | None, float]]], prefix: str) -> dict[str, float]:
    """<prefix>sample_oracle_reward: the oracle's mean score of every sampled response, judged or not. DPO learns from
    the sampling distribution, whose quality can lie far below the greedy answer's (eval/oracle_reward)."""
    scores = [oracle for items in groups.values() for _, oracle in items]
    return {f"{prefix}sample_oracle_reward": sum(scores) / len(scores) if scores else math.nan}


def own_judge_metrics(groups: dict[str, list[tuple[float | None, float]]], families: dict[str, str],
                      prefix: str) -> dict[str, float]:
    """<prefix>judge_own_pairwise_acc overall and per family (<prefix><family>/judge_own_pairwise_acc), plus the
    number of pairs the oracle separates; groups and families are keyed by prompt id."""
    acc, n = own_pairwise_acc(groups)
    out = {f"{prefix}judge_own_pairwise_acc": acc, f"{prefix}judge_own_pairs": n}
    from harness.data.world import FAMILIES

    for fam in FAMILIES:  # every family, so runs compare key by key
        acc, n = own_pairwise_acc({k: g for k, g in groups.items() if families[k] == fam})
        out[f"{prefix}{fam}/judge_own_pairwise_acc"] = acc
    return out


STEPS = ("echo", "look", "check")  # a judgement's steps per check: read the prompt, look at the response, compare


def checklist_metrics(items: list[tuple[dict, str, str]], prefix: str) -> dict[str, float]:
    """Where the judge goes wrong, step by step, on (task meta, response, judgement text) items, against the oracle:

    <prefix>judge_own_offtopic_acc      it calls a response off topic exactly when the oracle does
    <prefix>judge_own_echo_acc/<check>  the asked value it writes is the prompt's
    <prefix>judge_own_look_acc/<check>  the value it says the response has is the response's (on-topic responses)
    <prefix>judge_own_check_acc/<check> its yes/no is the oracle's (on-topic responses)

    A pairwise accuracy near 1/2 says the judge fails; these say whether it fails to read the prompt (echo), to see
    the response (look) or to compare the two (check). NaN where no judgement holds the step.
    """
    from harness.data.world import CHECKS, grade, read_checklist

    def mean(xs: list[bool]) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    gate, steps = [], {step: defaultdict(list) for step in STEPS}
    for meta, response, text in items:
        truth = grade(meta, response).checks
        said = read_checklist(meta, text, response)
        gate.append((said is None) == (truth == ()))
        if said is None:
            continue
        for c, ok in zip(CHECKS, truth or (None,) * len(CHECKS)):
            verdict, echoed, looked = said[c]
            checked = None if ok is None or verdict is None else verdict == ok
            for step, value in zip(STEPS, (echoed, looked, checked)):
                if value is not None:
                    steps[step][c].append(value)
    values = [mean(gate), *(mean(steps[step][c]) for step in steps for c in CHECKS)]
    return dict(zip(checklist_keys(prefix), values))


def checklist_keys(prefix: str) -> list[str]:
    """The keys checklist_metrics writes, in order."""
    from harness.data.world import CHECKS

    return [f"{prefix}judge_own_offtopic_acc",
            *(f"{prefix}judge_own_{step}_acc/{c}" for step in STEPS for c in CHECKS)]
