"""An Optuna sweep against the same trials run as independent full pipelines: what DVC's shared cache saves.

    python bench/bench_sweep.py [--trials 8] [--baseline-runs 8]   # one JSON object as the last line

1. `harness sweep experiments/sweep.yaml --n-trials N` on the embedded default (params.yaml), in a fresh temporary
   project with an empty DVC cache: trials restore every stage they share with an earlier trial (prepare, SFT,
   iteration 1's generate and judge) and the median pruner stops poor trials after an iteration.
2. Baseline, back to back on the same machine: the sweep's first `--baseline-runs` trials re-run each as one full
   `dvc repro` in its own fresh project and cache (the same params, so the same work a script without a shared cache
   does). With fewer baseline runs than trials, the baseline total is their mean times the trial count, and the JSON
   says so (`baseline_extrapolated`).

Tracking is off on both sides (MLflow's cost is not what is compared). Target (issue 6): ratio <= 0.6.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import make_project, run  # noqa: E402

BASE = ["tracking.enabled=false"]


def measure(trials: int = 8, baseline_runs: int = 8) -> dict:
    import optuna

    with tempfile.TemporaryDirectory() as tmp:
        proj = make_project(Path(tmp) / "sweep", experiment="params.yaml", overrides=BASE)
        t = time.perf_counter()
        run([sys.executable, "-m", "harness.cli", "sweep", "experiments/sweep.yaml", *BASE, "--n-trials", str(trials),
             "--study-name", "bench"], proj)
        sweep_s = time.perf_counter() - t
        study = optuna.load_study(study_name="bench", storage=f"sqlite:///{proj}/optuna.db")
        done = study.get_trials()
        states = {s: sum(tr.state.name == s for tr in done) for s in ("COMPLETE", "PRUNED", "FAIL")}
        fixed = ["model.spin.use_meta_judge=true"]  # experiments/sweep.yaml's overrides
        per_run = []
        for tr in done[:baseline_runs]:
            p = make_project(Path(tmp) / f"base{tr.number}", experiment="params.yaml",
                             overrides=[*BASE, *fixed, *tr.user_attrs["overrides"]])
            t = time.perf_counter()
            run(["dvc", "repro"], p)
            per_run.append(time.perf_counter() - t)
    baseline = sum(per_run) / len(per_run) * trials
    return {"bench": "sweep", "trials": trials, "states": states, "sweep_seconds": round(sweep_s, 1),
            "baseline_run_seconds": [round(s, 1) for s in per_run], "baseline_seconds": round(baseline, 1),
            "baseline_extrapolated": len(per_run) < trials, "sweep_vs_baseline": round(sweep_s / baseline, 3)}


def test_bench_sweep(benchmark):
    res = benchmark.pedantic(measure, kwargs={"trials": 3, "baseline_runs": 1}, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    assert sum(res["states"].values()) == 3


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--baseline-runs", type=int, default=8)
    a = ap.parse_args()
    print(json.dumps(measure(a.trials, a.baseline_runs)))
