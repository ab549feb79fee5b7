"""dvc.yaml, generated from one table of what each stage reads (params and code), so the two never drift.

    harness pipeline write        # rewrite dvc.yaml for params.yaml's max_iterations / first_iteration_sft
    harness pipeline check        # fail if dvc.yaml is stale

A stage lists only the params it reads: changing model.spin.length_control re-runs pairs, train and evaluate, not
generate or judge. Checkpoints save the same subset of the config (`stage_config`), so a model directory's hash
does not change when an unrelated key does (that would defeat DVC's cache and Optuna's trial sharing).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from harness import config

_MODEL = ["seed", "model.backend", "trainer.precision", "trainer.accelerator", "model.tensor_model_parallel_size",
          "model.encoder_seq_length", "model.data.prompt_format", "model.data.chat_prompt_tokens"]
_GEN = ["model.spin.sampling_params", "model.spin.length_params", "model.spin.rollout_micro_batch_size"]
_JUDGE = ["model.spin.judge_template", "model.spin.llm_judge_prompt", "model.spin.judge_score_low",
          "model.spin.judge_score_high", "model.spin.judge_reward_regex"]
_LOOP = ["model.micro_batch_size", "model.global_batch_size", "model.optim.betas", "model.optim.eps",
         "model.optim.weight_decay", "model.optim.sched", "trainer.self_rewarding.limit_train_batches",
         "trainer.self_rewarding.limit_val_batches", "trainer.self_rewarding.val_check_interval",
         "trainer.self_rewarding.save_interval", "trainer.self_rewarding.gradient_clip_val",
         "model.data.validation_ds", "trainer.devices", "trainer.num_nodes"]

STAGE_PARAMS: dict[str, list[str]] = {
    "prepare": ["seed", "world", "model.tiny", "pretrained_checkpoint.restore_from_path", "model.data.train_ds.file_path",
                "trainer.self_rewarding.max_iterations", "model.spin.llm_meta_judge_prompt", *_JUDGE],
    "sft": [*_MODEL, *_LOOP, "model.sft", "model.data.sft_ds", "model.data.judge_train_ds",
            "model.spin.first_iteration_sft"],
    "sft_baseline": [*_MODEL, *_LOOP, *_GEN, "model.sft", "model.data.sft_ds", "model.spin.first_iteration_sft"],
    "generate": [*_MODEL, *_GEN, "model.spin.num_responses_to_gen", "model.data.train_ds.file_path"],
    "judge": [*_MODEL, *_GEN, *_JUDGE, "model.spin.num_evals_to_average", "model.spin.cream"],
    "meta_judge": [*_MODEL, *_GEN, *_JUDGE, "model.spin.use_meta_judge", "model.spin.llm_meta_judge_prompt",
                   "model.spin.meta_judge_reward_regex", "model.spin.meta_max_relative_pcnt"],
    "pairs": ["seed", "model.global_batch_size", "model.spin.num_responses_to_gen", "model.spin.length_control",
              "model.spin.use_meta_judge", "model.spin.meta_judge_pcnt", "model.spin.require_pairs",
              "model.spin.pair_labels", "model.spin.cream", "model.data.train_ds.file_path"],
    "train": [*_MODEL, *_LOOP, "model.optim.lr", "model.optim.name", "trainer.self_rewarding.max_epochs",
              "trainer.self_rewarding.max_steps", "model.spin.ref_policy_kl_penalty", "model.spin.preference_loss",
              "model.spin.preference_loss_weight", "model.spin.sft_loss_weight", "model.spin.gt_reward_scale",
              "model.spin.preference_average_log_probs", "model.spin.sft_average_log_probs",
              "model.data.train_ds.max_seq_length", "model.data.train_ds.shuffle", "model.spin.require_pairs"],
    "evaluate": [*_MODEL, *_GEN, *_JUDGE, "model.micro_batch_size", "model.spin.first_iteration_sft", "model.sft.baseline",
                 "model.data.validation_ds", "trainer.self_rewarding.limit_val_batches"],
    "report": ["trainer.self_rewarding.max_iterations", "model.spin.first_iteration_sft", "model.spin.use_meta_judge"],
}

_BASE_CODE = ["harness/config.py", "harness/schema.py", "harness/config_checks.py", "harness/io.py", "harness/rows.py",
              "harness/determinism.py", "harness/layout.py", "harness/stages.py", "harness/cli.py",
              "harness/stage_commands.py", "harness/data/sft.py", "harness/parallel.py"]
_MODEL_CODE = ["harness/models", "harness/generation"]
STAGE_CODE: dict[str, list[str]] = {
    "prepare": ["harness/data/world.py", "harness/models", "harness/judging/templates.py"],
    "sft": ["harness/models", "harness/train.py", "harness/batches.py", "harness/losses.py", "harness/packing.py"],
    "sft_baseline": [*_MODEL_CODE, "harness/train.py", "harness/batches.py", "harness/losses.py", "harness/packing.py",
                     "harness/evaluate.py", "harness/data/world.py"],
    "generate": _MODEL_CODE,
    "judge": [*_MODEL_CODE, "harness/judging", "harness/judge_stages.py"],
    "meta_judge": [*_MODEL_CODE, "harness/judging", "harness/judge_stages.py"],
    "pairs": ["harness/pairs.py", "harness/cream.py", "harness/telemetry.py", "harness/data/world.py"],
    "train": ["harness/models", "harness/train.py", "harness/batches.py", "harness/losses.py", "harness/packing.py"],
    "evaluate": [*_MODEL_CODE, "harness/judging", "harness/evaluate.py", "harness/train.py", "harness/batches.py",
                 "harness/packing.py", "harness/data/world.py", "harness/telemetry.py"],
    "report": ["harness/evaluate.py"],
}


def stage_config(cfg: config.Config, stage: str) -> dict:
    """The part of the resolved config a stage reads: saved next to its checkpoints."""
    out: dict = {}
    tree = config.to_dict(cfg)
    for key in STAGE_PARAMS[stage]:
        node, dst = tree, out
        parts = key.split(".")
        for p in parts[:-1]:
            node, dst = node[p], dst.setdefault(p, {})
        dst[parts[-1]] = node[parts[-1]]
    return out


def _stage(cmd: str, stage: str, deps: list[str], outs: list[str], metrics: list[str] = (), plots: list = ()) -> dict:
    d = {"cmd": cmd, "deps": [*deps, *_BASE_CODE, *STAGE_CODE[stage]], "params": list(STAGE_PARAMS[stage]),
         "outs": list(outs)}
    if metrics:
        d["metrics"] = [{m: {"cache": False}} for m in metrics]
    if plots:
        d["plots"] = list(plots)
    return d


def dvc_yaml(cfg: config.Config) -> dict:
    """The pipeline graph: prepare -> sft -> per iteration (generate, judge, meta_judge, pairs, train, evaluate)
    -> report. DVC's foreach cannot chain items, so each item names its previous model explicitly. Every data file
    a stage reads (harness.layout.data_files: the task world, or the user's jsonl files) is one of its deps."""
    from harness import layout

    n = cfg.trainer.self_rewarding.max_iterations
    sft = cfg.model.spin.first_iteration_sft
    first = 1 if sft else 0
    tiny = cfg.pretrained_checkpoint.restore_from_path is None
    r = str(layout.log_dir(cfg))
    lay = layout.Layout(Path(r))

    def data(stage: str, t: int | None = None) -> list[str]:
        return [str(p) for p in layout.data_files(cfg, lay, stage, t)]

    stages: dict = {}
    made = [*([f"{r}/world"] if layout.use_world(cfg) else []), *([f"{r}/base"] if tiny else [])]
    if made:  # a user checkpoint on user data needs no prepare stage
        stages["prepare"] = _stage(f"harness prepare --root {r}", "prepare", [], made)
    base = str(layout.initial_model(cfg, lay))
    if sft:
        stages["sft"] = _stage(f"harness sft --root {r}", "sft", [base, *data("sft")],
                               [f"{r}/iter0/model", f"{r}/iter0/train_history.jsonl"], [f"{r}/iter0/train_metrics.json"])
    # the papers' SFT baseline (IFT only): a second reference for win rates (task world only)
    baseline = layout.use_sft_baseline(cfg)
    base_answers = [f"{r}/sft_baseline/eval_answers.jsonl"] if baseline else []
    if baseline:
        stages["sft_baseline"] = _stage(
            f"harness sft_baseline --root {r}", "sft_baseline", [base, *data("sft_baseline")],
            [f"{r}/sft_baseline/model", f"{r}/sft_baseline/train_history.jsonl", *base_answers],
            [f"{r}/sft_baseline/train_metrics.json", f"{r}/sft_baseline/eval.json"])
    m1_answers = [f"{r}/iter0/eval_answers.jsonl"] if sft else []
    if sft:
        stages["evaluate_sft"] = _stage(f"harness evaluate --root {r} --iteration 0", "evaluate",
                                        [f"{r}/iter0/model", *data("evaluate"), *base_answers],
                                        [f"{r}/iter0/eval_answers.jsonl"], [f"{r}/iter0/eval.json"])
    # a dict (not a list) so DVC names the stages generate@1, generate@2, ... after the iteration
    # prev: M_t, the model iteration t starts from; prev2: M_{t-1}, CREAM's previous judge (M0 for the first)
    cream = cfg.model.spin.cream != "none"
    items = {str(t): {"it": t, "prev": str(layout.model_before(cfg, lay, t)), "prompts": data("generate", t)[0],
                      **({"prev2": str(layout.model_before(cfg, lay, max(t - 1, 0)))} if cream else {})}
             for t in range(first, n)}
    it, d = "${item.it}", f"{r}/iter${{item.it}}"
    per_iter = {
        "generate": (["${item.prev}", "${item.prompts}"], [f"{d}/responses.jsonl"], [f"{d}/generate_metrics.json"]),
        "judge": (["${item.prev}", *(["${item.prev2}"] if cream else []), f"{d}/responses.jsonl"],
                  [f"{d}/judged.jsonl"], [f"{d}/judge_metrics.json"]),
        "meta_judge": (["${item.prev}", f"{d}/judged.jsonl"], [f"{d}/judge_pairs.jsonl"],
                       [f"{d}/meta_judge_metrics.json"]),
        "pairs": ([f"{d}/judged.jsonl", f"{d}/judge_pairs.jsonl"], [f"{d}/pairs.jsonl"], [f"{d}/pairs_metrics.json"]),
        "train": (["${item.prev}", f"{d}/pairs.jsonl", f"{d}/pairs_metrics.json", *data("train")],
                  [f"{d}/model", f"{d}/train_history.jsonl"], [f"{d}/train_metrics.json"]),
        "evaluate": ([f"{d}/model", *data("evaluate"), *m1_answers, *base_answers],
                     [f"{d}/eval_answers.jsonl"], [f"{d}/eval.json"]),
    }
    for name, (deps, outs, metrics) in per_iter.items():
        body = _stage(f"harness {name} --root {r} --iteration {it}", name, deps, outs, metrics)
        stages[name] = {"foreach": items, "do": body}
    evals = [f"{r}/iter{t}/eval.json" for t in range(n)] if sft else [f"{r}/iter{t}/eval.json" for t in range(first, n)]
    trained = [f"{r}/iter{t}/train_metrics.json" for t in range(n)]
    stages["report"] = _stage(f"harness report --root {r} --out {r}/report", "report", [*evals, *trained],
                              [f"{r}/report/report.md"], [f"{r}/report/metrics.json"],
                              [{f"{r}/report/iterations.csv": {"cache": False}}, {f"{r}/report/plots": {"cache": False}}])
    cols = ["eval_oracle_reward", "eval_win_rate_vs_m1", "eval_judge_pairwise_acc", "eval_judge_spearman"]
    plots = [{"policy and judge over iterations": {"x": "iteration", "y": {f"{r}/report/iterations.csv": cols}}},
             f"{r}/report/plots"]
    return {"stages": stages, "plots": plots}


def render(cfg: config.Config) -> str:
    head = ("# Generated by `harness pipeline write` from harness/pipeline.py (STAGE_PARAMS, STAGE_CODE) and\n"
            "# params.yaml's trainer.self_rewarding.max_iterations / model.spin.first_iteration_sft. Do not edit.\n")
    return head + yaml.safe_dump(dvc_yaml(cfg), sort_keys=False, width=120)


def check(cfg: config.Config, path: Path = Path("dvc.yaml")) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != render(cfg):
        raise config.ConfigError(f"{path} does not match params.yaml (max_iterations={cfg.trainer.self_rewarding.max_iterations}"
                            f", first_iteration_sft={cfg.model.spin.first_iteration_sft}): run `harness pipeline write`")
