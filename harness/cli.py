"""`harness <stage>`: thin entry points; each parses paths + config and calls one function.

    harness config show model.spin.use_meta_judge=true model.spin.meta_judge_pcnt=0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import config
from harness.io import DataError, stage_outputs
from harness.timing import CLOCK


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="params.yaml",
                   help="params file (default: params.yaml; 'none' for the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="NeMo/Hydra overrides: key=value, +key=value, ++key=value")


def load_config(args) -> config.Config:
    path = None if args.config in ("none", "") else args.config
    return config.load(path, args.overrides, warn=lambda m: print(m, file=sys.stderr))


def cmd_config_show(args) -> int:
    print(config.dump(load_config(args)), end="")
    return 0


def cmd_config_keys(args) -> int:
    from harness.config_keys import markdown_table

    print(markdown_table())
    return 0


def _setup(args) -> tuple[config.Config, object]:
    import random

    import harness.determinism  # noqa: F401 - sets the NVTE_*/CUBLAS flags before any model import
    from harness.layout import Layout, log_dir

    cfg = load_config(args)
    if cfg.trainer.devices * cfg.trainer.num_nodes > 1:  # data parallel (torch is needed then anyway)
        from harness import parallel

        if parallel.needs_launch(cfg):  # trainer.devices > 1 outside torchrun: run this command under torchrun
            sys.exit(parallel.relaunch(cfg, args.argv))
        parallel.setup(cfg)
    random.seed(cfg.seed)  # torch is set up where a model is first loaded or built (_torch)
    return cfg, Layout(Path(args.root) if args.root else log_dir(cfg))


def _torch(cfg: config.Config) -> None:
    """torch's import, threads, seeds and device (harness.parallel), counted as model loading: stages without a model
    skip it."""
    from harness.determinism import torch_ready

    with CLOCK.phase("load"):
        torch_ready(cfg.seed)
        from harness import parallel

        parallel.setup(cfg)


def _iteration(cfg: config.Config, t: int, *, sft: bool = False) -> int:
    n = cfg.trainer.self_rewarding.max_iterations
    if not 0 <= t < n:
        raise config.ConfigError(f"--iteration {t}: trainer.self_rewarding.max_iterations={n} allows 0..{n - 1}")
    if not sft and t == 0 and cfg.model.spin.first_iteration_sft:
        raise config.ConfigError("--iteration 0 is the SFT iteration (model.spin.first_iteration_sft=true): run `harness sft`")
    return t


def cmd_prepare(args) -> int:
    from harness import stages, tracking

    cfg, lay = _setup(args)
    with tracking.stage_run(cfg, "prepare") as tr:
        CLOCK.stage_begins()
        if cfg.pretrained_checkpoint.restore_from_path is None:
            _torch(cfg)
        with stage_outputs(lay.world, lay.base_model):
            out = stages.prepare(cfg, lay)
        if tr:
            tr.log_metrics({f"prepare/{k}": v for k, v in out.items()}, parent=True)
            for name, context in (("ift", "train"), ("eft", "train"), ("mft", "train"), ("validation", "validation"),
                                  ("test", "test")):
                tr.log_dataset(lay.world / f"{name}.jsonl", f"world/{name}", context, parent=True)
    _done(lay, "prepare", None, out, tr)
    return 0


def cmd_sft(args) -> int:
    from harness import stages, tracking
    from harness.layout import sft_files

    cfg, lay = _setup(args)
    if not cfg.model.spin.first_iteration_sft:
        raise config.ConfigError("harness sft runs iteration 0 only with model.spin.first_iteration_sft=true")
    with tracking.stage_run(cfg, "sft", 0) as tr:
        CLOCK.stage_begins()
        _torch(cfg)
        with stage_outputs(lay.it(0)):
            summary, history = stages.run_sft(cfg, lay)
        if tr:
            tr.log_history(history)
            tr.log_metrics(summary, step=0)
            _tag_resume(tr, history)
            for name, path in sft_files(cfg, lay).items():
                tr.log_dataset(path, f"sft/{name}", "train")
    _done(lay, "sft", None, summary, tr)
    return 0


def cmd_sft_baseline(args) -> int:
    from harness import stages, tracking
    from harness.evaluate import run_evaluate_baseline

    cfg, lay = _setup(args)
    if not stages.use_sft_baseline(cfg):
        raise config.ConfigError("harness sft_baseline needs the task world, model.spin.first_iteration_sft=true and "
                            "model.sft.baseline=true")
    with tracking.stage_run(cfg, "sft_baseline") as tr:
        CLOCK.stage_begins()
        _torch(cfg)
        with stage_outputs(lay.baseline):
            summary, history = stages.run_sft(cfg, lay, baseline=True)
            metrics = run_evaluate_baseline(cfg, lay)
        if tr:
            tr.log_metrics({f"sft_baseline/{k.split('/')[-1]}": v for k, v in {**summary, **metrics}.items()},
                           parent=True)
            _tag_resume(tr, history)
    _done(lay, "sft_baseline", None, {**summary, **metrics}, tr)
    return 0


def iteration_stages() -> dict:
    """Each iteration stage's one home: a function (cfg, lay, t) that does the stage's whole job, its files included,
    and returns its metrics (train: (metrics, history))."""
    from harness import evaluate, stages

    return {"generate": stages.run_generate, "judge": stages.run_judge, "meta_judge": stages.run_meta_judge,
            "pairs": stages.run_pairs, "train": stages.run_train, "evaluate": evaluate.run_evaluate}


def _stage(name: str):
    """`harness <name> --iteration t`: set up, run the stage's function under MLflow and the timer, log its metrics."""

    def cmd(args) -> int:
        from harness import stages, tracking

        cfg, lay = _setup(args)
        t = _iteration(cfg, args.iteration, sft=name == "evaluate")
        with tracking.stage_run(cfg, name, t) as tr:
            CLOCK.stage_begins()
            if name != "pairs" and (name != "meta_judge" or cfg.model.spin.use_meta_judge):
                _torch(cfg)
            with stage_outputs(lay.it(t)):  # all of the stage's outputs, or (on any error) none of them
                out = iteration_stages()[name](cfg, lay, t)
            metrics, history = out if isinstance(out, tuple) else (out, [])
            warning = stages.no_pairs_warning(metrics, t) if name in ("pairs", "train") else None
            if warning:
                print(f"harness: WARNING: {warning}", file=sys.stderr)
            if tr:
                tr.log_history(history)
                _tag_resume(tr, history)
                if name == "evaluate":  # the run's headline numbers: on the pipeline run too
                    tr.log_metrics(metrics, step=t, parent=True)
                tr.log_metrics(metrics, step=t)
                if warning:
                    tr.set_tags({"harness.warning": warning})
                    tr.set_tags({f"harness.warning.iter{t}": warning}, parent=True)
                _MLFLOW_EXTRAS.get(name, lambda *a: None)(tr, cfg, lay, t)
        _done(lay, name, t, metrics, tr)
        return 0

    return cmd


