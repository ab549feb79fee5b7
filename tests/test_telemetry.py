"""Pair-quality telemetry and label controls, on hand-built judged responses with known oracle scores.

Four prompts (families animals, foods, tools, animals), four responses each with oracle scores o and judge means j
(worked by hand):

    A  o = [5, 3, 1, 1]  j = [4, 4.5, 1, 2]   judge pair 1 > 2: oracle 3 > 1, correct
    B  o = [2, 2, 4, 0]  j = [3, 1, 2, 2.5]   judge pair 0 > 1: oracle 2 = 2, tie
    C  o = [1, 4, 3, 3]  j = [4, 1, 2, 2]     judge pair 0 > 1: oracle 1 < 4, reversed
    D  o = [5, 0, 2, 2]  j = [5, 0, 3, 3]     judge pair 0 > 1: oracle 5 > 0, correct

So correct 2/4, tie 1/4, reversed 1/4. The judge's pairwise accuracy on these samples, over the pairs the oracle
separates (judge tie 1/2): A 4 of 5 (it swaps 5 and 3), B 2 of 5, C 0 of 5, D 5 of 5: 11/20 = 0.55.
Oracle labels pick max/min oracle score on every prompt: correct 4/4.
"""

import math
import random

import pytest

from harness import config
from harness.data import world
from harness.io import read_json, read_jsonl, write_jsonl
from harness.stages import Layout, run_pairs
from harness.telemetry import own_pairwise_acc, pair_quality, sample_quality

ORACLE = [[5, 3, 1, 1], [2, 2, 4, 0], [1, 4, 3, 3], [5, 0, 2, 2]]
JUDGE = [[4, 4.5, 1, 2], [3, 1, 2, 2.5], [4, 1, 2, 2], [5, 0, 3, 3]]
FAMS = ["animals", "foods", "tools", "animals"]


def _judged(tmp_path, judge=JUDGE) -> Layout:
    lay = Layout(tmp_path)
    rng = random.Random(0)
    rows = []
    for i, fam in enumerate(FAMS):
        task = world.make_task(fam, random.Random(i), f"p{i}")
        texts = []
        for s in ORACLE[i]:  # distinct texts, so no pair is refused as identical
            texts.append(next(x for x in (world.degrade(task, s, rng) for _ in range(50)) if x not in texts))
        rows.append({"id": task.id, "prompt": f"<p>{task.prompt}", "question": task.prompt, "meta": task.meta,
                     "responses": [{"text": x, "num_tokens": 5, "is_end": True, "mean": m, "var": 0.0}
                                   for x, m in zip(texts, judge[i])]})
        assert [world.oracle_score(task, x) for x in texts] == ORACLE[i]
    write_jsonl(lay.it(1) / "judged.jsonl", rows)
    write_jsonl(lay.it(1) / "judge_pairs.jsonl", [])
    return lay


def _cfg(*overrides):
    return config.load(None, ["model.spin.first_iteration_sft=true", "trainer.self_rewarding.max_iterations=2",
                         *overrides], warn=None)


def test_pair_telemetry_on_hand_built_pairs(tmp_path):
    lay = _judged(tmp_path)
    m = run_pairs(_cfg(), lay, 1)
    assert m["pairs/policy_pairs"] == 4
    assert (m["pairs/oracle_correct_frac"], m["pairs/oracle_tie_frac"], m["pairs/oracle_reversed_frac"]) == (
        0.5, 0.25, 0.25)
    assert m["pairs/animals/oracle_correct_frac"] == 1.0 and m["pairs/foods/oracle_tie_frac"] == 1.0
    assert m["pairs/tools/oracle_reversed_frac"] == 1.0 and m["pairs/animals/oracle_pairs"] == 2
    assert m["pairs/judge_own_pairwise_acc"] == pytest.approx(0.55) and m["pairs/judge_own_pairs"] == 20
    assert m["pairs/foods/judge_own_pairwise_acc"] == pytest.approx(0.4)
    assert m["pairs/animals/judge_own_pairwise_acc"] == pytest.approx(0.9)  # A 4 of 5, D 5 of 5
    # as written: NaN (a family with no pair here) is null in the JSON file
    assert read_json(lay.it(1) / "pairs_metrics.json") == {k: None if v != v else v for k, v in m.items()}
    pairs = sorted(read_jsonl(lay.it(1) / "pairs.jsonl"), key=lambda p: p["id"])  # batches are shuffled
    assert [(p["chosen_oracle"], p["rejected_oracle"]) for p in pairs] == [(3, 1), (2, 2), (1, 4), (5, 0)]


