"""The multi-seed results table: seeds x conditions as DVC experiments, then mean +- sd over seeds.

    harness table run experiments/table.yaml                    # queue each (condition, seed), run the queue
    harness table collect experiments/table.yaml --readme README.md   # table, plot, MLflow run (and README's table)

`run` queues one DVC experiment per (condition, seed), `dvc exp run --queue -n <table>-<condition>-s<seed> -S seed=..
-S <the condition's overrides>`, seeds outermost, and runs the queue one at a time (`dvc exp run --run-all -j 1`):
the conditions of a seed share prepare, SFT and iteration 1's sampling through DVC's run cache. Experiments that
already exist are skipped, so an interrupted run continues where it stopped (tasks a killed run left "Running" are
marked failed first: `dvc exp run --run-all` would wait for them forever). `collect` reads the experiments back
with `dvc exp show --json`, and writes table.md (mean +- sd per condition and model), per_seed.csv, table.png (error
bars = sd over seeds) and results.json to the output folder, logs them to an MLflow run, and with --readme replaces
the text between `<!-- table:begin -->` and `<!-- table:end -->`.

A spec's `reference` condition adds a paired comparison: each other condition's last model minus the reference's,
seed by seed (the conditions of a seed share M1), mean +- sd of those differences and how many seeds are above 0.
Seeds move M1 a lot (its oracle score's sd over seeds is larger than any condition's effect); pairing removes that.

A spec's `targets` (DVC stages, e.g. `[evaluate@1, pairs@1]`) runs only those stages and what they depend on: a
probe of the first iterations at a fraction of the table's cost; the last model evaluated is then the "last model".
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness import config

METRICS = ["eval/oracle_reward", "eval/win_rate_vs_m1", "eval/judge_own_pairwise_acc", "eval/judge_pairwise_acc",
           "pairs/oracle_correct_frac", "pairs/oracle_reversed_frac"]
BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"


class TableError(config.ConfigError):
    """A bad table spec or a DVC command that failed; the message names the file, key or command."""


@dataclass
class Spec:
    name: str
    seeds: list[int]
    conditions: dict[str, list[str]]  # display name -> overrides (key=value)
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    base: str = "params.yaml"
    reference: str | None = None  # a condition: the others' last models are compared with it seed by seed
    targets: list[str] = field(default_factory=list)  # DVC stages to run (default: the whole pipeline)

    def exp_name(self, cond: str, seed: int) -> str:
        return f"{self.name}-{slug(cond)}-s{seed}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def load_spec(path: str | Path) -> Spec:
    p = Path(path)
    if not p.is_file():
        raise TableError(f"table spec not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TableError(f"{p}: not valid YAML: {e}") from None
    unknown = set(raw) - {"name", "seeds", "conditions", "metrics", "base", "reference", "targets"}
    if unknown:
        raise TableError(f"{p}: unknown key(s) {', '.join(sorted(unknown))}; expected name, seeds, conditions, "
                         "metrics, base, reference, targets")
    seeds, conds = raw.get("seeds"), raw.get("conditions")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise TableError(f"{p}: seeds must be a non-empty list of integers, got {seeds!r}")
    if not isinstance(conds, dict) or not conds:
        raise TableError(f"{p}: conditions must map a name to a list of overrides, got {conds!r}")
    for name, ovs in conds.items():
        if not isinstance(ovs, list) or not all(isinstance(o, str) for o in ovs):
            raise TableError(f"{p}: conditions.{name} must be a list of key=value strings, got {ovs!r}")
    slugs = [slug(c) for c in conds]
    if len(set(slugs)) != len(slugs) or not all(slugs):
        raise TableError(f"{p}: condition names must differ in letters and digits: {list(conds)}")
    targets = raw.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise TableError(f"{p}: targets must be a list of DVC stage names (e.g. [evaluate@1, pairs@1]), got {targets!r}")
    ref = raw.get("reference")
    if ref is not None and ref not in conds:
        raise TableError(f"{p}: reference must name one of the conditions ({', '.join(conds)}), got {ref!r}")
    spec = Spec(name=slug(str(raw.get("name", p.stem))), seeds=seeds, conditions=conds,
                metrics=raw.get("metrics", list(METRICS)), base=raw.get("base", "params.yaml"), reference=ref,
                targets=targets)
    for cond, ovs in conds.items():  # every condition must load before any experiment runs
        try:
            config.load(spec.base, [*ovs, f"seed={spec.seeds[0]}"], warn=None)
        except config.ConfigError as e:
            raise TableError(f"{p}: conditions.{cond}: {e}") from None
    return spec


def _dvc(args: list[str], env: dict | None = None, capture: bool = True) -> str:
    exe = Path(sys.executable).parent / "dvc"
    p = subprocess.run([str(exe) if exe.exists() else "dvc", *args], env=env, text=True,
                       capture_output=capture)
    if p.returncode != 0:
        raise TableError(f"`dvc {' '.join(args)}` failed ({p.returncode}): {(p.stderr or p.stdout or '')[-2000:]}")
    return p.stdout or ""


def run(spec: Spec, jobs: int = 1) -> list[str]:
    """Queue the missing experiments (seeds outermost) and run the queue; returns the names queued."""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.split("\n")
    dirty = [ln[3:] for ln in dirty if ln.strip() and ln[3:] not in ("dvc.lock",)]
    if dirty:
        raise TableError(f"uncommitted changes in {', '.join(dirty[:5])}: commit them first (queued experiments run "
                         "the committed code and params)")
    cfg = config.load(spec.base, warn=None)
    env = dict(os.environ)
    uri = cfg.tracking.tracking_uri or env.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # experiments run in temp dirs
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    have = set(_dvc(["exp", "list", "--name-only"]).split())
    queued = []
    for seed in spec.seeds:
        for cond, ovs in spec.conditions.items():
            name = spec.exp_name(cond, seed)
            if name in have:
                continue
            sets = [a for o in [f"seed={seed}", *ovs] for a in ("-S", o)]
            _dvc(["exp", "run", "--queue", "-q", "-n", name, *sets, *spec.targets], env)
            queued.append(name)
            print(f"[table {spec.name}] queued {name}", flush=True)
    if queued:
        stale = kill_stale_tasks(env)
        if stale:
            print(f"[table {spec.name}] marked failed the tasks a killed run left running: {', '.join(stale)}", flush=True)
        _dvc(["exp", "run", "--run-all", "-j", str(jobs)], env, capture=False)
    missing = [spec.exp_name(c, s) for s in spec.seeds for c in spec.conditions
               if spec.exp_name(c, s) not in set(_dvc(["exp", "list", "--name-only"]).split())]
    if missing:
        raise TableError(f"experiments that did not complete: {', '.join(missing)} (see `dvc queue logs <name>`)")
    return queued


def kill_stale_tasks(env: dict | None = None) -> list[str]:
    """Task ids `dvc queue status` shows Running while no queue worker is active, marked failed (`dvc queue kill`).

    A run killed mid-experiment (Ctrl+C twice, a session's end) leaves its task Running; `dvc exp run --run-all`
    follows every active task and so would wait for it forever. With a worker active they may be real: left alone.
    """
    status = _dvc(["queue", "status"], env)
    if not re.search(r"^Worker status: 0 active\b", status, re.M):
        return []
    stale = [ln.split()[0] for ln in status.splitlines() if ln.split()[-1:] == ["Running"]]
    if stale:
        _dvc(["queue", "kill", *stale], env)
    return stale


# ----------------------------------------------------------------------------------------------------- collect
def experiments() -> dict[str, dict]:
    """{experiment name: {metrics file path: its metrics}} from `dvc exp show --json`."""
    out = {}
    for branch in json.loads(_dvc(["exp", "show", "--json", "--no-pager"]) or "[]"):
        for exp in branch.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name") and rev.get("data"):
                    out[rev["name"]] = {path: m.get("data", {}) for path, m in rev["data"].get("metrics", {}).items()}
    return out


def per_seed_rows(spec: Spec, exps: dict[str, dict]) -> list[dict]:
    """One row per (condition, seed, model M_{t+1}) with the spec's metrics; raises if an experiment is missing."""
    cfg = config.load(spec.base, warn=None)
    root = cfg.exp_manager.explicit_log_dir or "runs"
    rows = []
    for cond in spec.conditions:
        for seed in spec.seeds:
            name = spec.exp_name(cond, seed)
            if name not in exps:
                raise TableError(f"experiment {name} not found: run `harness table run` first")
            for t in range(cfg.trainer.self_rewarding.max_iterations):
                files = {k: exps[name].get(f"{root}/iter{t}/{k}.json", {}) for k in ("eval", "pairs_metrics")}
                merged = {**files["pairs_metrics"], **files["eval"]}
                if not files["eval"]:
                    continue
                rows.append({"condition": cond, "seed": seed, "model": f"M{t + 1}", "iteration": t,
                             **{m: merged.get(m) for m in spec.metrics}})
    return rows


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vs = [v for v in values if v is not None and not math.isnan(v)]
    if not vs:
        return math.nan, math.nan
    return statistics.fmean(vs), (statistics.stdev(vs) if len(vs) > 1 else math.nan)  # one seed: no spread


def summarize(spec: Spec, rows: list[dict]) -> list[dict]:
    """mean and sd over seeds per (condition, model); a metric absent for a model (M1 has no pairs) stays NaN."""
    out = []
    for cond in spec.conditions:
        for model in sorted({r["model"] for r in rows if r["condition"] == cond}, key=lambda m: int(m[1:])):
            sel = [r for r in rows if r["condition"] == cond and r["model"] == model]
            out.append({"condition": cond, "model": model, "n": len(sel),
                        **{m: _mean_sd([r[m] for r in sel]) for m in spec.metrics}})
    return out


def paired(spec: Spec, rows: list[dict]) -> list[dict]:
    """Last model, each condition minus spec.reference on the same seed, for the spec's eval/ metrics:
    {condition, metric, per_seed (None where either side lacks the value), mean, sd, above (seeds > 0), n}."""
    if spec.reference is None:
        return []
    last = max(r["iteration"] for r in rows)
    at = {(r["condition"], r["seed"]): r for r in rows if r["iteration"] == last}
    out = []
    for cond in spec.conditions:
        if cond == spec.reference:
            continue
        for m in (m for m in spec.metrics if m.startswith("eval/")):
            per = []
            for seed in spec.seeds:
                a, b = at.get((cond, seed), {}).get(m), at.get((spec.reference, seed), {}).get(m)
                per.append(None if a is None or b is None else a - b)
            mean, sd = _mean_sd(per)
            out.append({"condition": cond, "metric": m, "per_seed": per, "mean": mean, "sd": sd,
                        "above": sum(d > 0 for d in per if d is not None), "n": sum(d is not None for d in per)})
    return out


def _cell(ms: tuple[float, float], sign: str = "") -> str:
    if math.isnan(ms[0]):
        return "-"
    return f"{ms[0]:{sign}.3f}" if math.isnan(ms[1]) else f"{ms[0]:{sign}.3f} ± {ms[1]:.3f}"


def markdown(spec: Spec, summary: list[dict], rows: list[dict], pairs: list[dict]) -> str:
    short = [m.split("/", 1)[1] for m in spec.metrics]
    lines = [f"| condition | model | n | {' | '.join(short)} |", "|---|---|---|" + "---|" * len(short)]
    lines += [f"| {s['condition']} | {s['model']} | {s['n']} | " + " | ".join(_cell(s[m]) for m in spec.metrics) + " |"
              for s in summary]
    last = max(r["iteration"] for r in rows)
    wr = "eval/win_rate_vs_m1"
    if wr in spec.metrics:
        lines += ["", f"Last model (M{last + 1}) win rate vs M1 per seed ({', '.join(map(str, spec.seeds))}):", ""]
        for cond in spec.conditions:
            per = [r[wr] for s in spec.seeds for r in rows
                   if r["condition"] == cond and r["seed"] == s and r["iteration"] == last]
            lines.append(f"- {cond}: " + ", ".join("-" if v is None else f"{v:.3f}" for v in per))
    if pairs:
        ms = list(dict.fromkeys(p["metric"] for p in pairs))
        lines += ["", f"Last model (M{last + 1}) minus {spec.reference}, paired by seed (same M1): mean ± sd of the "
                  "differences, and the seeds above 0:", "",
                  f"| condition | {' | '.join(m.split('/', 1)[1] for m in ms)} |", "|---|" + "---|" * len(ms)]
        for cond in dict.fromkeys(p["condition"] for p in pairs):
            by = {p["metric"]: p for p in pairs if p["condition"] == cond}
            lines.append(f"| {cond} | " + " | ".join(
                "-" if not by[m]["n"] else f"{_cell((by[m]['mean'], by[m]['sd']), '+')} ({by[m]['above']}/{by[m]['n']})"
                for m in ms) + " |")
    return "\n".join(lines) + "\n"


def plot(spec: Spec, summary: list[dict], path: Path) -> dict[str, list[str]]:
    """table.png, one panel per headline metric; returns each panel's x tick labels (the models)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in ("eval/win_rate_vs_m1", "eval/oracle_reward", "eval/sample_oracle_reward",
                         "eval/judge_own_pairwise_acc", "pairs/oracle_correct_frac") if m in spec.metrics]
    models = sorted({int(s["model"][1:]) for s in summary})
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], shown):
        for k, cond in enumerate(spec.conditions):
            pts = [(int(s["model"][1:]) + 0.04 * (k - len(spec.conditions) / 2), *s[m]) for s in summary
                   if s["condition"] == cond and not math.isnan(s[m][0])]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=[0.0 if math.isnan(v) else v for v in e], marker="o", capsize=3, label=cond)
        ax.set_title(m, fontsize=9)
        ax.set_xticks(models, [f"M{t}" for t in models])  # models, not fractional iterations
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{spec.name}: mean ± sd over seeds {spec.seeds}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    ticks = {m: [t.get_text() for t in ax.get_xticklabels()] for ax, m in zip(axes[0], shown)}
    plt.close(fig)
    return ticks


def collect(spec: Spec, out_dir: Path, readme: Path | None = None, exps: dict | None = None) -> str:
    """Write the table, per-seed rows, plot and results.json to out_dir; log them to MLflow; return the markdown."""
    from harness.io import write_json, write_text

    rows = per_seed_rows(spec, experiments() if exps is None else exps)
    summary = summarize(spec, rows)
    pairs = paired(spec, rows)
    md = markdown(spec, summary, rows, pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "table.md", md)
    buf = io.StringIO()  # the csv module quotes a condition name with a comma in it ("Whole, max_length 72")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["condition", "seed", "model", *spec.metrics])
    writer.writerows([r["condition"], r["seed"], r["model"], *("" if r[m] is None else repr(r[m]) for m in spec.metrics)]
                     for r in rows)
    write_text(out_dir / "per_seed.csv", buf.getvalue())
    write_json(out_dir / "results.json", {"spec": spec.__dict__, "summary": [
        {**{k: s[k] for k in ("condition", "model", "n")}, **{m: {"mean": s[m][0], "sd": s[m][1]} for m in spec.metrics}}
        for s in summary], "paired": pairs})
    plot(spec, summary, out_dir / "table.png")
    if readme is not None:
        text = readme.read_text(encoding="utf-8")
        if BEGIN not in text or END not in text:
            raise TableError(f"{readme}: no {BEGIN} ... {END} markers to put the table between")
        head, rest = text.split(BEGIN, 1)
        write_text(readme, head + BEGIN + "\n" + md + END + rest.split(END, 1)[1])
    _log_mlflow(spec, summary, pairs, out_dir)
    return md


def _log_mlflow(spec: Spec, summary: list[dict], pairs: list[dict], out_dir: Path) -> None:
    cfg = config.load(spec.base, warn=None)
    if not cfg.tracking.enabled:
        return
    from mlflow import MlflowClient

    from harness import tracking

    client = MlflowClient(tracking.tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment_name)
    run = client.create_run(exp_id, run_name=f"table-{spec.name}",
                            tags={"harness.table": spec.name, **tracking.git_info()})
    rid = run.info.run_id
    client.log_param(rid, "seeds", json.dumps(spec.seeds))
    for cond, ovs in spec.conditions.items():
        client.log_param(rid, f"condition.{slug(cond)}", json.dumps(ovs)[:500])
    for s in summary:
        for m in spec.metrics:
            mean, sd = s[m]
            if not math.isnan(mean):
                step = int(s["model"][1:])
                client.log_metric(rid, f"{slug(s['condition'])}/{m}/mean", mean, step=step)
                if not math.isnan(sd):
                    client.log_metric(rid, f"{slug(s['condition'])}/{m}/sd", sd, step=step)
    for p in pairs:
        if not math.isnan(p["mean"]):
            client.log_metric(rid, f"minus-{slug(spec.reference)}/{slug(p['condition'])}/{p['metric']}/mean", p["mean"])
    for f in ("table.md", "per_seed.csv", "table.png", "results.json"):
        client.log_artifact(rid, str(out_dir / f), "table")
    client.set_terminated(rid, "FINISHED")
