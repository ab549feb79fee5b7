"""Optuna sweeps over the real pipeline: every trial is a `dvc repro` in its own git worktree on a shared DVC cache.

    harness sweep experiments/sweep.yaml                      # n_trials from the space file
    harness sweep experiments/sweep.yaml --n-jobs 2           # two trials at a time
    harness sweep experiments/sweep.yaml --worker-index 1     # a second command on the same storage

Why worktrees: each trial needs its own params.yaml and outputs, and DVC's run cache (shared through
`dvc cache dir`) lets a trial restore every stage whose command, deps and params it shares with an earlier trial
instead of recomputing it (iteration 1's generate and judge do not read beta, lr, length_control or meta_judge_pcnt).
A completed trial is saved as the DVC experiment `<study>-t<number>`; `dvc exp apply <name> && dvc repro` brings it
back into the workspace (from the cache), `dvc repro --force` after that recomputes it (bit-identical).

MLflow (harness.sweep_mlflow): a parent run for the study; a child run per trial, which is also the trial's
pipeline run.

Workers: trials are asked under a file lock (next to a sqlite storage), so workers on one machine never run more than
n_trials; on a shared RDB across machines the count can overshoot by at most one trial per extra worker. A running
trial records Optuna's RDB heartbeat; a worker that starts fails the trials whose heartbeat stopped (their worker
died, on any machine) with `optuna.storages.fail_stale_trials`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness import config
from harness.io import file_lock
from harness.sweep_mlflow import Mlflow
from harness.sweep_space import Space, SweepError, load_space, make_pruner, make_sampler, override, project_sqlite

HEARTBEAT_INTERVAL_S = 60  # a running trial's heartbeat period
GRACE_PERIOD_S = 180  # no heartbeat for this long: the trial's worker is dead


class TrialFailed(RuntimeError):
    """A trial's pipeline failed; the trial is recorded as FAIL and the study goes on."""


# ----------------------------------------------------------------------------------------------------- helpers
def _sh(cmd: list[str], cwd: Path, env: dict | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}\n")
    if p.returncode != 0:
        tail = (p.stderr or p.stdout)[-2000:]
        raise TrialFailed(f"`{' '.join(cmd)}` in {cwd} failed ({p.returncode}):\n{tail}")
    return p


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _lock_path(url: str, repo: Path) -> Path:
    return Path(url[len("sqlite:///"):] + ".lock") if url.startswith("sqlite") else repo / ".sweep" / "ask.lock"


def _repo_root(cwd: Path) -> Path:
    p = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SweepError(f"{cwd}: not a git repository (a sweep saves each trial as a DVC experiment)")
    root = Path(p.stdout.strip())
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode:
        raise SweepError(f"{root}: the repository has no commit yet (trials are worktrees of HEAD)")
    # Trials run the code at HEAD under DVC's code deps: uncommitted code would be cached under the wrong hashes.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True).stdout.splitlines()
    dirty = [ln[3:] for ln in dirty if ln[3:] not in ("params.yaml", "dvc.yaml", "dvc.lock")]
    if dirty:
        raise SweepError(f"uncommitted changes in {', '.join(dirty[:5])}: commit or stash them before a sweep, so "
                         "every trial is recorded against the code that ran it")
    return root


