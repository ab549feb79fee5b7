"""`harness ...`: the argument parser and the commands that are not pipeline stages (config, pipeline, exp, sweep,
table, export-nemo); the pipeline's stage commands are harness.stage_commands'. Each parses paths + config and calls
one function.

    harness config show model.spin.use_meta_judge=true model.spin.meta_judge_pcnt=0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import config, stage_commands
from harness.io import DataError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="params.yaml",
                   help="params file (default: params.yaml; 'none' for the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="NeMo/Hydra overrides: key=value, +key=value, ++key=value, ~key")


def cmd_config_show(args) -> int:
    print(config.dump(stage_commands.load_config(args)), end="")
    return 0


def cmd_config_keys(args) -> int:
    from harness.config_keys import markdown_table

    print(markdown_table())
    return 0


def cmd_pipeline(args) -> int:
    from harness import pipeline
    from harness.io import write_text

    cfg = stage_commands.load_config(args)
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

    cfg, _ = stage_commands.setup(args)
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
    stage_parser("prepare", "task world (when no data is configured) and tiny base model M0",
                 stage_commands.cmd_prepare)
    stage_parser("sft", "iteration 0: SFT on gold answers (IFT) and judge data (EFT) -> M1", stage_commands.cmd_sft)
    stage_parser("sft_baseline", "the papers' SFT baseline (IFT only) and its test answers",
                 stage_commands.cmd_sft_baseline)
    helps = {"generate": "N responses per prompt from M_t", "judge": "k judge samples per response by M_t",
             "meta_judge": "Meta-Rewarding: M_t judges its judgements -> judge pairs",
             "pairs": "preference pairs (length control, bad samples, judge-pair mixing)",
             "train": "preference training M_t -> M_t+1", "evaluate": "oracle / judge evaluation of M_t+1"}
    for name in STAGES:
        stage_parser(name, helps[name], stage_commands.stage_command(name), iteration=True)
    stage_parser("report", "markdown table and plots over iterations", stage_commands.cmd_report).add_argument(
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