def test_oracle_labels_are_the_ceiling(tmp_path):
    lay = _judged(tmp_path)
    m = run_pairs(_cfg("model.spin.pair_labels=oracle"), lay, 1)
    assert m["pairs/oracle_correct_frac"] == 1.0 and m["pairs/oracle_reversed_frac"] == 0.0
    pairs = sorted(read_jsonl(lay.it(1) / "pairs.jsonl"), key=lambda p: p["id"])
    assert [(p["chosen_score"], p["rejected_score"]) for p in pairs] == [(5, 1), (4, 0), (4, 1), (5, 0)]
    assert m["pairs/judge_own_pairwise_acc"] == pytest.approx(0.55)  # still the judge's own accuracy


def test_random_labels_ignore_the_judge_and_are_reproducible(tmp_path):
    a = _judged(tmp_path / "a")
    run_pairs(_cfg("model.spin.pair_labels=random"), a, 1)
    flipped = [[5 - x for x in js] for js in JUDGE]
    b = _judged(tmp_path / "b", judge=flipped)
    run_pairs(_cfg("model.spin.pair_labels=random"), b, 1)
    pa, pb = read_jsonl(a.it(1) / "pairs.jsonl"), read_jsonl(b.it(1) / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pa] == [(p["chosen"], p["rejected"]) for p in pb]
    assert len(pa) == 4 and all(p["chosen"] != p["rejected"] for p in pa)
    c = _judged(tmp_path / "c")
    run_pairs(_cfg("model.spin.pair_labels=random", "seed=7"), c, 1)
    assert [p["chosen"] for p in read_jsonl(c.it(1) / "pairs.jsonl")] != [p["chosen"] for p in pa]


def test_label_controls_refused_off_the_task_world():
    for labels in ("oracle", "random"):
        with pytest.raises(config.ConfigError, match="pair_labels=" + labels):
            config.load(None, [f"model.spin.pair_labels={labels}", "model.data.train_ds.file_path=p.jsonl"], warn=None)
        # a user checkpoint on the world's prompts still has the oracle
        config.load(None, [f"model.spin.pair_labels={labels}", "pretrained_checkpoint.restore_from_path=/m"], warn=None)
    config.load(None, ["model.spin.pair_labels=judge", "model.data.train_ds.file_path=p.jsonl"], warn=None)
    with pytest.raises(config.ConfigError, match="model.spin.pair_labels: one of judge, oracle, random"):
        config.load(None, ["model.spin.pair_labels=gold"], warn=None)


def test_cream_rates_ride_on_the_pairs(tmp_path):
    lay = _judged(tmp_path)
    rows = read_jsonl(lay.it(1) / "judged.jsonl")
    for row in rows:  # the previous judge agrees exactly on A, B, D and reverses C
        rev = row["id"] == "p2"
        for r in row["responses"]:
            r["prev"] = {"mean": -r["mean"] if rev else r["mean"]}
    write_jsonl(lay.it(1) / "judged.jsonl", rows)
    m = run_pairs(_cfg("model.spin.cream=dyn"), lay, 1)
    pairs = sorted(read_jsonl(lay.it(1) / "pairs.jsonl"), key=lambda p: p["id"])
    assert [p["consistency"] for p in pairs] == [1.0, 1.0, 0.0, 1.0]
    assert m["cream/consistency_rate"] == 0.75 and m["cream/prompts_ranked"] == 4


