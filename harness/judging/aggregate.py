"""Average the k judge samples of one response (model.spin.num_evals_to_average) into its reward.

    aggregate(["... Score: 4", "... Score: 2", "no verdict"], 0, 5)   # mean 3.0, var 1.0, 2 valid, 1 failed

Only parseable in-range scores count (as in the paper and NeMo-Aligner): a judgement without one is a parse
failure, kept in `judgements` with score None so the meta-judge and the logs still see it.
"""

from __future__ import annotations

from harness.judging.parse import DEFAULT_SCORE_REGEX, parse_score


def aggregate(judgement_texts: list[str], low: float, high: float, regex: str = DEFAULT_SCORE_REGEX) -> dict:
    """{"judgements": [{"text", "score"}], "mean", "var", "num_valid", "num_failed"}.

    mean: mean of the valid scores, None when there is none. var: population variance of the valid scores
    (divide by the number of valid scores), None when there is none, 0.0 with exactly one.
    """
    judgements = [{"text": t, "score": parse_score(t, low, high, regex)} for t in judgement_texts]
    scores = [j["score"] for j in judgements if j["score"] is not None]
    mean = var = None
    if scores:
        # Plain left-to-right sums: the same floats on every machine, so pairs and Elo inputs are bit-identical.
        mean = sum(scores) / len(scores)
        var = sum((s - mean) ** 2 for s in scores) / len(scores)
    return {
        "judgements": judgements,
        "mean": mean,
        "var": var,
        "num_valid": len(scores),
        "num_failed": len(judgements) - len(scores),
    }
