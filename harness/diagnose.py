"""Which of the judge's errors cost the most: its pairwise accuracy on an iteration's own samples if one step of its
checklist were right, on the task world.

    python -m harness.diagnose runs/iter1/judged.jsonl       # prints one JSON object

telemetry.checklist_metrics says how often each step is wrong; this says what each costs. For every judgement the
verdict of one step is replaced by the oracle's (the off-topic call, or one check's yes/no), its score recounted
as the number of checks it says yes to, and the pairwise accuracy computed as pairs/judge_own_pairwise_acc is (a
response's score: the mean over its judgements; pairs of one prompt's responses the oracle separates; a tie in the
judge's scores counts 1/2). The steps are fixed one at a time and cumulatively, in the order given. "as_judged"
counts yeses too, so it is close to pairs/judge_own_pairwise_acc, which reads the Score line the judge wrote (a
miscounted total, a cut judgement), not equal to it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = ("offtopic", "kind", "count", "case", "open", "format")  # the off-topic call, then the five checks


def _score(meta: dict, response: str, text: str, fixed: set[str]) -> float:
    """The score a checklist judgement gives, with the steps in `fixed` set to the oracle's verdict."""
    from harness.data.world import CHECKS, grade, read_checklist

    truth = grade(meta, response).checks  # () when off topic
    said = read_checklist(meta, text, response)
    if "offtopic" in fixed:
        if truth == ():
            return 0.0
        said = said or {c: (None, None, None) for c in CHECKS}  # called off topic wrongly: read its checks as no
    elif said is None:
        return 0.0
    if truth == ():  # off topic, called on topic: the checks it says yes to count, right or wrong
        return float(sum(bool(said[c][0]) for c in CHECKS))
    return float(sum(ok if c in fixed else bool(said[c][0]) for c, ok in zip(CHECKS, truth)))


def pairwise_acc(rows: list[dict], fixed: set[str]) -> tuple[float, int]:
    """(pairwise accuracy, number of pairs) over judged rows ({"meta", "responses": [{"text", "judgements"}]}), by
    telemetry.own_pairwise_acc (the pipeline's own measure) on the recounted scores."""
    from harness.data.world import grade
    from harness.telemetry import own_pairwise_acc

    groups = {}
    for i, row in enumerate(rows):
        groups[i] = []
        for r in row["responses"]:
            js = [_score(row["meta"], r["text"], j["text"], fixed) for j in r["judgements"]]
            if js:
                groups[i].append((sum(js) / len(js), grade(row["meta"], r["text"]).score))
    return own_pairwise_acc(groups)


def judge_counterfactuals(rows: list[dict]) -> dict[str, float]:
    """{"as_judged", "pairs", "<step>_right" for each step, "upto_<step>_right" (that step and all before it)}."""
    acc, pairs = pairwise_acc(rows, set())
    out = {"as_judged": acc, "pairs": pairs}
    for i, step in enumerate(STEPS):
        out[f"{step}_right"] = pairwise_acc(rows, {step})[0]
        out[f"upto_{step}_right"] = pairwise_acc(rows, set(STEPS[: i + 1]))[0]
    return out


def main(argv: list[str] | None = None) -> int:
    from harness.io import read_jsonl

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m harness.diagnose <judged.jsonl>", file=sys.stderr)
        return 2
    rows = read_jsonl(Path(args[0]))
    print(json.dumps({k: round(v, 4) for k, v in judge_counterfactuals(rows).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
