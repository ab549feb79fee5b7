"""Evaluation of policy and judge after each iteration, and the report over iterations.

Policy (task world, with its oracle): mean oracle score of greedy answers on the test split, win rate against M1
(the SFT model) judged by the oracle with ties counted half (the analogue of the paper's AlpacaEval win rate), and
mean answer length. Judge: on held-out responses with oracle scores, pairwise accuracy (pairs of responses to the
same prompt with different oracle scores, a judge tie counts half), exact-match rate, Spearman and Kendall tau
against the oracle, and the share of judgements that do not parse (the paper's reward-modelling table).
User data without an oracle: validation loss of the gold answers and the judge's own statistics, labelled as such.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from harness import config
from harness.data import sft
from harness.data.world import CHECKS
from harness.io import DataError, pending, read_json, read_jsonl, write_json, write_jsonl
from harness.layout import Layout, use_sft_baseline, use_world, validation_file
from harness.rows import EVAL_ANSWERS, JUDGE_EVAL
from harness.stages import load_stage_policy, no_pairs_warning, render_judge_prompt, render_prompt, validation_examples


def _greedy(cfg: config.Config) -> config.SamplingParams:
    return dataclasses.replace(cfg.model.spin.sampling_params, use_greedy=True)


def judge_agreement(groups: dict[str, list[tuple[float | None, int]]]) -> dict:
    """Judge vs oracle. groups: task id -> [(judge score or None, oracle score)]. Unparsed judgements count wrong."""
    from scipy.stats import kendalltau, spearmanr

    pairs = correct = 0.0
    exact = n = failed = 0
    xs, ys = [], []
    for items in groups.values():
        for s, o in items:
            n += 1
            failed += s is None
            exact += s is not None and round(s) == o
            if s is not None:
                xs.append(s)
                ys.append(o)
        for a in range(len(items)):
            for b in range(a + 1, len(items)):
                (sa, oa), (sb, ob) = items[a], items[b]
                if oa == ob:
                    continue
                pairs += 1
                if sa is not None and sb is not None:
                    correct += 0.5 if sa == sb else float((sa > sb) == (oa > ob))
    ok = len(xs) > 2 and len(set(xs)) > 1 and len(set(ys)) > 1
    return {  # no judgement parsed at all: accuracy is undefined, not 0 (chance is 0.5)
        "eval/judge_pairwise_acc": correct / pairs if pairs and xs else float("nan"),
        "eval/judge_exact_match": exact / n if n else float("nan"),
        "eval/judge_spearman": float(spearmanr(xs, ys).statistic) if ok else float("nan"),
        "eval/judge_kendall": float(kendalltau(xs, ys).statistic) if ok else float("nan"),
        "eval/judge_parse_failure": failed / n if n else float("nan"),
    }


def eval_metrics(cfg: config.Config, t: int) -> set[str]:
    """The eval/ metrics run_evaluate writes for iteration t under cfg (a sweep checks its objective against them)."""
    lay = Layout()
    out = {"eval/val_loss"} if validation_file(cfg, lay) is not None else set()
    if use_world(cfg):
        out |= {"eval/oracle_reward", "eval/perfect_rate", "eval/response_length", "eval/judge_pairwise_acc",
                "eval/judge_exact_match", "eval/judge_spearman", "eval/judge_kendall", "eval/judge_parse_failure"}
        from harness.data.world import FAMILIES
        from harness.telemetry import checklist_keys

        out |= {"eval/judge_own_pairwise_acc", "eval/judge_own_pairs", "eval/sample_oracle_reward", *checklist_keys("eval/"),
                *(f"eval/{f}/{k}" for f in FAMILIES for k in ("oracle_reward", "judge_own_pairwise_acc"))}
        if use_sft_baseline(cfg):
            out.add("eval/win_rate_vs_sft_baseline")
        if t == 0 or cfg.model.spin.first_iteration_sft:
            out |= {"eval/win_rate_vs_m1", *(f"eval/{f}/win_rate_vs_m1" for f in FAMILIES)}
        if t > 0 and cfg.model.spin.first_iteration_sft:
            out.add("eval/win_rate_vs_m1_se")
    elif out:
        out |= {"eval/response_length", "eval/judge_self_mean_score", "eval/judge_self_parse_failure"}
    return out


def win_rate(scores: list[int], baseline: list[int]) -> float:
    """Oracle-judged head-to-head: a win counts 1, a tie 1/2."""
    if len(scores) != len(baseline):
        raise DataError(f"win rate: {len(scores)} test answers against {len(baseline)} baseline answers (a baseline "
                        "evaluated on another test split: re-run the stage that wrote it)")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)) / len(scores)


def win_rate_se(scores: list[int], baseline: list[int]) -> float:
    """Standard error of win_rate over the test prompts (sample sd of the 1 / 1/2 / 0 outcomes / sqrt(n))."""
    xs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)]
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def _by_family(answers: list[dict], families: dict[str, str], baseline: list[int] | None) -> dict:
    """eval/<family>/oracle_reward (and win_rate_vs_m1 against `baseline`, in answer order) per task family."""
    from harness.data.world import FAMILIES

    out = {}
    for fam in FAMILIES:  # every family, so runs compare key by key (NaN where the test split has none of it)
        idx = [i for i, a in enumerate(answers) if families[a["id"]] == fam]
        out[f"eval/{fam}/oracle_reward"] = (sum(answers[i]["oracle_score"] for i in idx) / len(idx) if idx
                                            else float("nan"))
        if baseline is not None:
            out[f"eval/{fam}/win_rate_vs_m1"] = (win_rate([answers[i]["oracle_score"] for i in idx],
                                                          [baseline[i] for i in idx]) if idx else float("nan"))
    return out


def judge_own_samples(cfg: config.Config, policy, lay: Layout, t) -> dict:
    """The judge on the policy's own samples: N = num_responses_to_gen sampled answers to the first quarter of the
    test prompts (at least 8), each judged once greedily by the same model; pairwise accuracy against the oracle over the pairs it
    separates (eval/judge_own_pairwise_acc, per family too), which of the judge's steps fail
    (telemetry.checklist_metrics), and the samples' mean oracle score (eval/sample_oracle_reward)."""
    from harness.data.world import score_record
    from harness.generation.sampler import generate
    from harness.judging.parse import parse_score
    from harness.telemetry import checklist_metrics, own_judge_metrics, sample_quality

    spin = cfg.model.spin
    recs = sft.read_sft(lay.world / "test.jsonl")
    recs = recs[: max(8, len(recs) // 4)]  # a quarter of the test prompts, at least 8 (or all of a smaller split)
    outs = generate(policy, [render_prompt(cfg, policy, r) for r in recs], num_samples=spin.num_responses_to_gen,
                    sampling_params=spin.sampling_params, length_params=spin.length_params,
                    seed_parts=[(cfg.seed, t, "own", r["id"]) for r in recs], batch_size=spin.rollout_micro_batch_size,
                    desc=f"own samples {t}")
    flat = [(r, o["text"]) for r, os_ in zip(recs, outs) for o in os_]
    jouts = generate(policy, [render_judge_prompt(cfg, policy, sft.user_text(r), x) for r, x in flat], num_samples=1,
                     sampling_params=_greedy(cfg), length_params=spin.length_params,
                     seed_parts=[(cfg.seed, t, "own_judge", r["id"], i) for i, (r, _) in enumerate(flat)],
                     batch_size=spin.rollout_micro_batch_size, desc=f"judge own samples {t}")
    groups: dict[str, list] = {}
    for (r, x), o in zip(flat, jouts):
        s = parse_score(o[0]["text"], spin.judge_score_low, spin.judge_score_high, spin.judge_reward_regex)
        groups.setdefault(r["id"], []).append((s, score_record(r, x)))
    return (sample_quality(groups, "eval/") | own_judge_metrics(groups, {r["id"]: r["meta"]["family"] for r in recs}, "eval/")
            | checklist_metrics([(r["meta"], x, o[0]["text"]) for (r, x), o in zip(flat, jouts)], "eval/"))


def _test_answers(cfg: config.Config, policy, lay: Layout, t) -> list[dict]:
    """Greedy answers to the task world's test split, each with its oracle score."""
    from harness.data.world import score_record
    from harness.generation.sampler import generate

    spin = cfg.model.spin
    recs = sft.read_sft(lay.world / "test.jsonl")
    outs = generate(policy, [render_prompt(cfg, policy, r) for r in recs], num_samples=1, sampling_params=_greedy(cfg),
                    length_params=spin.length_params, seed_parts=[(cfg.seed, t, "eval", r["id"]) for r in recs],
                    batch_size=spin.rollout_micro_batch_size, progress=True, desc=f"evaluate {t}")
    return [{"id": r["id"], "answer": o[0]["text"], "num_tokens": o[0]["num_tokens"],
             "oracle_score": score_record(r, o[0]["text"])} for r, o in zip(recs, outs)]


def _policy_metrics(answers: list[dict]) -> dict:
    scores = [a["oracle_score"] for a in answers]
    return {"eval/oracle_reward": sum(scores) / len(scores), "eval/perfect_rate": sum(s == 5 for s in scores) / len(scores),
            "eval/response_length": sum(a["num_tokens"] for a in answers) / len(answers)}


def run_evaluate_baseline(cfg: config.Config, lay: Layout) -> dict:
    """The SFT baseline's greedy test answers (what every M_t is compared with) and its oracle metrics."""
    # pending: the model this very stage trained, not committed yet (a stage that fails writes nothing)
    answers = _test_answers(cfg, load_stage_policy(cfg, pending(lay.baseline / "model"), generation=True), lay, "sft_baseline")
    write_jsonl(lay.baseline / "eval_answers.jsonl", answers)
    metrics = _policy_metrics(answers)
    write_json(lay.baseline / "eval.json", metrics)
    return metrics


def run_evaluate(cfg: config.Config, lay: Layout, t: int) -> dict:
    """Evaluate M_{t+1}, the model iteration t produced; writes iter<t>/eval.json and eval_answers.jsonl."""
    from harness.generation.sampler import generate
    from harness.judging.parse import parse_score
    from harness.train import encode, val_sft

    spin = cfg.model.spin
    policy = load_stage_policy(cfg, lay.model(t), generation=True)
    metrics: dict[str, float] = {"iteration": t}
    val = validation_examples(cfg, lay, policy)
    if val:
        enc = [encode(policy.tokenizer, p, r, config.seq_len(cfg, cfg.model.data.validation_ds)) for p, r in val]
        metrics["eval/val_loss"] = val_sft(policy, enc, cfg)()["val/loss"]
    if use_world(cfg):
        answers = _test_answers(cfg, policy, lay, t)
        write_jsonl(lay.it(t) / "eval_answers.jsonl", answers)
        scores = [a["oracle_score"] for a in answers]
        metrics.update(_policy_metrics(answers))
        if use_sft_baseline(cfg):  # the papers' other reference: the model SFT'd on IFT data only
            base = [a["oracle_score"] for a in read_jsonl(lay.baseline / "eval_answers.jsonl", EVAL_ANSWERS)]
            metrics["eval/win_rate_vs_sft_baseline"] = win_rate(scores, base)
        m1 = lay.it(0) / "eval_answers.jsonl"
        base = None
        if cfg.model.spin.first_iteration_sft and t > 0 and m1.exists():
            base = [a["oracle_score"] for a in read_jsonl(m1, EVAL_ANSWERS)]
            metrics["eval/win_rate_vs_m1"] = win_rate(scores, base)
            metrics["eval/win_rate_vs_m1_se"] = win_rate_se(scores, base)
        elif t == 0:
            metrics["eval/win_rate_vs_m1"] = 0.5  # M1 against itself
            base = scores
        families = {r["id"]: r["meta"]["family"] for r in sft.read_sft(lay.world / "test.jsonl")}
        metrics.update(_by_family(answers, families, base))
        metrics.update(judge_own_samples(cfg, policy, lay, t))
        rows = read_jsonl(lay.world / "judge_eval.jsonl", JUDGE_EVAL, nonempty=True)
        prompts = [render_judge_prompt(cfg, policy, r["prompt"], r["response"]) for r in rows]
        jouts = generate(policy, prompts, num_samples=1, sampling_params=_greedy(cfg),
                         length_params=spin.length_params, seed_parts=[(cfg.seed, t, "judge_eval", r["id"]) for r in rows],
                         batch_size=spin.rollout_micro_batch_size, progress=True, desc=f"judge eval iter {t}")
        groups: dict[str, list] = {}
        for r, o in zip(rows, jouts):
            s = parse_score(o[0]["text"], spin.judge_score_low, spin.judge_score_high, spin.judge_reward_regex)
            groups.setdefault(r["task_id"], []).append((s, r["oracle_score"]))
        metrics.update(judge_agreement(groups))
    elif validation_file(cfg, lay) is not None:
        # No oracle: the judge's own view of the model's greedy validation answers. Labelled judge_self: it is
        # what the model thinks of itself, not agreement with any ground truth.
        recs = sft.read_sft(validation_file(cfg, lay))
        recs = recs[: max(1, math.ceil(len(recs) * cfg.trainer.self_rewarding.limit_val_batches))]
        outs = generate(policy, [render_prompt(cfg, policy, r) for r in recs], num_samples=1, sampling_params=_greedy(cfg),
                        length_params=spin.length_params,
                        seed_parts=[(cfg.seed, t, "eval", str(r.get("id", i))) for i, r in enumerate(recs)],
                        batch_size=spin.rollout_micro_batch_size, progress=True, desc=f"evaluate iter {t}")
        answers = [o[0] for o in outs]
        jouts = generate(policy, [render_judge_prompt(cfg, policy, sft.user_text(r), a["text"]) for r, a in zip(recs, answers)],
                         num_samples=1, sampling_params=_greedy(cfg), length_params=spin.length_params,
                         seed_parts=[(cfg.seed, t, "judge_self", i) for i in range(len(recs))],
                         batch_size=spin.rollout_micro_batch_size, progress=True, desc=f"judge_self iter {t}")
        scores = [parse_score(o[0]["text"], spin.judge_score_low, spin.judge_score_high, spin.judge_reward_regex)
                  for o in jouts]
        valid = [s for s in scores if s is not None]
        write_jsonl(lay.it(t) / "eval_answers.jsonl", [{"answer": a["text"], "num_tokens": a["num_tokens"],
                                                        "judge_self_score": s} for a, s in zip(answers, scores)])
        metrics["eval/response_length"] = sum(a["num_tokens"] for a in answers) / len(answers)
        metrics["eval/judge_self_mean_score"] = sum(valid) / len(valid) if valid else float("nan")
        metrics["eval/judge_self_parse_failure"] = 1 - len(valid) / len(scores)
    write_json(lay.it(t) / "eval.json", metrics)
    return metrics


# ----------------------------------------------------------------------------------------------------- report
ROWS = [
    ("eval/oracle_reward", "policy: mean oracle score (0-5) of greedy test answers"),
    ("eval/win_rate_vs_m1", "policy: win rate vs M1 (oracle-judged, ties 1/2)"),
    ("eval/win_rate_vs_sft_baseline", "policy: win rate vs the SFT baseline (IFT only; oracle-judged, ties 1/2)"),
    ("eval/perfect_rate", "policy: share of impeccable answers (score 5)"),
    ("eval/sample_oracle_reward", "policy: mean oracle score of sampled answers (sampling_params, a quarter of test)"),
    ("eval/response_length", "policy: mean answer length (tokens)"),
    ("eval/win_rate_vs_m1_se", "policy: standard error of the win rate vs M1"),
    ("eval/judge_own_pairwise_acc", "judge: pairwise accuracy on its own samples"),
    ("eval/judge_own_offtopic_acc", "judge steps (own samples): off topic called as the oracle does"),
    *((f"eval/judge_own_echo_acc/{c}", f"judge steps (own samples): {c}, asked value read right") for c in CHECKS),
    *((f"eval/judge_own_look_acc/{c}", f"judge steps (own samples): {c}, response's value seen right")
      for c in CHECKS),
    *((f"eval/judge_own_check_acc/{c}", f"judge steps (own samples): {c}, yes/no right") for c in CHECKS),
    ("eval/judge_pairwise_acc", "judge: pairwise accuracy vs oracle (designed responses)"),
    ("eval/judge_exact_match", "judge: exact-match rate"),
    ("eval/judge_spearman", "judge: Spearman vs oracle"),
    ("eval/judge_kendall", "judge: Kendall tau vs oracle"),
    ("eval/judge_parse_failure", "judge: share of unparsable judgements"),
    ("eval/val_loss", "validation loss (gold answers)"),
    ("eval/judge_self_mean_score", "no oracle: the model's own judge score of its answers"),
    ("eval/judge_self_parse_failure", "no oracle: share of its judgements that do not parse"),
    ("train/chosen_generated_rewards", "pairs: mean judge score of chosen"),
    ("train/rejected_generated_rewards", "pairs: mean judge score of rejected"),
    ("pairs/chosen_tokens", "pairs: chosen length (tokens)"),
    ("pairs/rejected_tokens", "pairs: rejected length (tokens)"),
    ("pairs/oracle_correct_frac", "pairs: chosen really better (oracle)"),
    ("pairs/oracle_tie_frac", "pairs: chosen and rejected equal (oracle)"),
    ("pairs/oracle_reversed_frac", "pairs: chosen really worse (oracle)"),
    ("pairs/judge_own_pairwise_acc", "pairs: the labelling judge's accuracy on the iteration's samples"),
    ("pairs/policy_pairs", "pairs: policy pairs"),
    ("cream/consistency_rate", "pairs: CREAM consistency rate"),
    ("train/bad_samples_per_GBS", "pairs: bad samples per global batch"),
    ("pairs/judge_pairs", "pairs: judge pairs (Meta-Rewarding)"),
    ("train/acc", "train: preference accuracy (last epoch)"),
]


def collect(cfg: config.Config, lay: Layout) -> list[dict]:
    out = []
    for t in range(cfg.trainer.self_rewarding.max_iterations):
        row = {"iteration": t, "model": f"M{t + 1}"}
        for name in ("eval.json", "pairs_metrics.json", "train_metrics.json"):
            p = lay.it(t) / name
            if p.exists():
                row.update({k: v for k, v in read_json(p).items() if k != "iteration"})
        out.append(row)
    return out


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


FAMILY_ROWS = [("eval/{}/oracle_reward", "oracle score"), ("eval/{}/win_rate_vs_m1", "win rate vs M1"),
               ("eval/{}/judge_own_pairwise_acc", "judge on own samples"),
               ("pairs/{}/oracle_correct_frac", "pairs really better"),
               ("pairs/{}/oracle_reversed_frac", "pairs reversed")]


def family_table(rows: list[dict]) -> list[str]:
    """The report's per-family breakdown (task world): one line per (family, metric), one column per model."""
    fams = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/") and k.endswith("/oracle_reward")
                   and k.count("/") == 2})
    if not fams:
        return []
    out = ["", "## Per task family", "", "| family | metric | " + " | ".join(r["model"] for r in rows) + " |",
           "|---|---|" + "---|" * len(rows)]
    for fam in fams:
        for key, label in FAMILY_ROWS:
            k = key.format(fam)
            if any(k in r for r in rows):
                out.append(f"| {fam} | {label} | " + " | ".join(_fmt(r.get(k)) for r in rows) + " |")
    return out


