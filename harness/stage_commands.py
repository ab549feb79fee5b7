"""The pipeline's `harness <stage>` commands: set up (config, layout, torchrun, torch), run the stage's one function
(harness.stages, harness.judge_stages, harness.evaluate) under MLflow and the timer, then write its timings and print
its summary line. harness.cli parses the arguments and dispatches here.
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness import config
from harness.io import stage_outputs
from harness.timing import CLOCK


def load_config(args) -> config.Config:
    path = None if args.config in ("none", "") else args.config
    return config.load(path, args.overrides, warn=lambda m: print(m, file=sys.stderr))


def setup(args) -> tuple[config.Config, object]:
    import random

    import harness.determinism  # noqa: F401 - sets the NVTE_*/CUBLAS flags before any model import
    from harness.layout import Layout, log_dir

    cfg = load_config(args)
    if cfg.trainer.devices * cfg.trainer.num_nodes > 1:  # data parallel (torch is needed then anyway)
        from harness import parallel

        if parallel.needs_launch(cfg):  # trainer.devices > 1 outside torchrun: run this command under torchrun
            sys.exit(parallel.relaunch(cfg, args.argv))
        parallel.setup(cfg)
    random.seed(cfg.seed)  # torch is set up where a model is first loaded or built (torch_setup)
    return cfg, Layout(Path(args.root) if args.root else log_dir(cfg))


def torch_setup(cfg: config.Config) -> None:
    """torch's import, threads, seeds and device (harness.parallel), counted as model loading: stages without a model
    skip it."""
    from harness.determinism import torch_ready

    with CLOCK.phase("load"):
        torch_ready(cfg.seed)
        from harness import parallel

        parallel.setup(cfg)


def check_iteration(cfg: config.Config, t: int, *, sft: bool = False) -> int:
    n = cfg.trainer.self_rewarding.max_iterations
    if not 0 <= t < n:
        raise config.ConfigError(f"--iteration {t}: trainer.self_rewarding.max_iterations={n} allows 0..{n - 1}")
    if not sft and t == 0 and cfg.model.spin.first_iteration_sft:
        raise config.ConfigError("--iteration 0 is the SFT iteration (model.spin.first_iteration_sft=true): run `harness sft`")
    return t


def cmd_prepare(args) -> int:
    from harness import stages, tracking

    cfg, lay = setup(args)
    with tracking.stage_run(cfg, "prepare") as tr:
        CLOCK.stage_begins()
        if cfg.pretrained_checkpoint.restore_from_path is None:
            torch_setup(cfg)
        with stage_outputs(lay.world, lay.base_model):
            out = stages.prepare(cfg, lay)
        if tr:
            tr.log_metrics({f"prepare/{k}": v for k, v in out.items()}, parent=True)
            for name, context in (("ift", "train"), ("eft", "train"), ("mft", "train"), ("validation", "validation"),
                                  ("test", "test")):
                tr.log_dataset(lay.world / f"{name}.jsonl", f"world/{name}", context, parent=True)
    finish(lay, "prepare", None, out, tr)
    return 0


def cmd_sft(args) -> int:
    from harness import stages, tracking
    from harness.layout import sft_files

    cfg, lay = setup(args)
    if not cfg.model.spin.first_iteration_sft:
        raise config.ConfigError("harness sft runs iteration 0 only with model.spin.first_iteration_sft=true")
    with tracking.stage_run(cfg, "sft", 0) as tr:
        CLOCK.stage_begins()
        torch_setup(cfg)
        with stage_outputs(lay.it(0)):
            summary, history = stages.run_sft(cfg, lay)
        if tr:
            tr.log_history(history)
            tr.log_metrics(summary, step=0)
            tag_resume(tr, history)
            for name, path in sft_files(cfg, lay).items():
                tr.log_dataset(path, f"sft/{name}", "train")
    finish(lay, "sft", None, summary, tr)
    return 0


def cmd_sft_baseline(args) -> int:
    from harness import stages, tracking
    from harness.evaluate import run_evaluate_baseline

    cfg, lay = setup(args)
    if not stages.use_sft_baseline(cfg):
        raise config.ConfigError("harness sft_baseline needs the task world, model.spin.first_iteration_sft=true and "
                            "model.sft.baseline=true")
    with tracking.stage_run(cfg, "sft_baseline") as tr:
        CLOCK.stage_begins()
        torch_setup(cfg)
        with stage_outputs(lay.baseline):
            summary, history = stages.run_sft(cfg, lay, baseline=True)
            metrics = run_evaluate_baseline(cfg, lay)
        if tr:
            tr.log_metrics({f"sft_baseline/{k.split('/')[-1]}": v for k, v in {**summary, **metrics}.items()},
                           parent=True)
            tag_resume(tr, history)
    finish(lay, "sft_baseline", None, {**summary, **metrics}, tr)
    return 0


def iteration_stages() -> dict:
    """Each iteration stage's one home: a function (cfg, lay, t) that does the stage's whole job, its files included,
    and returns its metrics (train: (metrics, history))."""
    from harness import evaluate, judge_stages, stages

    return {"generate": stages.run_generate, "judge": judge_stages.run_judge, "meta_judge": judge_stages.run_meta_judge,
            "pairs": stages.run_pairs, "train": stages.run_train, "evaluate": evaluate.run_evaluate}


def stage_command(name: str):
    """`harness <name> --iteration t`: set up, run the stage's function under MLflow and the timer, log its metrics."""

    def cmd(args) -> int:
        from harness import stages, tracking

        cfg, lay = setup(args)
        t = check_iteration(cfg, args.iteration, sft=name == "evaluate")
        with tracking.stage_run(cfg, name, t) as tr:
            CLOCK.stage_begins()
            if name != "pairs" and (name != "meta_judge" or cfg.model.spin.use_meta_judge):
                torch_setup(cfg)
            with stage_outputs(lay.it(t)):  # all of the stage's outputs, or (on any error) none of them
                out = iteration_stages()[name](cfg, lay, t)
            metrics, history = out if isinstance(out, tuple) else (out, [])
            warning = stages.no_pairs_warning(metrics, t) if name in ("pairs", "train") else None
            if warning:
                print(f"harness: WARNING: {warning}", file=sys.stderr)
            if tr:
                tr.log_history(history)
                tag_resume(tr, history)
                if name == "evaluate":  # the run's headline numbers: on the pipeline run too
                    tr.log_metrics(metrics, step=t, parent=True)
                tr.log_metrics(metrics, step=t)
                if warning:
                    tr.set_tags({"harness.warning": warning})
                    tr.set_tags({f"harness.warning.iter{t}": warning}, parent=True)
                _MLFLOW_EXTRAS.get(name, lambda *a: None)(tr, cfg, lay, t)
        finish(lay, name, t, metrics, tr)
        return 0

    return cmd


