"""`harness sweep`: Optuna trials that are real `dvc repro` runs sharing DVC's cache, recorded in MLflow and as DVC
experiments. One project runs a 3-trial smoke sweep with two workers on one sqlite storage (module fixture); the
tests then check Optuna, MLflow, pruning and that the best trial's documented command recomputes it identically.
Bad search-space files are checked without any pipeline (fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import config
from harness.sweep import load_space, override
from tests.conftest import ROOT, env, make_project, run

SPACE = """\
study_name: smoke
n_trials: 3
sampler: {name: random}
pruner: {name: none}
params:
  model.spin.ref_policy_kl_penalty: {type: float, low: 0.05, high: 0.5, log: true}
  model.spin.length_control: {type: categorical, choices: [0.0, 0.2], template: [0, 0, x]}
"""
EXPERIMENT = "sweep-test"  # its own MLflow experiment on the shared server


def harness(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, mlflow_server):
    proj = make_project(tmp_path_factory.mktemp("sweep") / "proj",
                        overrides=["tracking.enabled=true", f"tracking.experiment_name={EXPERIMENT}"])
    (proj / "space.yaml").write_text(SPACE)
    e = {**env(), "MLFLOW_TRACKING_URI": mlflow_server}
    # M1 first, so the two workers restore it from the shared cache instead of both training it
    run(["dvc", "repro", "-q", "evaluate_sft"], proj, env=e)
    workers = [subprocess.Popen(harness("sweep", "space.yaml", "--worker-index", str(i)), cwd=proj, env=e,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [w.communicate(timeout=1200)[0] for w in workers]
    for w, out in zip(workers, outs):
        assert w.returncode == 0, out[-4000:]
    import optuna

    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{proj}/optuna.db")
    return {"proj": proj, "env": e, "uri": mlflow_server, "outs": outs, "study": study}


@pytest.mark.slow
def test_two_workers_run_every_trial_once(swept):
    trials = swept["study"].get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert all(t.state.name == "COMPLETE" and 0.0 <= t.value <= 1.0 for t in trials)
    started = [ln for out in swept["outs"] for ln in out.splitlines() if "started:" in ln]
    assert sorted(int(ln.split("trial ")[1].split()[0]) for ln in started) == [0, 1, 2]  # none run twice
    assert all(any("started:" in ln for ln in out.splitlines()) for out in swept["outs"])  # both workers worked
    exps = run(["dvc", "exp", "list", "--name-only"], swept["proj"], env=swept["env"]).stdout.split()
    assert sorted(exps) == ["smoke-t0", "smoke-t1", "smoke-t2"]
    assert (swept["proj"] / "sweeps/smoke/summary.md").read_text().startswith("# Sweep smoke")


@pytest.mark.slow
def test_trials_share_the_dvc_cache(swept):
    """Iteration 1's generate and judge do not read beta or length_control: later trials restore them."""
    logs = [(swept["proj"] / f".sweep/smoke/t{n}.log").read_text() for n in range(3)]
    # trials 0 and 1 start together on two workers; trial 2 starts after one of them has filled the cache
    assert "Running stage 'generate@1'" not in logs[2] and "Stage 'generate@1' is cached" in logs[2]
    assert "Stage 'judge@1' is cached" in logs[2]
    assert all("Running stage 'sft'" not in log for log in logs)
    assert all("Running stage 'train@1'" in log for log in logs)  # train reads beta: never shared