def run_report(cfg: config.Config, lay: Layout, out_dir: Path) -> dict:
    """report.md (a table per iteration, rows as in the papers' tables), iterations.csv for DVC plots, PNG plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = collect(cfg, lay)
    out_dir.mkdir(parents=True, exist_ok=True)
    head = "| metric | " + " | ".join(r["model"] for r in rows) + " |"
    lines = ["# Self-rewarding report", "", f"Models M1..M{len(rows)} (M1 = iteration 0"
             f"{' SFT' if cfg.model.spin.first_iteration_sft else ''}); meta-judge: {cfg.model.spin.use_meta_judge}.",
             "", head, "|---|" + "---|" * len(rows)]
    for key, label in ROWS:
        if any(key in r for r in rows):
            lines.append(f"| {label} | " + " | ".join(_fmt(r.get(key)) for r in rows) + " |")
    lines += family_table(rows)
    warnings = [w for r in rows if (w := no_pairs_warning(r, r["iteration"]))]
    lines += ["", *(f"**Warning**: {w}" for w in warnings)] if warnings else []
    lines += ["", "Where the time went (stage wall times; they differ between reruns, so they are kept out of this "
              "bit-identical report): `../timings/summary.md`."]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    keys = [k for k, _ in ROWS if any(k in r for r in rows)]
    csv = ["iteration," + ",".join(k.replace("/", "_") for k in keys)]
    csv += [f"{r['iteration']}," + ",".join("" if r.get(k) is None else repr(r.get(k)) for k in keys) for r in rows]
    (out_dir / "iterations.csv").write_text("\n".join(csv) + "\n", encoding="utf-8")
    plots = {"oracle_reward": ["eval/oracle_reward", "eval/sample_oracle_reward"], "win_rate": ["eval/win_rate_vs_m1", "eval/win_rate_vs_sft_baseline"],
             "judge": ["eval/judge_pairwise_acc", "eval/judge_own_pairwise_acc", "eval/judge_exact_match",
                       "eval/judge_spearman"],
             "pairs": ["pairs/oracle_correct_frac", "pairs/oracle_tie_frac", "pairs/oracle_reversed_frac"],
             "lengths": ["eval/response_length", "pairs/chosen_tokens", "pairs/rejected_tokens"],
             "rewards": ["train/chosen_generated_rewards", "train/rejected_generated_rewards"]}
    (out_dir / "plots").mkdir(exist_ok=True)
    for name, ks in plots.items():
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for k in ks:
            pts = [(r["iteration"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=k)
        ax.set_xlabel("iteration (0 = SFT)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "plots" / f"{name}.png", metadata={"Software": None})
        plt.close(fig)
    last = rows[-1]
    final = {k: last[k] for k in keys if isinstance(last.get(k), (int, float)) and not math.isnan(last[k])}
    write_json(out_dir / "metrics.json", final)
    return final
