"""The meta-judge stage on a small task world: judge pairs are produced at a small prompt count and mixed into the
iteration's training pairs.

The model's own verdicts are replaced by an oracle meta-judge (it prefers the judgement with the higher hidden
quality mark), so the test exercises the stage itself: response selection, both-order battles, Elo, the quota and
the mixing, on a real world, a real checkpoint and the real prompt templates.
"""

from __future__ import annotations

import re

import pytest

from harness import config, judge_stages, stages
from harness.data import sft
from harness.generation import sampler
from harness.io import read_json, read_jsonl, write_jsonl
from harness.models.base import load_policy
from tests.conftest import ROOT

MARK = re.compile(r"\[q(\d)\]")


def oracle_meta_judge(policy, prompts, **kw):
    """Winner = the judgement (A is shown first) with the higher [qN] mark."""
    outs = []
    for p in prompts:
        a, b = (int(x) for x in MARK.findall(p)[-2:])
        outs.append([{"text": f"A is more careful.\nWinner: Judgement {'A' if a > b else 'B'}", "is_end": True,
                      "num_tokens": 9}])
    return outs


def judged_rows(lay: stages.Layout, t: int) -> list[dict]:
    """Every prompt gets 3 responses; the second one's 3 judgements disagree (the meta-judge's pick), with chosen
    scores spread over the classes; one judgement of it did not end (it must never be chosen or rejected)."""
    rows = []
    for i, rec in enumerate(sft.read_sft(lay.world / f"prompts_{t}.jsonl")):
        hi = 1 + i % 5  # the best judgement's score: classes 1..5
        js = [{"text": f"Checked every item [q3].\nScore: {hi}", "score": float(hi), "is_end": True},
              {"text": f"Skimmed it [q1].\nScore: {hi - 1}", "score": float(hi - 1), "is_end": True},
              {"text": "Rambling without end [q9].\nScore: 0", "score": 0.0, "is_end": False}]
        resp = [{"text": f"answer {i}-{j}", "num_tokens": 3, "is_end": True, "judgements": js if j == 1 else
                 [{"text": "Fine.\nScore: 2", "score": 2.0, "is_end": True}] * 3, "mean": 2.0 + (j == 1),
                 "var": 0.0, "num_valid": 3, "num_failed": 0} for j in range(3)]
        rows.append({"id": rec["id"], "prompt": sft.user_text(rec), "question": sft.user_text(rec), "meta": rec.get("meta"),
                     "responses": resp})
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    cfg = config.load(ROOT / "experiments/smoke.yaml", ["model.spin.meta_judge_pcnt=0.25"], warn=None)
    lay = stages.Layout(root)
    stages.prepare(cfg, lay)
    load_policy(lay.base_model).save(lay.model(0), {})  # M0 stands in for the SFT model M1
    return cfg, lay


def test_meta_judge_stage_makes_judge_pairs_at_a_small_prompt_count_and_pairs_mixes_them(world, monkeypatch):
    cfg, lay = world
    rows = judged_rows(lay, 1)
    assert len(rows) <= 25  # where the old quota accepted no judge pair at all
    write_jsonl(lay.it(1) / "judged.jsonl", rows)
    monkeypatch.setattr(sampler, "generate", oracle_meta_judge)
    metrics = judge_stages.run_meta_judge(cfg, lay, 1)
    judge_pairs = read_jsonl(lay.it(1) / "judge_pairs.jsonl")
    # one pair per chosen-score class (the quota at <= 50 prompts): classes 1..5
    assert metrics["meta/judge_pairs"] == len(judge_pairs) == 5
    for p in judge_pairs:
        assert "[q3]" in p["chosen"] and "[q1]" in p["rejected"]  # the unended [q9] judgement never wins or loses
        assert p["chosen_score"] - p["rejected_score"] == 1
    assert sorted(p["chosen_score"] for p in judge_pairs) == [1, 2, 3, 4, 5]
    assert metrics["meta/quota_rejected"] == len(rows) - 5

    pm = stages.run_pairs(cfg, lay, 1)
    items = read_jsonl(lay.it(1) / "pairs.jsonl")
    judges = [x for x in items if x["kind"] == "judge"]
    assert judges and pm["pairs/judge_pairs"] == len(judges)
    gbs, cap = cfg.model.global_batch_size, int(0.25 * cfg.model.global_batch_size)
    for b in range(0, len(items), gbs):
        assert sum(x["kind"] == "judge" for x in items[b:b + gbs]) <= cap
    assert read_json(lay.it(1) / "pairs_metrics.json")["pairs/judge_pairs"] == len(judges)