@pytest.mark.slow
def test_mlflow_has_study_parent_and_trial_children(swept):
    from mlflow import MlflowClient

    client = MlflowClient(swept["uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], "tags.`harness.study` = 'smoke'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    study = swept["study"]
    for c in children:
        trial = study.trials[int(c.data.tags["optuna.trial_number"])]
        assert c.info.status == "FINISHED" and c.data.tags["optuna.state"] == "COMPLETE"
        assert c.data.metrics["objective"] == pytest.approx(trial.value)
        assert float(c.data.params["model.spin.ref_policy_kl_penalty"]) == pytest.approx(
            trial.params["model.spin.ref_policy_kl_penalty"])
        assert c.data.tags["dvc_experiment"] == f"smoke-t{trial.number}"
        assert sorted(m.step for m in client.get_metric_history(c.info.run_id, "eval/win_rate_vs_m1")) == [1, 2]
    best = [c for c in children if c.data.tags.get("optuna.best") == "true"]
    assert [c.data.tags["optuna.trial_number"] for c in best] == [str(study.best_trial.number)]
    assert parent.data.tags["optuna.best_trial"] == str(study.best_trial.number)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/summary.md", "sweep/optimization_history.png", "sweep/space.yaml"} <= arts


@pytest.mark.slow
def test_pruned_trial_is_pruned_in_optuna_and_mlflow(swept):
    proj = swept["proj"]
    (proj / "prune.yaml").write_text(SPACE.replace("smoke", "prune").replace("n_trials: 3", "n_trials: 1")
                                     .replace("{name: none}", "{name: threshold, lower: 2.0}"))
    p = run(harness("sweep", "prune.yaml"), proj, env=swept["env"], check=False)
    assert p.returncode == 1, p.stdout[-3000:]  # a study with no complete trial exits non-zero
    import optuna
    from mlflow import MlflowClient

    (trial,) = optuna.load_study(study_name="prune", storage=f"sqlite:///{proj}/optuna.db").get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]  # stopped after iteration 1
    client = MlflowClient(swept["uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`harness.study` = 'prune'")
    (child,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert child.data.tags["optuna.state"] == "PRUNED" and child.info.status == "KILLED"
    assert "prune-t0" not in run(["dvc", "exp", "list", "--name-only"], proj, env=swept["env"]).stdout


@pytest.mark.slow
def test_best_trial_reproduces_bit_identically(swept):
    """The documented command brings the trial back; forcing every trial-specific stage recomputes the same bytes."""
    proj, e, study = swept["proj"], swept["env"], swept["study"]
    name = study.best_trial.user_attrs["dvc_experiment"]
    run(["dvc", "exp", "apply", name], proj, env=e)
    run(["dvc", "repro"], proj, env=e)  # the documented command (restores from the cache)
    lock = (proj / "dvc.lock").read_text()
    metric = json.loads((proj / "runs/iter2/eval.json").read_text())["eval/win_rate_vs_m1"]
    assert metric == pytest.approx(study.best_value)
    out = run(["dvc", "repro", "--force", "--downstream", "pairs@1"], proj, env=e).stdout
    assert {"Running stage 'train@1'", "Running stage 'generate@2'", "Running stage 'train@2'"} <= {
        ln.rstrip(":") for ln in out.splitlines()}
    assert (proj / "dvc.lock").read_text() == lock  # every recomputed output hashes as the trial's did


# ----------------------------------------------------------------------------------------------------- bad input
def _bad(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    (tmp_path / "bad.yaml").write_text(text)
    db = tmp_path / "never.db"
    p = run(harness("sweep", str(tmp_path / "bad.yaml"), "-c", "params.yaml", "--storage", f"sqlite:///{db}"),
            ROOT, check=False)
    assert p.returncode == 2 and not db.exists(), p.stderr  # fails before any study or trial exists
    return p


@pytest.mark.parametrize("text, words", [
    ("params:\n  model.spin.ref_policy_kl_penaltyy: {type: float, low: 0.1, high: 0.5}\n",
     ["params.model.spin.ref_policy_kl_penaltyy", "unknown config key", "model.spin.ref_policy_kl_penalty"]),
    ("params:\n  model.optim.lr: {type: float, low: 0.1, high: 0.01}\n", ["params.model.optim.lr", "bad range"]),
    ("params:\n  model.optim.lr: {type: float, low: 0.0, high: 0.01, log: true}\n",
     ["params.model.optim.lr", "log scale needs low > 0"]),
    ("params:\n  model.optim.lr: {type: gaussian, low: 0.0, high: 0.01}\n",
     ["params.model.optim.lr.type", "unknown distribution 'gaussian'"]),
    ("overrides: [model.spin.use_meta_judge=true]\nparams:\n  model.spin.meta_judge_pcnt: {type: float, low: 0.0, high: 2.0}\n",
     ["params.model.spin.meta_judge_pcnt", "value 2.0 is refused", "model.spin.meta_judge_pcnt"]),
    ("params:\n  model.spin.length_control: {type: float, low: 0.0, high: 0.2, template: [0, x]}\n",
     ["params.model.spin.length_control", "refused"]),  # 2 values for max_iterations=4
    ("params:\n  model.spin.length_control: {type: float, low: 0.0, high: 0.2, template: [0, 0, 0, 0]}\n",
     ["params.model.spin.length_control.template", "with 'x' where the value goes"]),
    ("params:\n  model.optim.lr: {type: categorical, choices: []}\n", ["params.model.optim.lr.choices"]),
    ("trials: 3\nparams:\n  model.optim.lr: {type: float, low: 0.1, high: 0.5}\n", ["trials: unknown key"]),
    ("pruner: {name: hyperband}\nparams:\n  model.optim.lr: {type: float, low: 0.1, high: 0.5}\n",
     ["pruner.name", "'hyperband'"]),
    ("params: [1, 2]\n", ["params: expected a mapping"]),
    ("params: {model.optim.lr: {type: float, low: 0.1, high: 0.5}\n", ["not valid YAML"]),
])
def test_bad_space_file_fails_with_the_key_before_any_trial(tmp_path, text, words):
    err = _bad(tmp_path, text).stderr
    assert "bad.yaml" in err
    for w in words:
        assert w in err, (w, err)


def test_example_space_file_is_valid_for_the_default():
    space, cfg = load_space(ROOT / "experiments/sweep.yaml", str(ROOT / "params.yaml"))
    assert [p.key for p in space.params] == ["model.spin.ref_policy_kl_penalty", "model.optim.lr",
                                             "model.spin.length_control", "model.spin.meta_judge_pcnt"]
    assert space.objective(cfg) == ("eval/win_rate_vs_m1", "maximize")


@pytest.mark.parametrize("key, value", [("model.optim.lr", 3.0000000000000004e-05),
                                        ("model.spin.length_control", [0, 0, 0.1234567890123, 0.3]),
                                        ("model.spin.preference_average_log_probs", True), ("seed", 7),
                                        ("model.spin.judge_reward_regex", r"(?i)Score: {{ reward }}\b"),
                                        ("exp_manager.name", "a,b 'c'\\")])
def test_override_round_trips_exactly(key, value):
    cfg = config.load(str(ROOT / "params.yaml"), [override(key, value)], warn=None)
    assert config.get(cfg, key) == value


@pytest.mark.filterwarnings("ignore")  # experimental API; "heartbeat is supposed to be used with Study.optimize"
def test_dead_workers_trial_fails_through_the_rdb_heartbeat(tmp_path):
    """A trial whose heartbeat stopped longer than the grace period ago is FAIL; one still beating stays RUNNING."""
    import time

    import optuna

    from harness.sweep import heartbeat

    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=3)
    study = optuna.create_study(study_name="hb", storage=rdb)
    dead = study.ask()
    with heartbeat(rdb, dead._trial_id):
        pass  # its worker stops beating here
    time.sleep(4)
    alive = study.ask()
    with heartbeat(rdb, alive._trial_id):
        optuna.storages.fail_stale_trials(study)
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {dead.number: optuna.trial.TrialState.FAIL, alive.number: optuna.trial.TrialState.RUNNING}
