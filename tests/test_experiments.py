"""`harness exp run <file>`: a named configuration runs as a DVC experiment of that name, with its resolved params
and generated pipeline in the experiment's commit."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run

pytestmark = pytest.mark.slow

SMALL = ["trainer.self_rewarding.max_iterations=1", "model.sft.baseline=false", "world.num_ift=16", "world.num_eft=16",
         "world.num_mft=8", "model.sft.max_epochs=1"]


def test_named_file_runs_as_a_dvc_experiment(tmp_project):
    proj = tmp_project
    out = run(["harness", "exp", "run", "experiments/smoke.yaml", "-n", "smoke-sft-only", *SMALL], proj)
    assert "Running stage 'sft'" in out.stdout and "Running stage 'report'" in out.stdout
    assert "max_iterations: 1" in (proj / "params.yaml").read_text()
    assert "Running stage 'generate" not in out.stdout  # the graph follows the config: SFT only
    shown = json.loads(run(["dvc", "exp", "show", "--json"], proj).stdout)
    exps = {e["name"]: e for rev in shown for e in (rev.get("experiments") or []) for e in e["revs"]}
    exp = exps["smoke-sft-only"]
    params = exp["data"]["params"]["params.yaml"]["data"]
    assert params["trainer"]["self_rewarding"]["max_iterations"] == 1 and params["model"]["sft"]["baseline"] is False
    assert "runs/iter0/eval.json" in exp["data"]["metrics"]
    # the same configuration under another name: every stage comes from DVC's cache, nothing is computed
    again = run(["harness", "exp", "run", "experiments/smoke.yaml", "-n", "smoke-again", *SMALL], proj)
    assert "Running stage" not in again.stdout
    # a name is DVC's to keep: reusing it is refused (-f overwrites, recomputing) and the command fails
    p = run(["harness", "exp", "run", "experiments/smoke.yaml", "-n", "smoke-sft-only", *SMALL], proj, check=False)
    assert p.returncode != 0 and "conflicts with existing experiment" in p.stderr + p.stdout


def test_a_bad_key_fails_before_anything_is_written(tmp_project):
    before = (tmp_project / "params.yaml").read_text()
    p = run(["harness", "exp", "run", "experiments/smoke.yaml", "model.spin.no_such_key=1"], tmp_project, check=False)
    assert p.returncode == 2 and "model.spin.no_such_key" in p.stderr
    assert (tmp_project / "params.yaml").read_text() == before
