"""The pipeline's stages as pure functions of (input files, config, seed) -> output files (DESIGN.md: data flow):
prepare, sft, generate, pairs and train here, judge and meta_judge in harness.judge_stages.

Paths come from `Layout`, the one place that names them (dvc.yaml lists the same). Every output is written
atomically; a stage that fails writes nothing.
"""

from __future__ import annotations

import random
from pathlib import Path

from harness import config
from harness.data import sft
from harness.io import DataError, read_json, read_jsonl, write_json, write_jsonl
from harness.layout import (
    Layout,
    initial_model,
    model_before,
    prompts_file,
    sft_files,
    use_sft_baseline,
    use_world,
    validation_file,
)
from harness.pipeline import stage_config
from harness.rows import JUDGE_PAIRS, JUDGED, JUDGED_WORLD, PAIRS

__all__ = ["Layout", "initial_model", "model_before", "prompts_file", "use_sft_baseline", "use_world",
           "validation_file"]  # re-exported: the paths live in harness.layout


def load_stage_policy(cfg: config.Config, path: Path, *, generation: bool = False):
    """The policy at `path`, without transformers' modeling import where the lean models cover the checkpoint:
    generation=True (the stage only generates and scores) loads generation.lean_model's, else (training) the
    trainable models.lean.LeanTrainLM (transformers' Llama forward, same bits)."""
    from harness.determinism import torch_ready
    from harness.timing import CLOCK

    with CLOCK.phase("load"):  # the torch and transformers imports included
        torch_ready(cfg.seed)
        if generation and cfg.model.backend == "hf":
            from harness.generation.lean_model import load_for_generation

            policy = load_for_generation(path)
        elif cfg.model.backend == "hf":
            from harness.models.lean import load_for_training

            policy = load_for_training(path)
        else:
            from harness.models.base import load_policy

            policy = load_policy(path, backend=cfg.model.backend)
    policy.precision = cfg.trainer.precision
    return policy


def render_prompt(cfg: config.Config, policy, rec_or_turns) -> str:
    return sft.render_prompt(rec_or_turns, cfg.model.data, tokenizer=policy.tokenizer)


def render_judge_prompt(cfg: config.Config, policy, question: str, response: str) -> str:
    from harness.judging.templates import judge_text

    return render_prompt(cfg, policy, [{"from": sft.USER, "value": judge_text(question, response, cfg.model.spin)}])


# ----------------------------------------------------------------------------------------------------- prepare
def prepare(cfg: config.Config, lay: Layout) -> dict:
    """The task world (when no user data is configured) and the tiny base model M0 (when no checkpoint is)."""
    from harness.judging.templates import judge_text, meta_judge_text

    out = {}
    spin = cfg.model.spin
    if cfg.pretrained_checkpoint.restore_from_path is None:
        from harness.determinism import torch_ready

        torch_ready(cfg.seed)
    if use_world(cfg):
        from harness.data.world import build_world
        from harness.io import atomic_path

        with atomic_path(lay.world) as tmp:  # the whole world or none of it
            paths = build_world(cfg.world, cfg.seed, lambda p, r: judge_text(p, r, spin), tmp,
                                config.self_rewarding_iterations(cfg), lambda p, r, a, b: meta_judge_text(p, r, a, b, spin))
        out["world_files"] = len(paths)
    if cfg.pretrained_checkpoint.restore_from_path is None:
        from harness.data.world import world_texts
        from harness.models.hf import build_tiny
        from harness.models.tokenizer import train_tokenizer

        # The tokenizer sees the judge template too, so judge prompts are as short as the world's prompts.
        texts = world_texts(2000, cfg.seed, cfg.world.end_marks, cfg.world.kind_check)
        texts += [judge_text("q", "a", spin), meta_judge_text("q", "a", "j", "k", spin)]
        tok = train_tokenizer(texts, cfg.model.tiny.vocab_size)
        policy = build_tiny(cfg.model.tiny, tok, cfg.seed)
        policy.save(lay.base_model, stage_config(cfg, "prepare"))
        out["parameters"] = sum(p.numel() for p in policy.model.parameters())
    return out


