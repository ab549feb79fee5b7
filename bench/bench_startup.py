"""Stage start-up: how long each stage of a full `dvc repro` takes to reach its own work, as a share of the pipeline.

    python bench/bench_startup.py                          # the default params.yaml; one JSON object last
    python bench/bench_startup.py -c experiments/smoke.yaml tracking.enabled=true

Every stage writes runs/timings/<stage>.json (harness.timing): start-up = process start (interpreter included) to
the stage's own code; load = torch's import, seeding and the model load (transformers' import included); first
work = start-up + load. Goals (issue 14): start-up + load <= 3 s for a stage with a model, start-up <= 1.5 s
for pairs and report (no model), and all stages' start-up <= 10% of the pipeline's wall time. Absolute seconds
depend on the machine and its load, so the same run also times bare interpreter starts (`python -c pass`,
`import torch`) in fresh processes: the `*_over_torch_import` ratios compare across machines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import make_project, run  # noqa: E402

NO_MODEL = ("pairs", "report")


def _fresh(code: str, repeats: int = 3) -> float:
    """Best wall time of a fresh interpreter running `code`."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.perf_counter() - t)
    return best


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else float("nan")


def measure(experiment: str = "params.yaml", overrides: list[str] = ()) -> dict:
    python_s, torch_s = _fresh("pass"), _fresh("import torch")
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        proj = make_project(Path(tmp) / "proj", experiment=experiment, overrides=list(overrides))
        t = time.perf_counter()
        run(["dvc", "repro"], proj)
        wall = time.perf_counter() - t
        rows = [json.loads(f.read_text()) for f in sorted((proj / "runs/timings").glob("*.json"))
                if not f.name.startswith("summary")]
    stages = {r["stage"]: r for r in rows}
    startup = sum(r["time/startup_s"] for r in rows)
    first = {s: r["time/startup_s"] + r.get("time/load_s", 0.0) for s, r in stages.items()}
    model = {s: v for s, v in first.items() if s.split("@")[0] not in NO_MODEL}
    no_model = {s: stages[s]["time/startup_s"] for s in stages if s.split("@")[0] in NO_MODEL}
    return {
        "bench": "startup",
        "experiment": experiment, "overrides": list(overrides),
        "stages": len(rows),
        "pipeline_seconds": round(wall, 2),
        "stage_wall_seconds_sum": round(sum(r["time/wall_s"] for r in rows), 2),
        "startup_seconds_sum": round(startup, 2),
        "startup_share_of_pipeline": round(startup / wall, 4),
        "first_work_share_of_pipeline": round(sum(first.values()) / wall, 4),
        "mlflow_share_of_pipeline": round(sum(r.get("time/tracking_s", 0.0) for r in rows) / wall, 4),
        "dvc_between_stages_share": round((wall - sum(r["time/wall_s"] for r in rows)) / wall, 4),
        "max_first_work_seconds_model_stage": round(max(model.values(), default=0.0), 3),
        "max_startup_seconds_no_model_stage": round(max(no_model.values(), default=0.0), 3),
        "mean_startup_seconds": round(startup / len(rows), 3),
        "python_start_seconds": round(python_s, 3),
        "torch_import_seconds": round(torch_s, 3),
        "mean_startup_over_torch_import": round(startup / len(rows) / torch_s, 3),
        "max_first_work_model_stage_over_torch_import": round(max(model.values(), default=0.0) / torch_s, 3),
        "per_stage_startup_s": {s: r["time/startup_s"] for s, r in stages.items()},
        "per_stage_first_work_s": {s: round(v, 3) for s, v in first.items()},
        "loadavg_before_after": [load_before, _load()],
    }


def test_bench_startup(benchmark):
    res = benchmark.pedantic(measure, args=("experiments/smoke.yaml",), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    assert res["stages"] > 0


if __name__ == "__main__":
    args = sys.argv[1:]
    exp = "params.yaml"
    if args[:1] in (["-c"], ["--config"]):
        exp, args = args[1], args[2:]
    print(json.dumps(measure(exp, args)))
