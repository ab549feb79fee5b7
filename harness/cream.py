"""CREAM's consistency rate (Wang et al., arXiv 2410.12735): how far the previous iteration's judge agrees with the
current one on the ranking of an iteration's responses.

    rates, stats = consistency(rows, mode="avg")   # one rate per prompt row, to weigh its pair's loss

For each prompt, the responses are ranked by the current model's judge scores (M_t) and by the previous model's
(M_{t-1}); Kendall's tau between the two rankings, scaled to [0, 1] as (tau + 1) / 2, is the prompt's consistency
rate. `avg` gives every pair the mean rate of the iteration (the paper's set-level rate), `dyn` gives each pair its
own prompt's rate (prompts without one get the mean). The training loss is then the soft-label DPO loss
C * L(chosen, rejected) + (1 - C) * L(rejected, chosen) (harness.losses.consistency_regularized_loss).

Ties: judge scores on a 0-5 scale tie often. The reference code breaks ties by response index (ordinal ranks)
before taking tau, which turns a tie into an arbitrary order; here tau-b on the scores themselves counts a tie as
neither agreement nor disagreement. A prompt whose scores are constant under either judge, or with fewer than two
responses both judges scored, has no rate. When no prompt has one (e.g. the previous model is an untrained M0 whose
judgements never parse), every rate is 1: plain DPO, reported as cream/prompts_ranked = 0.
"""

from __future__ import annotations

import math


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two equally long score lists; None when undefined (fewer than 2 items, or a constant list).

    tau_b = (P - Q) / sqrt((P + Q + Tx) (P + Q + Ty)), P/Q concordant/discordant pairs, Tx/Ty pairs tied only in
    x / only in y (pairs tied in both count nowhere)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: lists of different lengths ({len(x)} and {len(y)})")
    p = q = tx = ty = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                p += 1
            else:
                q += 1
    denom = math.sqrt((p + q + tx) * (p + q + ty))
    return (p - q) / denom if denom else None


def prompt_rate(now: list[float | None], prev: list[float | None]) -> float | None:
    """(tau_b + 1) / 2 over the responses both judges scored; None when tau is undefined."""
    both = [(a, b) for a, b in zip(now, prev) if a is not None and b is not None]
    tau = kendall_tau_b([a for a, _ in both], [b for _, b in both]) if len(both) >= 2 else None
    return None if tau is None else (tau + 1) / 2


def consistency(rows: list[dict], mode: str) -> tuple[list[float], dict]:
    """Per row (prompt) of judged.jsonl with each response's "prev" judgement: the consistency rate its pair trains
    with, and stats (cream/consistency_rate: the mean rate; cream/prompts_ranked: prompts with a rate).

    Only ended responses count, as in pair selection."""
    if mode not in ("avg", "dyn"):
        raise ValueError(f"consistency: mode must be avg or dyn, got {mode!r}")
    per = []
    for row in rows:
        rs = [r for r in row["responses"] if r.get("is_end")]
        per.append(prompt_rate([r.get("mean") for r in rs], [(r.get("prev") or {}).get("mean") for r in rs]))
    defined = [c for c in per if c is not None]
    mean = sum(defined) / len(defined) if defined else 1.0
    rates = [mean if mode == "avg" or c is None else c for c in per]
    return rates, {"cream/consistency_rate": mean if defined else math.nan, "cream/prompts_ranked": len(defined)}