def _done(lay, stage: str, t: int | None, metrics: dict, tr) -> None:
    """The stage's timings (timings/<stage>.json and MLflow time/<stage>/...) and its one summary line."""
    from harness.io import write_json
    from harness.timing import stage_name, summary_line, timings_file

    times = CLOCK.metrics()
    write_json(timings_file(lay.root, stage, t), {"stage": stage_name(stage, t), **times})
    if tr:  # the runs are attached by now: this goes straight to MLflow
        tr.log_metrics({f"time/{stage}/{k.split('/', 1)[1]}": v for k, v in times.items()}, step=t or 0)
    print(summary_line(stage_name(stage, t), metrics, times), flush=True)


def _tag_resume(tr, history) -> None:
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

    cfg, lay = _setup(args)
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
    _done(lay, "report", None, final, tr)
    return 0


def cmd_pipeline(args) -> int:
    from harness import pipeline
    from harness.io import write_text

    cfg = load_config(args)
    if args.action == "write":
        write_text(args.dvc_yaml, pipeline.render(cfg))
        print(f"wrote {args.dvc_yaml}")
    else:
        pipeline.check(cfg, Path(args.dvc_yaml))
        print(f"{args.dvc_yaml} is up to date")
    return 0


def cmd_exp_run(args) -> int:
    from harness import experiments

    return experiments.run(args.file, args.overrides, name=args.name, repro=args.repro, force=args.force,
                           queue=args.queue, warn=lambda m: print(m, file=sys.stderr))


def cmd_sweep(args) -> int:
    from harness.sweep import sweep

    path = None if args.config in ("none", "") else args.config
    out = sweep(args.space, path, args.overrides, n_trials=args.n_trials, n_jobs=args.n_jobs, timeout=args.timeout,
                worker_index=args.worker_index, storage=args.storage, study_name=args.study_name,
                keep_worktrees=args.keep_worktrees)
    return 0 if out.get("best_trial") is not None else 1


def cmd_export_nemo(args) -> int:
    from harness.models import nemo
    from harness.models.base import load_policy

    cfg, _ = _setup(args)
    policy = load_policy(args.src, backend=cfg.model.backend)
    nemo.write(policy, args.out, policy.config)
    print(f"wrote {args.out}")
    return 0


def cmd_table(args) -> int:
    from harness import table

    spec = table.load_spec(args.spec)
    if args.action == "run":
        table.run(spec, jobs=args.jobs)
    else:
        out = Path(args.out or f"results/{spec.name}")
        print(table.collect(spec, out, Path(args.readme) if args.readme else None), end="")
        print(f"wrote {out}/table.md, per_seed.csv, table.png, results.json")
    return 0