# ----------------------------------------------------------------------------------------------------- sft (iteration 0)
def sft_examples(cfg: config.Config, lay: Layout, policy, only: str | None = None
                 ) -> tuple[list[tuple[str, str]], dict]:
    """(prompt, answer) pairs of iteration 0 from layout.sft_files: gold answers (IFT), judge-training targets (EFT)
    and, in the task world, meta-judge targets (MFT). Rows without an answer (prompt-only rows) are skipped."""
    examples, counts = [], {}
    for name, path in sft_files(cfg, lay).items():
        if only and name != only:
            continue
        rows = [r for r in sft.read_sft(path) if sft.gold_response(r) is not None]
        examples += [(render_prompt(cfg, policy, r), sft.gold_response(r)) for r in rows]
        counts[f"sft/{name}_examples"] = len(rows)
    if not examples:  # training on nothing would save M0 as M1 and call it done
        files = ", ".join(str(p) for n, p in sft_files(cfg, lay).items() if not only or n == only)
        raise DataError(f"{files}: no SFT example (a record needs a final {sft.ASSISTANT!r} turn with the answer)")
    return examples, counts


def validation_examples(cfg: config.Config, lay: Layout, policy) -> list[tuple[str, str]]:
    path = validation_file(cfg, lay)
    if path is None:
        return []
    rows = [r for r in sft.read_sft(path) if sft.gold_response(r) is not None]
    return [(render_prompt(cfg, policy, r), sft.gold_response(r)) for r in rows]


def _summary(history: list[dict]) -> dict:
    """Last validation values and the mean of each train metric over the iteration's last epoch."""
    out = {}
    train = [h for h in history if "lr" in h]
    last_epoch = [h for h in train if h["epoch"] == train[-1]["epoch"]] if train else []
    for key in sorted({k for h in last_epoch for k in h} - {"step", "epoch"}):
        vals = [h[key] for h in last_epoch if key in h]
        out[key if "/" in key else f"train/{key}"] = sum(vals) / len(vals)
    for h in history:
        out.update({k: v for k, v in h.items() if k.startswith("val/")})
    out["train/steps"] = len(train)
    return out


def run_sft(cfg: config.Config, lay: Layout, *, baseline: bool = False) -> tuple[dict, list[dict]]:
    """M0 -> M1 on IFT + EFT (+ MFT); with baseline, M0 -> the SFT baseline on IFT only (same settings). Writes the
    model, train_history.jsonl and train_metrics.json (iter0/, or sft_baseline/)."""
    from harness.train import train_sft

    policy = load_stage_policy(cfg, initial_model(cfg, lay))
    examples, counts = sft_examples(cfg, lay, policy, only="ift" if baseline else None)
    resume = lay.resume("sft_baseline" if baseline else 0)
    out, stage = (lay.baseline / "model", "sft_baseline") if baseline else (lay.model(0), "sft")
    history = train_sft(policy, examples, cfg, validation=validation_examples(cfg, lay, policy), iteration=0,
                        resume_dir=resume)
    policy.save(out, stage_config(cfg, stage))
    _clear_resume(resume)
    return write_training(out.parent, {**counts, **_summary(history)}, history)


def write_training(d: Path, summary: dict, history: list[dict]) -> tuple[dict, list[dict]]:
    """A training stage's train_history.jsonl and train_metrics.json in `d`; returns (summary, history)."""
    write_jsonl(d / "train_history.jsonl", history)
    write_json(d / "train_metrics.json", summary)
    return summary, history


def write_metrics(lay: Layout, t: int, stage: str, metrics: dict) -> dict:
    """iter<t>/<stage>_metrics.json (generate, judge, meta_judge, pairs); returns `metrics`."""
    write_json(lay.it(t) / f"{stage}_metrics.json", metrics)
    return metrics


def _clear_resume(resume_dir: Path) -> None:
    import shutil

    from harness.train import ref_cache_path

    shutil.rmtree(resume_dir, ignore_errors=True)
    ref_cache_path(resume_dir).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------- generate