def test_pair_quality_and_own_accuracy_edge_cases():
    q = pair_quality([])
    assert math.isnan(q["pairs/oracle_correct_frac"]) and q["pairs/oracle_pairs"] == 0
    q = pair_quality([(3, 1, "a"), (2, 2, "b"), (0, 4, "b")])
    assert q["pairs/b/oracle_tie_frac"] == 0.5 and q["pairs/b/oracle_reversed_frac"] == 0.5
    acc, n = own_pairwise_acc({"x": [(None, 3), (2.0, 1)], "y": [(1.0, 2), (1.0, 0), (1.0, 2)]})
    assert n == 3 and acc == pytest.approx((0 + 0.5 + 0.5) / 3)  # unparsed counts wrong, a judge tie 1/2
    assert math.isnan(own_pairwise_acc({"z": [(1.0, 2), (3.0, 2)]})[0])


def test_sample_quality_counts_every_sample_judged_or_not():
    q = sample_quality({"x": [(None, 5), (2.0, 1)], "y": [(4.0, 0)]}, "eval/")
    assert q == {"eval/sample_oracle_reward": pytest.approx(2.0)}  # (5 + 1 + 0) / 3, the unparsed judgement too
    assert math.isnan(sample_quality({}, "eval/")["eval/sample_oracle_reward"])


def test_checklist_metrics_say_which_judge_step_fails():
    """Four hand-written judgements of responses to one task (2 animals, lowercase, open '>', commas, end '.'):

        response        oracle checks (kind count case open format)   judgement
        "> cat, owl."   all yes (5)                                   reads, sees and says every value right: 5
        "cat, owl"      yes yes yes no no (3)                         reads open as '#' (echo wrong), sees its
                                                                      opening as '#' (look wrong), says open yes
                                                                      (wrong); sees format as "commas ." (look
                                                                      wrong) and says format yes (wrong): 3
        "hello"         off topic (0)                                 "kind animals none no 0" (off topic, right)
        "> CAT, owl."   yes yes no yes yes (4)                        "kind animals none no 0" (off topic, wrong)

    offtopic: 3 of 4 right. Echo: open 1 of 2 (the two checklists), the others 2 of 2. Look: open and format 1 of 2,
    the others 2 of 2. Check: open and format 1 of 2, the others 2 of 2; off-topic calls give no step.
    """
    from harness.telemetry import checklist_metrics

    meta = {"family": "animals", "k": 2, "case": "lowercase", "open": ">", "sep": "commas", "end": ".", "offset": 0}
    items = [
        (meta, "> cat, owl.", "kind animals animals yes 1, count 2 2 yes 2, case lowercase lowercase yes 3, "
                              "open > > yes 4, format commas . commas . yes 5\nScore: 5"),
        (meta, "cat, owl", "kind animals animals yes 1, count 2 2 yes 2, case lowercase lowercase yes 3, "
                           "open # # yes 4, format commas . commas . yes 5\nScore: 5"),
        (meta, "hello", "kind animals none no 0\nScore: 0"),
        (meta, "> CAT, owl.", "kind animals none no 0\nScore: 0"),
    ]
    assert [world.oracle_score(meta, r) for _, r, _ in items] == [5, 3, 0, 4]
    m = checklist_metrics(items, "eval/")
    assert m["eval/judge_own_offtopic_acc"] == pytest.approx(3 / 4)
    assert m["eval/judge_own_echo_acc/open"] == pytest.approx(1 / 2)
    for c in ("open", "format"):
        assert m[f"eval/judge_own_look_acc/{c}"] == pytest.approx(1 / 2)
        assert m[f"eval/judge_own_check_acc/{c}"] == pytest.approx(1 / 2)
    for c in ("kind", "count", "case"):
        assert m[f"eval/judge_own_echo_acc/{c}"] == m[f"eval/judge_own_look_acc/{c}"] == 1.0
        assert m[f"eval/judge_own_check_acc/{c}"] == 1.0
    assert m["eval/judge_own_echo_acc/format"] == 1.0
    # the oracle's own judgement is right at every step; text in no checklist format gives no step at all
    assert world.read_checklist(meta, world.judgement(meta, "cat, owl"), "cat, owl") == {
        "kind": (True, True, True), "count": (True, True, True), "case": (True, True, True),
        "open": (False, True, True), "format": (False, True, True)}
    empty = checklist_metrics([(meta, "> cat, owl.", "Score: 5")], "eval/")
    assert empty["eval/judge_own_offtopic_acc"] == 1.0
    assert all(math.isnan(v) for k, v in empty.items() if k != "eval/judge_own_offtopic_acc")
