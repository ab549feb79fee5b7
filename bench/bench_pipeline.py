"""Wall time of the main job: the default `dvc repro` from a fresh project, a no-change `dvc repro`, and a re-run
after changing length_control (which must re-run pairs, train and evaluate only), as a ratio to the full run.

    python bench/bench_pipeline.py [overrides...]   # prints one JSON object as the last line
    pytest bench/bench_pipeline.py                  # the same, through pytest-benchmark (one round)

Targets (issue 5): full run under 10 minutes on a 2-core CPU, no-change run under 10 s, length_control re-run a small
fraction of the full run. The project is the repository's own params.yaml (tracking on, sqlite MLflow store), copied
into a temporary git repository, so nothing in the working tree is touched.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import make_project, run  # noqa: E402

CHANGE = "model.spin.length_control=[0,0,0.1,0.1]"


def _ran(stdout: str) -> list[str]:
    return [ln.split("'")[1] for ln in stdout.splitlines() if ln.startswith("Running stage")]


def measure(overrides: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proj = make_project(Path(tmp) / "proj", experiment="params.yaml", overrides=list(overrides))
        out = {"bench": "pipeline"}
        for name, cmd in (("full", ["dvc", "repro"]), ("noop", ["dvc", "repro"]),
                          ("length_control", ["dvc", "exp", "run", "-S", CHANGE])):
            t = time.perf_counter()
            stdout = run(cmd, proj).stdout
            out[f"{name}_seconds"] = round(time.perf_counter() - t, 2)
            out[f"{name}_stages_run"] = len(_ran(stdout))
            if name == "length_control":
                out["length_control_stages"] = _ran(stdout)
        out["length_control_vs_full"] = round(out["length_control_seconds"] / out["full_seconds"], 3)
        return out


def test_bench_pipeline(benchmark):
    res = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    assert res["noop_stages_run"] == 0 and res["full_stages_run"] > 0


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1:])))
