"""Meta-Rewarding (arXiv 2407.19594): turn the judge's own judgements into judge-training pairs.

    i = select_response_for_meta(responses)                 # the response whose k judgements disagree most
    pairs = judgement_pairs(responses[i]["judgements"], spin.judge_reward_regex)   # distinct valid ended judgements
    battles = {(a, b): battle_outcome(parse_winner(ab), parse_winner(ba)) for ...}   # meta-judge, both orders
    elos = elo_scores(k, {p: o for p, o in battles.items() if o is not None})
    pick = select_judge_pair(judgements, elos, spin.judge_reward_regex)   # (chosen, rejected) indices, or None
    if pick and quota.accept(judgements[pick[0]]["score"]): keep the pair

NeMo-Aligner's self-rewarding branch semantics, with its known defects fixed: battles are keyed by the judgement
pair (i, j), never by their position in a list, so a dropped battle cannot shift the others; the score quota has
state that a resumed run restores.
"""

from __future__ import annotations

import math

import numpy as np

from harness.judging.aggregate import mean_and_variance
from harness.judging.parse import strip_score

ELO_SCALE, ELO_INIT = 400.0, 1000.0
ELO_TOL = 1e-3  # Elo points: closer than this counts as equal (the fit is numeric; a 3-cycle is a tie, not 1e-9 apart)
# Inverse L2 strength of the Bradley-Terry fit. Without a penalty (NeMo) the MLE does not exist when one judgement
# wins every battle it is in (perfectly separable, e.g. any transitive set), and the coefficients run off to infinity
# (or to wherever the optimiser stops). C = 100 is a weak Gaussian prior: for a single decisive battle the gap is
# ~4.5 (1800 Elo points), and on non-separable data it moves the estimates by ~1% of the likelihood's pull.
ELO_C = 100.0


def _valid_scores(judgements: list[dict]) -> list[float]:
    return [j["score"] for j in judgements if j.get("score") is not None]


def select_response_for_meta(responses: list[dict]) -> int | None:
    """Index of the ended response whose valid judgement scores have the largest population variance.

    Needs more than one valid judgement and a variance > 0 (judgements that all agree teach the judge nothing).
    Responses that did not end (is_end False) are skipped: a truncated response is not a fair thing to judge.
    Ties go to the first; None when no response qualifies.
    """
    best, best_var = None, 0.0
    for idx, resp in enumerate(responses):
        scores = _valid_scores(resp["judgements"])
        if not resp.get("is_end", False) or len(scores) < 2:
            continue
        _, var = mean_and_variance(scores)
        if var > best_var:  # strict: ties keep the first
            best, best_var = idx, var
    return best


def judgement_pairs(judgements: list[dict], regex: str) -> list[tuple[int, int]]:
    """All (i, j), i < j, of ended judgements with a valid score whose texts differ once the scores are stripped.

    A judgement that did not end (is_end false: cut at max_length) never enters a battle, so it can be neither the
    chosen nor the rejected judgement (NeMo-Aligner drops pairs with bad ends)."""
    texts = [strip_score(j["text"], regex) for j in judgements]
    valid = [j.get("score") is not None and j.get("is_end", True) for j in judgements]
    n = len(judgements)
    return [(i, j) for i in range(n) for j in range(i + 1, n) if valid[i] and valid[j] and texts[i] != texts[j]]


def battle_outcome(winner_ab: str | None, winner_ba: str | None) -> float | None:
    """Outcome for judgement i of the pair (i, j), asked as (A=i, B=j) then as (A=j, B=i).

    | AB  | BA  | result                                             |
    | A   | B   | 1.0  i wins in both orders                         |
    | B   | A   | 0.0  j wins in both orders                         |
    | A   | A   | 0.5  the verdict follows the position: a tie       |
    | B   | B   | 0.5  idem                                          |
    | None in either | None: the battle is dropped (an unparseable verdict is no evidence either way) |
    """
    if winner_ab not in ("A", "B") or winner_ba not in ("A", "B"):
        return None
    if winner_ab == "A" and winner_ba == "B":
        return 1.0
    if winner_ab == "B" and winner_ba == "A":
        return 0.0
    return 0.5