def run_generate(cfg: config.Config, lay: Layout, t: int) -> dict:
    """N = num_responses_to_gen sampled responses per prompt from M_t: responses.jsonl, generate_metrics.json."""
    from harness.generation.sampler import generate

    spin = cfg.model.spin
    recs = sft.read_sft(prompts_file(cfg, lay, t), nonempty=True)
    policy = load_stage_policy(cfg, model_before(cfg, lay, t), generation=True)
    ids = [str(r.get("id", i)) for i, r in enumerate(recs)]
    prompts = [render_prompt(cfg, policy, r) for r in recs]
    stats: dict = {}
    outs = generate(policy, prompts, num_samples=spin.num_responses_to_gen, sampling_params=spin.sampling_params,
                    length_params=spin.length_params, seed_parts=[(cfg.seed, t, "response", i) for i in ids],
                    batch_size=spin.rollout_micro_batch_size, progress=True, desc=f"generate iter {t}", stats=stats)
    rows = [{"id": i, "prompt": p, "question": sft.user_text(r), "meta": r.get("meta"), "responses": o}
            for i, p, r, o in zip(ids, prompts, recs, outs)]
    write_jsonl(lay.it(t) / "responses.jsonl", rows)
    resp = [x for o in outs for x in o]
    return write_metrics(lay, t, "generate", {
        "generate/responses": len(resp), "generate/mean_tokens": sum(x["num_tokens"] for x in resp) / len(resp),
        "generate/is_end_rate": sum(x["is_end"] for x in resp) / len(resp),
        "generate/truncated_prompts": stats["truncated_prompts"]})


# ----------------------------------------------------------------------------------------------------- pairs
def run_pairs(cfg: config.Config, lay: Layout, t: int) -> dict:
    """Preference pairs by mean judge score (length control rho), bad samples counted, judge pairs mixed in.

    model.spin.pair_labels picks who labels them: the judge, or on the task world the oracle (the ceiling of training
    on these samples) or chance (the floor). On the task world every pair is also scored by the oracle (telemetry).
    With CREAM each policy pair carries its consistency rate."""
    from harness.pairs import bad_sample_stats, mix_judge_pairs, relabel, select_pair

    spin = cfg.model.spin
    rho = config.schedule(spin.length_control, t)
    world = config.uses_task_world(cfg)
    rows = read_jsonl(lay.it(t) / "judged.jsonl", JUDGED_WORLD if world else JUDGED, nonempty=True)
    judge_pairs = read_jsonl(lay.it(t) / "judge_pairs.jsonl", JUDGE_PAIRS)
    if world:
        from harness.data.world import score_record

        for row in rows:
            for r in row["responses"]:
                r["oracle"] = score_record(row, r["text"])
    rates, cream_stats = [None] * len(rows), {}
    if spin.cream != "none":
        from harness.cream import consistency

        rates, cream_stats = consistency(rows, spin.cream)
    policy_pairs, bad, bad_ends, chosen, rejected = [], 0, 0, [], []
    for row, rate in zip(rows, rates):
        rs = relabel(row["responses"], spin.pair_labels, random.Random(f"{cfg.seed}:{t}:{row['id']}:labels"))
        bad_ends += sum(not r["is_end"] for r in rs)
        sel = select_pair(rs, rho)
        if sel["bad"]:
            bad += 1
            continue
        c, r = rs[sel["chosen"]], rs[sel["rejected"]]
        pair = {"id": row["id"], "kind": "policy", "prompt": row["prompt"], "chosen": c["text"],
                "rejected": r["text"], "chosen_score": c["mean"], "rejected_score": r["mean"],
                "chosen_tokens": c["num_tokens"], "rejected_tokens": r["num_tokens"]}
        if world:
            pair.update(family=row["meta"]["family"], chosen_oracle=c["oracle"], rejected_oracle=r["oracle"])
        if rate is not None:
            pair["consistency"] = rate
        policy_pairs.append(pair)
        chosen.append(c)
        rejected.append(r)
    pcnt = spin.meta_judge_pcnt if spin.use_meta_judge else 0.0
    rng = random.Random(f"{cfg.seed}:{t}:mix")
    items, mix_stats = mix_judge_pairs(policy_pairs, judge_pairs, cfg.model.global_batch_size, pcnt, rng)
    write_jsonl(lay.it(t) / "pairs.jsonl", items)
    stats = bad_sample_stats(bad, bad_ends, len(rows), spin.num_responses_to_gen)
    metrics = {
        **{f"train/{k}": v for k, v in stats.items()},
        "pairs/policy_pairs": len(policy_pairs), "pairs/judge_pairs": sum(x["kind"] == "judge" for x in items),
        "pairs/length_control": rho,
        **{f"pairs/{k}": v for k, v in mix_stats.items() if isinstance(v, (int, float))},
        **cream_stats,
    }
    if world:
        from harness.telemetry import own_judge_metrics, pair_quality

        metrics.update(pair_quality([(p["chosen_oracle"], p["rejected_oracle"], p["family"]) for p in policy_pairs]))
        groups = {row["id"]: [(r["mean"], r["oracle"]) for r in row["responses"]] for row in rows}
        metrics.update(own_judge_metrics(groups, {row["id"]: row["meta"]["family"] for row in rows}, "pairs/"))
    if chosen:
        metrics["train/chosen_generated_rewards"] = sum(c["mean"] for c in chosen) / len(chosen)
        metrics["train/rejected_generated_rewards"] = sum(r["mean"] for r in rejected) / len(rejected)
        metrics["pairs/chosen_tokens"] = sum(c["num_tokens"] for c in chosen) / len(chosen)
        metrics["pairs/rejected_tokens"] = sum(r["num_tokens"] for r in rejected) / len(rejected)
    warning = no_pairs_warning(metrics, t)
    if warning and spin.require_pairs:
        raise DataError(warning)
    return write_metrics(lay, t, "pairs", metrics)


