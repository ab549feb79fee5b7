"""The judging stages: M_t judges its own responses (judge, with CREAM's previous judge) and, for Meta-Rewarding, its
own judgements (meta_judge), as pure functions of (input files, config, seed) -> output files.

Paths come from `Layout`; the prompt rendering and the policy loading are harness.stages' (shared by every stage).
"""

from __future__ import annotations

from harness import config
from harness.data import sft
from harness.io import read_jsonl, write_jsonl
from harness.layout import Layout, model_before
from harness.rows import META_JUDGED, RESPONSES
from harness.stages import load_stage_policy, render_judge_prompt, render_prompt, write_metrics


# ----------------------------------------------------------------------------------------------------- judge
def judge_responses(cfg: config.Config, policy, rows: list[dict], t: int, tag: str = "judge",
                    stats: dict | None = None) -> list[dict]:
    """k = num_evals_to_average judge samples of `policy` per response of `rows`: the aggregate (mean, var,
    judgements, num_failed) of each response, in row order. Samples are seeded by (seed, t, tag, prompt id, j)."""
    from harness.generation.sampler import generate
    from harness.judging.aggregate import aggregate

    spin = cfg.model.spin
    prompts, parts = [], []
    for row in rows:
        for j, r in enumerate(row["responses"]):
            prompts.append(render_judge_prompt(cfg, policy, row["question"], r["text"]))
            parts.append((cfg.seed, t, tag, row["id"], j))
    outs = generate(policy, prompts, num_samples=spin.num_evals_to_average, sampling_params=spin.sampling_params,
                    length_params=spin.length_params, seed_parts=parts, batch_size=spin.rollout_micro_batch_size,
                    progress=True, desc=f"{tag} iter {t}", stats=stats)
    # whole generation records: aggregate keeps is_end (an unended judgement never becomes a meta-judge pair)
    return [aggregate(out, spin.judge_score_low, spin.judge_score_high, spin.judge_reward_regex) for out in outs]


def run_judge(cfg: config.Config, lay: Layout, t: int) -> dict:
    """k = num_evals_to_average judge samples per response, by M_t itself; mean and variance of valid scores.

    With CREAM (model.spin.cream), the previous model M_{t-1} judges the same responses too (each response's "prev").
    Writes judged.jsonl and judge_metrics.json.
    """
    spin = cfg.model.spin
    rows = read_jsonl(lay.it(t) / "responses.jsonl", RESPONSES, nonempty=True)
    stats: dict = {}
    aggs = judge_responses(cfg, load_stage_policy(cfg, model_before(cfg, lay, t), generation=True), rows, t, stats=stats)
    flat = [r for row in rows for r in row["responses"]]
    for r, agg in zip(flat, aggs):
        r.update(agg)
    metrics = {}
    if spin.cream != "none" and t >= 1:
        prev = judge_responses(cfg, load_stage_policy(cfg, model_before(cfg, lay, t - 1), generation=True), rows, t,
                               tag="judge_prev", stats={})
        for r, agg in zip(flat, prev):
            r["prev"] = {k: agg[k] for k in ("mean", "var", "num_failed")}
        metrics["cream/prev_parse_failure_rate"] = sum(a["num_failed"] for a in prev) / max(
            1, len(prev) * spin.num_evals_to_average)
    write_jsonl(lay.it(t) / "judged.jsonl", rows)
    means = [a["mean"] for a in aggs if a["mean"] is not None]
    failed = sum(a["num_failed"] for a in aggs)
    return write_metrics(lay, t, "judge", {
        "judge/parse_failure_rate": failed / max(len(aggs) * spin.num_evals_to_average, 1),
        "judge/mean_score": sum(means) / len(means) if means else float("nan"),
        "judge/truncated_prompts": stats["truncated_prompts"], **metrics})


