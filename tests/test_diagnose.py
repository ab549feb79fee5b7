"""The judge's counterfactual pairwise accuracy (harness.diagnose), on hand-built judged rows."""

from __future__ import annotations

import json
import math

from harness import diagnose
from harness.data import world

META = {"family": "animals", "k": 2, "case": "lowercase", "open": ">", "sep": "commas", "end": ".", "offset": 0}
GOLD = "> cat, owl."        # oracle 5
NO_OPEN = "cat, owl."       # oracle 4 (open fails)
OFF = "> dea, bpe."         # oracle 0 (no animal)
ALL_YES = ("kind animals animals yes 1, count 2 2 yes 2, case lowercase lowercase yes 3, open > > yes 4, "
           "format commas . commas . yes 5\nScore: 5")


def row(*responses: tuple[str, str]) -> dict:
    return {"meta": META, "responses": [{"text": r, "judgements": [{"text": j}]} for r, j in responses]}


def test_counterfactuals_by_hand():
    """One prompt, three responses, oracle 5 / 4 / 0: three separated pairs.

    The judge says 5 to all three (it passes the off-topic one and says open yes to the one without an opening):
    every pair a judge tie, 3 x 1/2 -> 0.5. Off-topic call right: 5 / 5 / 0, pairs (5,4) tie, (5,0) and (4,0) right
    -> 2.5 / 3. Open's yes/no right: 5 / 4 / 5, (5,4) right, (5,0) tie, (4,0) wrong -> 1.5 / 3. Both: 5 / 4 / 0 -> 1.
    Kind right alone changes nothing (the off-topic response has no kind verdict to fix: the oracle gives it none).
    """
    assert [world.oracle_score(META, r) for r in (GOLD, NO_OPEN, OFF)] == [5, 4, 0]
    rows = [row((GOLD, ALL_YES), (NO_OPEN, ALL_YES), (OFF, ALL_YES))]
    cf = diagnose.judge_counterfactuals(rows)
    assert cf["pairs"] == 3
    assert math.isclose(cf["as_judged"], 0.5)
    assert math.isclose(cf["offtopic_right"], 2.5 / 3)
    assert math.isclose(cf["open_right"], 1.5 / 3)
    assert math.isclose(cf["kind_right"], 0.5)
    assert math.isclose(cf["upto_open_right"], 1.0) and math.isclose(cf["upto_format_right"], 1.0)


def test_a_wrong_off_topic_call_is_read_as_no_to_every_check():
    """Called off topic wrongly, the on-topic response scores 0 as judged; with the call fixed its checks are read
    as no (it wrote none), unless a check itself is fixed too."""
    rows = [row((GOLD, "kind animals none no 0\nScore: 0"), (OFF, "kind animals none no 0\nScore: 0"))]
    cf = diagnose.judge_counterfactuals(rows)
    assert cf["pairs"] == 1 and math.isclose(cf["as_judged"], 0.5)
    assert math.isclose(cf["offtopic_right"], 0.5)  # 0 vs 0: still a tie
    assert math.isclose(cf["upto_kind_right"], 1.0)  # kind yes (fixed) -> 1 vs 0


def test_main_prints_json(tmp_path, capsys):
    path = tmp_path / "judged.jsonl"
    path.write_text(json.dumps(row((GOLD, ALL_YES), (OFF, ALL_YES))) + "\n", encoding="utf-8")
    assert diagnose.main([str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pairs"] == 1 and out["as_judged"] == 0.5 and out["offtopic_right"] == 1.0
    assert diagnose.main([]) == 2