def finish(lay, stage: str, t: int | None, metrics: dict, tr) -> None:
    """The stage's timings (timings/<stage>.json and MLflow time/<stage>/...) and its one summary line."""
    from harness.io import write_json
    from harness.timing import stage_name, summary_line, timings_file

    times = CLOCK.metrics()
    write_json(timings_file(lay.root, stage, t), {"stage": stage_name(stage, t), **times})
    if tr:  # the runs are attached by now: this goes straight to MLflow
        tr.log_metrics({f"time/{stage}/{k.split('/', 1)[1]}": v for k, v in times.items()}, step=t or 0)
    print(summary_line(stage_name(stage, t), metrics, times), flush=True)


def tag_resume(tr, history) -> None:
    """A resumed training stage says so in MLflow too (train.History already said it on stderr)."""
    note = getattr(history, "resume_note", None)
    if note:
        tr.set_tags({"harness.resumed": note})


def _log_pairs_table(tr, cfg, lay, t: int, n: int = 32) -> None:
    from harness.io import read_jsonl

    rows = read_jsonl(lay.it(t) / "pairs.jsonl")[:n]
    tr.log_table({k: [str(r[k]) for r in rows] for k in ("kind", "prompt", "chosen", "rejected", "chosen_score",
                                                        "rejected_score")}, "pairs_sample.json")


def _log_prompts(tr, cfg, lay, t: int) -> None:
    from harness.layout import prompts_file

    tr.log_dataset(prompts_file(cfg, lay, t), f"prompts/iter{t}", "prompts")


_MLFLOW_EXTRAS = {"pairs": _log_pairs_table, "generate": _log_prompts}  # what a stage logs beyond its metrics


def cmd_report(args) -> int:
    from harness import tracking
    from harness.evaluate import run_report
    from harness.io import atomic_path
    from harness.timing import write_summary

    cfg, lay = setup(args)
    with tracking.stage_run(cfg, "report", finish_parent=True) as tr:
        CLOCK.stage_begins()
        out = Path(args.out)
        with atomic_path(out) as tmp:
            final = run_report(cfg, lay, tmp)
        summary = write_summary(lay.root)  # where the time went: kept apart from the bit-identical report
        if tr:
            tr.log_metrics({f"final/{k}": v for k, v in final.items()}, parent=True)
            tr.log_artifact(out / "report.md", "report", parent=True)
            tr.log_artifact(out / "iterations.csv", "report", parent=True)
            for png in sorted((out / "plots").glob("*.png")):
                tr.log_artifact(png, "report/plots", parent=True)
            for f in summary:
                tr.log_artifact(f, "timings", parent=True)
            tr.log_artifact("dvc.lock", parent=True)
            tr.log_artifact("params.yaml", parent=True)
            tr.set_tags({"dvc_lock_hash": tracking.file_tag("dvc.lock")}, parent=True)
            if cfg.tracking.log_model:
                tr.log_artifact(lay.model(cfg.trainer.self_rewarding.max_iterations - 1), "model", parent=True)
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    finish(lay, "report", None, final, tr)
    return 0