# ----------------------------------------------------------------------------------------------------- meta-judge
def run_meta_judge(cfg: config.Config, lay: Layout, t: int) -> dict:
    """Meta-Rewarding: judge pairs (chosen/rejected judgement) from the model judging its own judgements.

    With use_meta_judge=false the stage writes an empty file, so dvc.yaml stays one static graph. Writes
    judge_pairs.jsonl and meta_judge_metrics.json.
    """
    out = lay.it(t) / "judge_pairs.jsonl"
    spin = cfg.model.spin
    if not spin.use_meta_judge:
        write_jsonl(out, [])
        return write_metrics(lay, t, "meta_judge", {"meta/judge_pairs": 0})
    from harness.generation.sampler import generate
    from harness.judging import meta
    from harness.judging.parse import parse_winner, strip_score
    from harness.judging.templates import meta_judge_text

    rows = read_jsonl(lay.it(t) / "judged.jsonl", META_JUDGED, nonempty=True)
    policy = load_stage_policy(cfg, model_before(cfg, lay, t), generation=True)
    asks, keys = [], []  # one meta-judge prompt per (prompt, pair, order); results keyed by pair, never by position
    plan = {}
    for row in rows:
        idx = meta.select_response_for_meta(row["responses"])
        if idx is None:
            continue
        resp = row["responses"][idx]
        js = resp["judgements"]
        pairs = meta.judgement_pairs(js, spin.judge_reward_regex)
        plan[row["id"]] = (idx, pairs)
        for i, j in pairs:
            a, b = strip_score(js[i]["text"], spin.judge_reward_regex), strip_score(js[j]["text"], spin.judge_reward_regex)
            for order, (x, y) in (("ab", (a, b)), ("ba", (b, a))):
                text = meta_judge_text(row["question"], resp["text"], x, y, spin)
                asks.append(render_prompt(cfg, policy, [{"from": sft.USER, "value": text}]))
                keys.append((row["id"], i, j, order))
    outs = generate(policy, asks, num_samples=1, sampling_params=spin.sampling_params,
                    length_params=spin.length_params, seed_parts=[(cfg.seed, t, "meta", *k) for k in keys],
                    batch_size=spin.rollout_micro_batch_size, progress=True, desc=f"meta-judge iter {t}")
    verdicts = {k: parse_winner(o[0]["text"], spin.meta_judge_reward_regex) for k, o in zip(keys, outs)}
    cap = meta.quota_cap(len(rows), spin.judge_score_low, spin.judge_score_high)  # the iteration's prompts = its epoch
    quota = meta.ScoreQuota(spin.judge_score_low, spin.judge_score_high, spin.meta_max_relative_pcnt, cap)
    judge_pairs, stats = [], {"meta/prompts": len(plan), "meta/battles": 0, "meta/unparsed_verdicts": 0,
                              "meta/bad_samples": 0, "meta/quota_rejected": 0}
    for row in rows:
        if row["id"] not in plan:
            continue
        idx, pairs = plan[row["id"]]
        js = row["responses"][idx]["judgements"]
        battles = {}
        for i, j in pairs:
            res = meta.battle_outcome(verdicts[(row["id"], i, j, "ab")], verdicts[(row["id"], i, j, "ba")])
            if res is None:
                stats["meta/unparsed_verdicts"] += 1
            else:
                battles[(i, j)] = res
        stats["meta/battles"] += len(battles)
        sel = meta.select_judge_pair(js, meta.elo_scores(len(js), battles), spin.judge_reward_regex) if battles else None
        if sel is None:
            stats["meta/bad_samples"] += 1
            continue
        c, r = sel
        if not quota.accept(js[c]["score"]):
            stats["meta/quota_rejected"] += 1
            continue
        judge_prompt = render_judge_prompt(cfg, policy, row["question"], row["responses"][idx]["text"])
        judge_pairs.append({"id": f"{row['id']}-judge", "kind": "judge", "prompt": judge_prompt,
                            "chosen": js[c]["text"], "rejected": js[r]["text"],
                            "chosen_score": js[c]["score"], "rejected_score": js[r]["score"]})
    write_jsonl(out, judge_pairs)
    return write_metrics(lay, t, "meta_judge", {**stats, "meta/judge_pairs": len(judge_pairs)})