STAGES = ("generate", "judge", "meta_judge", "pairs", "train", "evaluate")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="harness", description="Self-Rewarding / Meta-Rewarding alignment harness")
    sub = ap.add_subparsers(dest="command", required=True, metavar="<stage>")
    cfg = sub.add_parser("config", help="inspect the resolved configuration")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    show = cfg_sub.add_parser("show", help="print the resolved config (params file + overrides) as YAML")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    cfg_sub.add_parser("keys", help="print every config key with its meaning and default (README's table)"
                       ).set_defaults(func=cmd_config_keys)

    def stage_parser(name: str, help: str, func, iteration: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--root", default=None, help="output directory (default: exp_manager.explicit_log_dir or runs)")
        if iteration:
            p.add_argument("--iteration", "-i", type=int, required=True, help="absolute iteration t (0 = SFT)")
        _add_config_args(p)
        p.set_defaults(func=func)
        return p

    pipe = sub.add_parser("pipeline", help="write or check dvc.yaml (generated from the stages' params and code)")
    pipe.add_argument("action", choices=["write", "check"])
    pipe.add_argument("--dvc-yaml", default="dvc.yaml")
    _add_config_args(pipe)
    pipe.set_defaults(func=cmd_pipeline)
    stage_parser("prepare", "task world (when no data is configured) and tiny base model M0", cmd_prepare)
    stage_parser("sft", "iteration 0: SFT on gold answers (IFT) and judge data (EFT) -> M1", cmd_sft)
    stage_parser("sft_baseline", "the papers' SFT baseline (IFT only) and its test answers", cmd_sft_baseline)
    helps = {"generate": "N responses per prompt from M_t", "judge": "k judge samples per response by M_t",
             "meta_judge": "Meta-Rewarding: M_t judges its judgements -> judge pairs",
             "pairs": "preference pairs (length control, bad samples, judge-pair mixing)",
             "train": "preference training M_t -> M_t+1", "evaluate": "oracle / judge evaluation of M_t+1"}
    for name in STAGES:
        stage_parser(name, helps[name], _stage(name), iteration=True)
    stage_parser("report", "markdown table and plots over iterations", cmd_report).add_argument(
        "--out", default="runs/report", help="report directory")
    exp = sub.add_parser("exp", help="named experiments (experiments/<name>.yaml) as DVC experiments")
    exp_run = exp.add_subparsers(dest="action", required=True).add_parser(
        "run", help="write the file's resolved config as params.yaml (and dvc.yaml), then `dvc exp run --name <name>`")
    exp_run.add_argument("file", help="named configuration, e.g. experiments/meta_rewarding.yaml")
    exp_run.add_argument("overrides", nargs="*", help="NeMo/Hydra overrides on top of the file")
    exp_run.add_argument("--name", "-n", default=None, help="DVC experiment name (default: the file's stem)")
    exp_run.add_argument("--force", "-f", action="store_true", help="overwrite an experiment of the same name")
    exp_run.add_argument("--queue", action="store_true", help="queue it (`dvc queue start` runs the queue)")
    exp_run.add_argument("--repro", action="store_true", help="plain `dvc repro` in the workspace instead")
    exp_run.set_defaults(func=cmd_exp_run)
    ex = sub.add_parser("export-nemo", help="write a checkpoint (HF directory or .nemo) as a .nemo archive")
    ex.add_argument("src", help="checkpoint directory or .nemo")
    ex.add_argument("out", help="the .nemo archive to write")
    _add_config_args(ex)
    ex.set_defaults(func=cmd_export_nemo, root=None)
    tb = sub.add_parser("table", help="the multi-seed results table: seeds x conditions as DVC experiments")
    tb.add_argument("action", choices=["run", "collect"],
                    help="run: queue and run the missing experiments; collect: mean +- sd table, plot, MLflow")
    tb.add_argument("spec", help="table spec YAML (see experiments/table.yaml)")
    tb.add_argument("--jobs", type=int, default=1, help="experiments run at once (run)")
    tb.add_argument("--out", default=None, help="output folder (collect; default results/<name>)")
    tb.add_argument("--readme", default=None, help="also put the table between the table markers of this file")
    tb.set_defaults(func=cmd_table)
    sw = sub.add_parser("sweep", help="Optuna study over the pipeline: each trial a `dvc repro` sharing DVC's cache")
    sw.add_argument("space", help="search-space YAML (see experiments/sweep.yaml)")
    sw.add_argument("--n-trials", type=int, default=None, help="total trials in the study (default: the space file's)")
    sw.add_argument("--n-jobs", type=int, default=None, help="trials run at once by this command")
    sw.add_argument("--timeout", type=float, default=None, help="seconds after which no new trial starts")
    sw.add_argument("--worker-index", type=int, default=0,
                    help="distinct per command sharing one storage (offsets the sampler seed)")
    sw.add_argument("--storage", default=None, help="Optuna RDB URL (default: the space file's, sqlite:///optuna.db)")
    sw.add_argument("--study-name", default=None)
    sw.add_argument("--keep-worktrees", action="store_true", help="keep each trial's worktree under .sweep/")
    _add_config_args(sw)
    sw.set_defaults(func=cmd_sweep)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow the options (`harness sweep space.yaml --n-jobs 2 seed=3`), as in NeMo's commands.
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # for a relaunch under torchrun (trainer.devices > 1)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (config.ConfigError, DataError) as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