def _cache_dir(repo: Path) -> str:
    out = subprocess.run([_bin("dvc"), "cache", "dir"], cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        raise SweepError(f"{repo}: `dvc cache dir` failed: {out.stderr.strip()}")
    return str((repo / out.stdout.strip()).resolve())


# ----------------------------------------------------------------------------------------------------- trial
@dataclass
class Context:
    repo: Path
    space: Space
    base: str | None  # the params file the trials start from
    cache_dir: str
    metric: str
    direction: str
    mlflow: Mlflow
    keep_worktrees: bool = False


def run_trial(ctx: Context, trial) -> float:
    """One trial: worktree, trial params, `dvc repro evaluate@t` per iteration (reported to the pruner), the rest of
    the pipeline, `dvc exp save`. Returns the objective; raises optuna.TrialPruned or TrialFailed."""
    import optuna

    sp = ctx.space
    sampled = {p.key: p.suggest(trial) for p in sp.params}
    cfg = config.load(ctx.base, [*sp.overrides, *(override(k, v) for k, v in sampled.items())], warn=None)
    name = f"{sp.study_name}-t{trial.number}"
    wt = ctx.repo / ".sweep" / sp.study_name / f"t{trial.number}"
    log = ctx.repo / ".sweep" / sp.study_name / f"t{trial.number}.log"
    trial.set_user_attr("overrides", [override(k, v) for k, v in sampled.items()])
    trial.set_user_attr("host_pid", f"{socket.gethostname()}:{os.getpid()}")
    env = {**os.environ, "HARNESS_PIPELINE_KEY": f"{name}-{trial._trial_id}", "DVC_EXP_NAME": name,
           "MLFLOW_TRACKING_URI": ctx.mlflow.uri, "DVC_NO_ANALYTICS": "1"}
    run_id = ctx.mlflow.trial_run(env["HARNESS_PIPELINE_KEY"], name, cfg, trial.number, sampled)
    print(f"[sweep {sp.study_name}] trial {trial.number} started: {sampled}", flush=True)
    state, value, tags = "FAIL", None, {}
    try:
        with file_lock(ctx.repo / ".sweep" / "git.lock"):
            if wt.exists():
                _sh(["git", "worktree", "remove", "--force", str(wt)], ctx.repo)
            _sh(["git", "worktree", "prune"], ctx.repo)
            _sh(["git", "worktree", "add", "-q", "--detach", str(wt), "HEAD"], ctx.repo)
        from harness import pipeline

        (wt / "params.yaml").write_text(config.dump(cfg), encoding="utf-8")
        (wt / "dvc.yaml").write_text(pipeline.render(cfg), encoding="utf-8")
        dvc = _bin("dvc")
        _sh([dvc, "cache", "dir", "--local", ctx.cache_dir], wt)
        root = wt / (cfg.exp_manager.explicit_log_dir or "runs")
        iters = config.self_rewarding_iterations(cfg)
        target = iters[-1] if sp.iteration is None else sp.iteration
        if target not in iters:
            raise TrialFailed(f"objective.iteration={target} is not a self-rewarding iteration ({iters})")
        for t in iters:
            _sh([dvc, "repro", f"evaluate@{t}"], wt, env, log)
            metrics = json.loads((root / f"iter{t}" / "eval.json").read_text(encoding="utf-8"))
            if ctx.metric not in metrics:
                raise TrialFailed(f"{root}/iter{t}/eval.json has no metric {ctx.metric!r} "
                                  f"(has: {', '.join(k for k in metrics if k.startswith('eval/'))})")
            v = float("nan") if metrics[ctx.metric] is None else float(metrics[ctx.metric])  # null: undefined
            ctx.mlflow.log_eval(run_id, t, metrics)
            if not math.isfinite(v):
                raise TrialFailed(f"{ctx.metric} at iteration {t} is {v}")
            trial.report(v, step=t)
            if t == target:
                value = v
            print(f"[sweep {sp.study_name}] trial {trial.number} iteration {t}: {ctx.metric}={v:.4f}", flush=True)
            if t < iters[-1] and trial.should_prune():
                state = "PRUNED"
                raise optuna.TrialPruned(f"pruned at iteration {t} ({ctx.metric}={v:.4f})")
        _sh([dvc, "repro"], wt, env, log)
        with file_lock(ctx.repo / ".sweep" / "git.lock"):  # exp save uses shared refs/exps/exec/* refs
            _sh([dvc, "exp", "save", "-f", "-q", "-n", name, "-I", str(root.relative_to(wt))], wt, env, log)
        state = "COMPLETE"
        tags = {"dvc_experiment": name, "reproduce": f"dvc exp apply {name} && dvc repro"}
        trial.set_user_attr("dvc_experiment", name)
        return value
    except TrialFailed as e:
        tags = {"error": str(e)[:4000], "log": str(log)}
        raise
    finally:
        ctx.mlflow.finish(run_id, state, tags, value if state == "COMPLETE" else None)
        print(f"[sweep {sp.study_name}] trial {trial.number} {state.lower()}"
              + (f": {ctx.metric}={value:.4f}" if value is not None and state == "COMPLETE" else "")
              + (f" (worktree kept: {wt})" if state == "FAIL" else ""), flush=True)
        if state != "FAIL" and not ctx.keep_worktrees and wt.exists():
            with file_lock(ctx.repo / ".sweep" / "git.lock"):
                subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ctx.repo, capture_output=True)