def elo_scores(n: int, battles: dict[tuple[int, int], float]) -> list[float]:
    """Bradley-Terry Elo of n judgements from battles {(i, j): outcome for i in [0, 1]}.

    Logistic regression without intercept on rows x = e_i - e_j (target 1: i won), a tie counted as half a win
    each way through sample weights; Elo = 400 * coef + 1000 (NeMo-Aligner's scale: 400 points = odds x e).
    Each row is also entered mirrored (x -> -x, y -> 1 - y): the likelihood is the same, and both classes are
    always present. A weak L2 prior (ELO_C) keeps separable data finite. No battles, or only ties: all 1000.
    Judgements in no battle stay at 1000. Deterministic: rows are built in sorted pair order.
    """
    rows, ys, weights = [], [], []
    for (i, j), outcome in sorted(battles.items()):
        if outcome is None or not math.isfinite(outcome):
            continue
        if not (0 <= i < n and 0 <= j < n and i != j and 0.0 <= outcome <= 1.0):
            raise ValueError(f"elo_scores: bad battle {(i, j)}: {outcome} for n={n}")
        x = np.zeros(n)
        x[i], x[j] = 1.0, -1.0
        for sign, y, w in ((1.0, 1, outcome), (1.0, 0, 1.0 - outcome), (-1.0, 0, outcome), (-1.0, 1, 1.0 - outcome)):
            if w > 0:
                rows.append(sign * x)
                ys.append(y)
                weights.append(w)
    if not rows or all(battles[p] == 0.5 for p in battles if battles[p] is not None):
        return [ELO_INIT] * n
    from sklearn.linear_model import LogisticRegression  # imported here: 3 s that config loading must not pay

    model = LogisticRegression(C=ELO_C, fit_intercept=False, tol=1e-10, max_iter=1000)
    model.fit(np.array(rows), np.array(ys), sample_weight=np.array(weights))
    return [round(ELO_INIT + ELO_SCALE * float(c), 6) for c in model.coef_[0]]


def select_judge_pair(
    judgements: list[dict], elos: list[float], regex: str
) -> tuple[int, int] | None:
    """(chosen, rejected) = (unique argmax Elo, unique argmin Elo), or None for a bad sample.

    Bad (NeMo's rule): argmax or argmin not unique (within ELO_TOL), the two texts identical (scores stripped),
    a score missing, or the two scores equal (the pair would not teach the judge a different score).
    """
    if not elos or len(elos) != len(judgements):
        return None
    hi, lo = max(elos), min(elos)
    top = [i for i, e in enumerate(elos) if e >= hi - ELO_TOL]
    bottom = [i for i, e in enumerate(elos) if e <= lo + ELO_TOL]
    if len(top) != 1 or len(bottom) != 1 or top[0] == bottom[0]:
        return None
    chosen, rejected = judgements[top[0]], judgements[bottom[0]]
    if chosen.get("score") is None or rejected.get("score") is None or chosen["score"] == rejected["score"]:
        return None
    if strip_score(chosen["text"], regex) == strip_score(rejected["text"], regex):
        return None
    return top[0], bottom[0]


def quota_cap(num_samples: int, low: float, high: float) -> int:
    """The per-class cap of ScoreQuota: NeMo-Aligner's int(samples per epoch / (high - low) ** 2), at least 2.

    NeMo compares it with counts that start at 1, so a class takes cap - 1 judge pairs: 1 at 64 prompts on a 0-5
    scale, 3 at 100. Below 50 prompts NeMo's int() gives 0 or 1, i.e. no judge pair at all; the floor of 2 keeps one
    pair per class there, and changes nothing from 50 prompts up.
    """
    return max(2, int(num_samples / (high - low) ** 2))


def _key(score: float) -> str:
    return f"{float(score):g}"  # "4", "4.5": JSON-safe and the same for 4 and 4.0


class ScoreQuota:
    """Caps how often one score class can be the chosen judgement's score, so the judge does not collapse to one
    score (NeMo observed "always 5" without it).

    counts start at 1 for every integer class in [low, high] (as NeMo); a class first seen later (4.5) starts at 1.
    accept(s) is True, and counts the pair, when counts[s] / sum(counts) < max_relative_pcnt and counts[s] < cap.
    """

    def __init__(self, low: float, high: float, max_relative_pcnt: float, cap: float):
        self.max_relative_pcnt = float(max_relative_pcnt)
        self.cap = float(cap)
        self.counts: dict[str, int] = {_key(s): 1 for s in range(math.ceil(low), math.floor(high) + 1)}

    def accept(self, chosen_score: float) -> bool:
        key = _key(chosen_score)
        count = self.counts.get(key, 1)
        total = sum(self.counts.values()) + (0 if key in self.counts else 1)
        if count / total < self.max_relative_pcnt and count < self.cap:
            self.counts[key] = count + 1
            return True
        return False
