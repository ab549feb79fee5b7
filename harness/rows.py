"""The row formats of the jsonl files stages hand each other, checked when a stage reads them.

    read_jsonl(lay.it(t) / "responses.jsonl", RESPONSES, nonempty=True)

A hand-edited or foreign file then fails at once with its file, line and key (`responses.jsonl:3: responses[0].is_end:
missing`), not with a KeyError after minutes of generation. Only the keys a later stage reads are listed; rows may
carry more. Schema notation: harness.io.check_row.
"""

from __future__ import annotations

_RESPONSE = {"text": str, "num_tokens": int, "is_end": bool}
RESPONSES = {"id": str, "prompt": str, "question": str, "responses": [_RESPONSE]}  # generate -> judge
_SCORED = {**_RESPONSE, "mean": (float, None), "var": (float, None)}
JUDGED = {"id": str, "prompt": str, "responses": [_SCORED]}  # judge -> pairs
JUDGED_WORLD = {**JUDGED, "meta": {"family": str}}  # on the task world, pairs has the oracle score each response
META_JUDGED = {"id": str, "question": str,  # judge -> meta_judge
               "responses": [{**_SCORED, "judgements": [{"text": str, "score": (float, None)}]}]}
PAIR = {"kind": str, "prompt": str, "chosen": str, "rejected": str, "chosen_score": float, "rejected_score": float}
JUDGE_PAIRS = {"id": str, **PAIR}  # meta_judge -> pairs
PAIRS = PAIR  # pairs -> train
EVAL_ANSWERS = {"oracle_score": float}  # evaluate (M1's, the SFT baseline's) -> later evaluates
JUDGE_EVAL = {"id": str, "task_id": str, "prompt": str, "response": str, "oracle_score": float}