# ----------------------------------------------------------------------------------------------------- study
@contextlib.contextmanager
def heartbeat(storage, trial_id: int):
    """Records the trial's RDB heartbeat every HEARTBEAT_INTERVAL_S while the block runs (Study.optimize does this
    itself; the sweep asks and tells under a file lock to cap n_trials, so it keeps the heartbeat here)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    th = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def sweep(space_file: str, base: str | None, overrides: list[str] = (), *, n_trials: int | None = None,
          n_jobs: int | None = None, timeout: float | None = None, worker_index: int = 0, storage: str | None = None,
          study_name: str | None = None, keep_worktrees: bool = False, cwd: Path | None = None) -> dict:
    import optuna

    space, cfg = load_space(space_file, base, list(overrides))
    space.n_trials = n_trials or space.n_trials
    space.n_jobs = n_jobs or space.n_jobs
    space.timeout = timeout or space.timeout
    space.storage = storage or space.storage
    space.study_name = study_name or space.study_name
    space.metric, space.direction = space.objective(cfg)
    repo = _repo_root(cwd or Path.cwd())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = project_sqlite(space.storage, repo)
    lock = _lock_path(url, repo)
    with file_lock(lock):  # two workers starting together would both create the schema
        kw = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        rdb = optuna.storages.RDBStorage(url, engine_kwargs=kw, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                         grace_period=GRACE_PERIOD_S)
        study = optuna.create_study(study_name=space.study_name, storage=rdb,
                                    direction=space.direction, sampler=make_sampler(space, worker_index),
                                    pruner=make_pruner(space), load_if_exists=True)
    if study.direction.name.lower() != space.direction:
        raise SweepError(f"{space.path}: study {space.study_name!r} in {url} exists with direction "
                         f"{study.direction.name.lower()}, not {space.direction}")
    study.set_user_attr("objective", space.metric)
    ctx = Context(repo=repo, space=space, base=base, cache_dir=_cache_dir(repo), metric=space.metric,
                  direction=space.direction, mlflow=Mlflow(cfg, space, url, repo), keep_worktrees=keep_worktrees)
    with _quiet_experimental():  # trials of dead workers would count toward n_trials
        optuna.storages.fail_stale_trials(study)
    deadline = time.monotonic() + space.timeout if space.timeout else None
    print(f"[sweep {space.study_name}] {url}: {space.n_trials} trials, {space.n_jobs} at a time, objective "
          f"{space.metric} ({space.direction})", flush=True)

    def worker() -> None:
        while deadline is None or time.monotonic() < deadline:
            with file_lock(lock):  # count and ask atomically: never more than n_trials
                if len(study.get_trials(deepcopy=False)) >= space.n_trials:
                    return
                with _quiet_experimental():  # "heartbeat is supposed to be used with Study.optimize": kept below
                    trial = study.ask()
            try:
                with heartbeat(rdb, trial._trial_id):
                    value = run_trial(ctx, trial)
                study.tell(trial, value)
            except optuna.TrialPruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            except Exception as e:  # a failed trial is recorded and the study goes on
                print(f"[sweep {space.study_name}] trial {trial.number} failed: {e}", file=sys.stderr, flush=True)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)

    threads = [threading.Thread(target=worker, name=f"sweep-worker-{i}") for i in range(space.n_jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return summarize(study, ctx)


def summarize(study, ctx: Context) -> dict:
    """Best trial, parameter importances and an optimization-history plot, written and logged to the study run."""
    import optuna

    sp = ctx.space
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    out = {"study": sp.study_name, "objective": sp.metric, "direction": sp.direction, "trials": len(trials),
           "states": {k: v for k, v in states.items() if v}}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    lines = [f"# Sweep {sp.study_name}", "", f"Objective: `{sp.metric}` ({sp.direction}); trials: "
             + ", ".join(f"{v} {k.lower()}" for k, v in out["states"].items()), ""]
    if complete:
        best = study.best_trial
        name = best.user_attrs.get("dvc_experiment", f"{sp.study_name}-t{best.number}")
        out.update(best_trial=best.number, best_value=best.value, best_params=best.params, best_experiment=name,
                   reproduce=f"dvc exp apply {name} && dvc repro")
        lines += [f"Best: trial {best.number}, value {best.value:.4f}, DVC experiment `{name}`",
                  f"Reproduce: `dvc exp apply {name} && dvc repro` (add `--force` to recompute every stage)", "",
                  "| param | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in best.params.items()), ""]
    importances = {}
    if len(complete) >= 2:
        with contextlib.suppress(Exception), _quiet_experimental():  # needs >= 2 distinct values of some param
            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    out["importances"] = importances
    if importances:
        lines += ["| param | importance (Optuna's default evaluator) |", "|---|---|",
                  *(f"| {k} | {v:.3f} |" for k, v in importances.items()),
                  ""]
    lines += ["| trial | state | value | params |", "|---|---|---|---|"]
    lines += [f"| {t.number} | {t.state.name} | {'' if t.value is None else f'{t.value:.4f}'} | {t.params} |"
              for t in trials]
    d = ctx.repo / "sweeps" / sp.study_name
    d.mkdir(parents=True, exist_ok=True)
    from harness.io import write_json, write_text

    write_text(d / "summary.md", "\n".join(lines) + "\n")
    write_json(d / "summary.json", out)
    plot = d / "optimization_history.png"
    if complete:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization.matplotlib import plot_optimization_history

        with contextlib.suppress(Exception), _quiet_experimental():
            ax = plot_optimization_history(study, target_name=sp.metric)
            ax.figure.savefig(plot, dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
    ml = ctx.mlflow
    if ml.enabled:
        for f in (d / "summary.md", d / "summary.json", plot):
            if f.exists():
                ml.client.log_artifact(ml.study_run, str(f), "sweep")
        if complete:
            for k, v in {"best_value": best.value, "trials_complete": len(complete)}.items():
                ml.client.log_metric(ml.study_run, k, float(v))
            ml.client.set_tag(ml.study_run, "optuna.best_trial", str(best.number))
            for r in ml.client.search_runs([ml.exp_id], f"tags.`mlflow.parentRunId` = '{ml.study_run}'"):
                is_best = r.data.tags.get("optuna.trial_number") == str(best.number)
                if is_best or r.data.tags.get("optuna.best") == "true":
                    ml.client.set_tag(r.info.run_id, "optuna.best", str(is_best).lower())
        ml.client.set_terminated(ml.study_run, "FINISHED")
    print("\n".join(lines), flush=True)
    return out


@contextlib.contextmanager
def _quiet_experimental():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