def no_pairs_warning(metrics: dict, t: int) -> str | None:
    """The warning for an iteration with no usable preference pair (it trains nothing: M_{t+1} = M_t), or None.

    metrics: the pairs stage's (or the train stage's summary, which carries its train/ keys)."""
    if metrics.get("pairs/policy_pairs", 1) and metrics.get("train/steps", 1):
        return None
    bad = metrics.get("train/bad_samples_per_GBS")
    why = f" (bad samples per global batch: {bad:.3g}; see judge/parse_failure_rate)" if bad is not None else ""
    return (f"iteration {t}: no usable preference pair{why}, so it trains nothing and M{t + 1} is M{t}; "
            "model.spin.require_pairs=true makes this an error")


# ----------------------------------------------------------------------------------------------------- train
def run_train(cfg: config.Config, lay: Layout, t: int) -> tuple[dict, list[dict]]:
    """M_t -> M_{t+1} on the iteration's pairs; the reference is M_t. Writes the model, train_history.jsonl and
    train_metrics.json."""
    from harness.train import train_dpo

    pairs = read_jsonl(lay.it(t) / "pairs.jsonl", PAIRS)
    pairs_metrics = read_json(lay.it(t) / "pairs_metrics.json")
    if not pairs and cfg.model.spin.require_pairs:
        raise DataError(f"{lay.it(t) / 'pairs.jsonl'}: {no_pairs_warning({'pairs/policy_pairs': 0}, t)}")
    policy = load_stage_policy(cfg, model_before(cfg, lay, t))
    history = []
    if pairs:
        history = train_dpo(policy, pairs, cfg, iteration=t, validation=validation_examples(cfg, lay, policy),
                            resume_dir=lay.resume(t))
    policy.save(lay.model(t), stage_config(cfg, "train"))
    _clear_resume(lay.resume(t))
    summary = _summary(history)
    summary.update({k: v for k, v in pairs_metrics.items() if k.startswith("train/")})
    return write_training(lay.it(t), summary, history)
