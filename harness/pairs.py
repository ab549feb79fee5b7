"""Preference pairs from judged responses: chosen/rejected, length control, bad samples, judge-pair mixing.

    pick = select_pair(responses, rho=config.schedule(spin.length_control, t))
    items, stats = mix_judge_pairs(policy_pairs, judge_pairs, gbs, spin.meta_judge_pcnt, random.Random(seed))
"""

from __future__ import annotations

import math
import random

_EPS = 1e-9  # float slack on the length-control score windows, so a mean exactly on a bound is inside


def _bad(reason: str) -> dict:
    return {"chosen": None, "rejected": None, "bad": True, "reason": reason}


def select_pair(responses: list[dict], rho: float = 0.0) -> dict:
    """Chosen/rejected response indices for one prompt.

    responses: [{"text", "num_tokens", "is_end", "mean", "var"}]; only ended responses with a mean count.
    rho = 0: chosen = highest mean, rejected = lowest mean; among equal means the lowest variance (the judge agreed
    with itself most), then the first.
    rho > 0 (length control, Meta-Rewarding paper section 2.1): with Smax/Smin over the counted responses,
    chosen = the shortest response with mean in [(1-rho)*Smax + rho*Smin, Smax], rejected = the longest with mean
    in [Smin, (1-rho)*Smin + rho*Smax]; equal lengths: higher mean for chosen / lower for rejected, then the first.
    Bad sample (reason given): at most one response counts, all counted means are equal, chosen and rejected texts
    are identical, or (only possible with rho >= 0.5) length control picked a chosen whose mean is not above the
    rejected one's (training that pair would contradict the judge).
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"select_pair: rho (length_control) must be in [0, 1], got {rho}")
    counted = [i for i, r in enumerate(responses) if r.get("is_end") and r.get("mean") is not None]
    if len(counted) <= 1:
        return _bad("fewer than two ended responses with a valid score")
    means = {i: float(responses[i]["mean"]) for i in counted}
    smax, smin = max(means.values()), min(means.values())
    if smax == smin:
        return _bad("all scores equal")

    def var(i: int) -> float:
        v = responses[i].get("var")
        return math.inf if v is None else float(v)

    if rho == 0.0:
        # min() keeps the first of equal keys, so the index is the last tie-break.
        chosen = min(counted, key=lambda i: (-means[i], var(i)))
        rejected = min(counted, key=lambda i: (means[i], var(i)))
    else:
        upper = (1 - rho) * smax + rho * smin
        lower = (1 - rho) * smin + rho * smax
        chosen = min((i for i in counted if means[i] >= upper - _EPS),
                     key=lambda i: (responses[i]["num_tokens"], -means[i]))
        rejected = min((i for i in counted if means[i] <= lower + _EPS),
                       key=lambda i: (-responses[i]["num_tokens"], means[i]))
        if means[chosen] <= means[rejected]:
            return _bad("length control left no score gap between chosen and rejected")
    if responses[chosen]["text"] == responses[rejected]["text"]:
        return _bad("chosen and rejected texts identical")
    return {"chosen": chosen, "rejected": rejected, "bad": False, "reason": None}


def relabel(responses: list[dict], labels: str, rng: random.Random) -> list[dict]:
    """The responses with the scores that pick the pair: the judge's mean as it is (labels="judge"), the oracle's
    score (labels="oracle", each response needs "oracle"), or a uniform draw from rng (labels="random"), which makes
    chosen/rejected two responses in random order. Copies; the judge's own mean stays in "judge_mean"."""
    if labels == "judge":
        return responses
    if labels not in ("oracle", "random"):
        raise ValueError(f"relabel: labels must be judge, oracle or random, got {labels!r}")
    draws = [rng.random() for _ in responses]  # drawn for every response, so a label never depends on is_end
    return [{**r, "judge_mean": r.get("mean"), "var": 0.0,
             "mean": float(r["oracle"]) if labels == "oracle" else d} for r, d in zip(responses, draws)]


def judge_cap(global_batch_size: int, meta_judge_pcnt: float) -> int:
    """Most judge pairs one global batch may hold: floor(meta_judge_pcnt * global_batch_size)."""
    return math.floor(meta_judge_pcnt * global_batch_size + _EPS)  # 0.15 * 20 is 2.9999999999999996 in floats


def mix_judge_pairs(
    policy_pairs: list, judge_pairs: list, global_batch_size: int, meta_judge_pcnt: float, rng: random.Random
) -> tuple[list, dict]:
    """The training list of one iteration: policy pairs with judge pairs mixed in, global batch by global batch.

    Every global batch holds at most judge_cap(gbs, pcnt) judge pairs and is filled up with policy pairs, so
    meta_judge_pcnt is a real upper bound (NeMo-Aligner replaced bad samples with judge pairs first, which could
    exceed it). Judge pairs are shuffled with rng first (which ones are dropped is not biased by prompt order),
    then used up to the cap in each batch while policy pairs last; policy pairs fill the batches in their given
    order; each batch is then shuffled with rng so judge pairs land at random micro-batch positions.
    Leftovers: all policy pairs are used; the last batch may be short (the trainer decides whether to drop it), and
    it holds only as many judge pairs j as keep j <= floor(pcnt * batch size) too. Judge pairs beyond that are
    dropped and counted in stats["num_judge_dropped"]. No policy pairs: no batches.
    Returns (items, stats) with stats: num_batches, num_policy, num_judge, num_judge_dropped, judge_cap,
    judge_per_batch (list), batch_sizes (list).
    """
    if global_batch_size < 1:
        raise ValueError(f"mix_judge_pairs: global_batch_size must be >= 1, got {global_batch_size}")
    if not 0.0 <= meta_judge_pcnt <= 1.0:
        raise ValueError(f"mix_judge_pairs: meta_judge_pcnt must be in [0, 1], got {meta_judge_pcnt}")
    cap = judge_cap(global_batch_size, meta_judge_pcnt)
    judges = list(judge_pairs)
    rng.shuffle(judges)
    items, judge_per_batch, batch_sizes = [], [], []
    p = jdx = 0
    while p < len(policy_pairs):
        j = min(cap, len(judges) - jdx)
        n_policy = min(global_batch_size - j, len(policy_pairs) - p)
        if n_policy + j < global_batch_size:  # final short batch: keep the share bound as well as the count bound
            while j > 0 and j > judge_cap(n_policy + j, meta_judge_pcnt):
                j -= 1
        batch = list(policy_pairs[p : p + n_policy]) + judges[jdx : jdx + j]
        rng.shuffle(batch)
        items += batch
        p += n_policy
        jdx += j
        judge_per_batch.append(j)
        batch_sizes.append(len(batch))
    stats = {
        "num_batches": len(batch_sizes),
        "num_policy": len(policy_pairs),
        "num_judge": jdx,
        "num_judge_dropped": len(judges) - jdx,
        "judge_cap": cap,
        "judge_per_batch": judge_per_batch,
        "batch_sizes": batch_sizes,
    }
    return items, stats


def bad_sample_stats(num_bad: int, num_not_ended: int, num_prompts: int, num_responses_to_gen: int) -> dict:
    """The tutorial's per-global-batch metrics, as fractions.

    bad_samples_per_GBS = bad samples / prompts in the global batch (a prompt gives at most one pair);
    bad_ends_per_GBS = responses with is_end False / (prompts * num_responses_to_gen).
    """
    responses = num_prompts * num_responses_to_gen
    return {
        "bad_samples_per_GBS": num_bad / num_prompts if num_prompts else 0.0,
        "bad_ends_per_GBS": num_not_ended / responses if responses else 0.0,
    }
