"""Average the k judge samples of one response (model.spin.num_evals_to_average) into its reward.

    aggregate(["... Score: 4", "... Score: 2", "no verdict"], 0, 5)   # mean 3.0, var 1.0, 2 valid, 1 failed

Only parseable in-range scores count (as in the paper and NeMo-Aligner): a judgement without one is a parse
failure, kept in `judgements` with score None so the meta-judge and the logs still see it.
"""

from __future__ import annotations

from harness.judging.parse import DEFAULT_SCORE_REGEX, parse_score


def mean_and_variance(scores: list[float]) -> tuple[float, float]:
    """Mean and population variance (divide by len(scores)) of a non-empty list. Plain left-to-right sums: the same
    floats on every machine, so pairs, meta-judge selection and Elo inputs are bit-identical."""
    mean = sum(scores) / len(scores)
    return mean, sum((s - mean) ** 2 for s in scores) / len(scores)


def aggregate(judgements: list[str | dict], low: float, high: float, regex: str = DEFAULT_SCORE_REGEX) -> dict:
    """{"judgements": [{"text", "score", "is_end"}], "mean", "var", "num_valid", "num_failed"}.

    judgements: the k judge outputs, each a text or a generation {"text", "is_end"}; is_end (the judgement ended
    with EOS or an end string) is kept, as the meta-judge may only use ended judgements. A plain text counts as ended.
    mean: mean of the valid scores, None when there is none. var: population variance of the valid scores
    (divide by the number of valid scores), None when there is none, 0.0 with exactly one.
    """
    outs = [{"text": j, "is_end": True} if isinstance(j, str) else j for j in judgements]
    judged = [{"text": o["text"], "score": parse_score(o["text"], low, high, regex), "is_end": bool(o["is_end"])}
              for o in outs]
    scores = [j["score"] for j in judged if j["score"] is not None]
    mean = var = None
    if scores:
        mean, var = mean_and_variance(scores)
    return {
        "judgements": judged,
        "mean": mean,
        "var": var,
        "num_valid": len(scores),
        "num_failed": len(judged) - len(scores),
    }
