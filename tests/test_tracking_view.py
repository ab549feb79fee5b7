"""What a user sees of a run: the MLflow experiment (its kind, dataset inputs, time/ metrics), the stage's timings
file and summary line, and progress lines off a terminal. Real MLflow (sqlite store), real stages on the smoke world.
"""

from __future__ import annotations

import json
import re

import pytest

from harness import cli, timing
from harness.progress import LineProgress


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """prepare + generate for iteration 0 (no SFT iteration: M0 generates), tracked in a fresh sqlite store."""
    tmp = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp}/mlflow.db"
    args = ["-c", "experiments/smoke.yaml", "--root", str(tmp / "runs"), "tracking.enabled=true",
            f"tracking.tracking_uri={uri}", "model.spin.first_iteration_sft=false", "world.num_eft=8",
            "world.num_ift=8", "world.num_mft=4"]
    assert cli.main(["prepare", *args]) == 0
    assert cli.main(["generate", "--iteration", "0", *args]) == 0
    return tmp, uri


def test_experiment_opens_on_runs_and_lists_its_datasets(tracked):
    from mlflow import MlflowClient

    tmp, uri = tracked
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("self-rewarding")
    assert exp.tags["mlflow.experimentKind"] == "finetuning"  # MLflow 3 UI: the runs table, not the GenAI overview
    parent = next(r for r in client.search_runs([exp.experiment_id]) if "harness.pipeline_key" in r.data.tags
                  and "harness.iteration" not in r.data.tags)
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in client.get_run(parent.info.run_id).inputs.dataset_inputs}
    assert {"world/ift", "world/eft", "world/validation", "world/test"} <= inputs.keys()
    assert inputs["world/ift"]["mlflow.data.context"] == "train"
    assert inputs["world/test"]["mlflow.data.context"] == "test"
    ift = next(d.dataset for d in client.get_run(parent.info.run_id).inputs.dataset_inputs if d.dataset.name == "world/ift")
    assert json.loads(ift.profile)["num_rows"] == 8  # the split's records, not a placeholder
    assert str(tmp / "runs/world/ift.jsonl") in ift.source

    child = client.search_runs([exp.experiment_id], filter_string="tags.`harness.iteration` = '0'")[0]
    (prompts,) = client.get_run(child.info.run_id).inputs.dataset_inputs
    assert prompts.dataset.name == "prompts/iter0"
    assert {t.key: t.value for t in prompts.tags}["mlflow.data.context"] == "prompts"
    assert child.data.metrics["time/generate/wall_s"] > 0
    assert {"time/generate/startup_s", "time/generate/load_s", "time/generate/work_s",
            "time/generate/tracking_s"} <= child.data.metrics.keys()


def test_each_stage_writes_its_timings_apart_from_its_metrics(tracked):
    tmp, _ = tracked
    t = json.loads((tmp / "runs/timings/generate_0.json").read_text())
    assert t["stage"] == "generate@0"
    parts = t["time/startup_s"] + t["time/load_s"] + t["time/work_s"] + t["time/tracking_s"]
    assert t["time/wall_s"] == pytest.approx(parts, abs=0.01)  # the parts add up to the whole
    assert not any(k.startswith("time/") for k in json.loads((tmp / "runs/iter0/generate_metrics.json").read_text()))
    files = timing.write_summary(tmp / "runs")
    table = (tmp / "runs/timings/summary.md").read_text()
    assert "| generate@0 |" in table and "| prepare |" in table and "**total**" in table
    assert [f.name for f in files] == ["summary.md", "summary.csv", "summary.png"]


def test_summary_line_is_one_readable_line():
    line = timing.summary_line("pairs@1", {"pairs/policy_pairs": 12, "train/acc": 0.53125},
                               {"time/wall_s": 1.234, "time/startup_s": 0.4, "time/work_s": 0.8})
    assert line == "harness: pairs@1 done in 1.2 s (start-up 0.4 s): policy_pairs=12 acc=0.5312"


def test_progress_off_a_terminal_prints_periodic_lines(capsys):
    bar = LineProgress(4, "sft iter 0", "step", every=0.0)
    for _ in range(4):
        bar.update(1, loss=0.5)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5 and all(ln.startswith("harness: sft iter 0: ") for ln in lines)
    assert re.search(r"4/4 steps \(100%\), .* steps?/s, .*loss=0.5$", lines[-1])


def test_process_age_counts_the_interpreter_start():
    age = timing.process_age()
    assert age is None or 0 < age < 24 * 3600
    assert timing.CLOCK.now() >= (age or 0) - 1
