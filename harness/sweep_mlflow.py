"""A sweep in MLflow: the study's parent run and one child run per trial, which is also the trial's pipeline run (its
stages attach to it through HARNESS_PIPELINE_KEY, so their iteration runs nest under it), with params, per-iteration
metrics, the objective, the Optuna state (COMPLETE -> FINISHED, PRUNED -> KILLED, FAIL -> FAILED) and the DVC
experiment name."""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness import config
from harness.io import file_lock
from harness.sweep_space import Space, project_sqlite


class Mlflow:
    """The study's parent run and one child run per trial (None-safe when tracking is off).

    Not optuna_integration.MLflowCallback: it creates a trial's run after the trial ends, while here the trial run
    exists from the start so the pipeline's stage runs nest under it."""

    def __init__(self, cfg: config.Config, space: Space, storage_url: str, repo: Path):
        from harness import tracking

        self.enabled = cfg.tracking.enabled
        uri = project_sqlite(tracking.tracking_uri(cfg), repo)
        self.uri, self.client, self.study_run = uri, None, None
        if not self.enabled:
            return
        from mlflow import MlflowClient

        self.client = MlflowClient(uri)
        self.exp_id = tracking.experiment_id(self.client, cfg.tracking.experiment_name)  # tagged with its kind
        with file_lock(repo / ".sweep" / "mlflow.lock"):
            runs = self.client.search_runs([self.exp_id], f"tags.`harness.study` = '{space.study_name}'",
                                           max_results=1)
            if runs:
                self.study_run = runs[0].info.run_id
                self.client.update_run(self.study_run, status="RUNNING")
            else:
                run = self.client.create_run(self.exp_id, run_name=f"sweep-{space.study_name}",
                                             tags={"harness.study": space.study_name, "optuna.storage": storage_url,
                                                   "optuna.space_file": space.path})
                self.study_run = run.info.run_id
                self.client.log_artifact(self.study_run, space.path, "sweep")
        self.client.set_tag(self.study_run, "optuna.objective", f"{space.metric} ({space.direction})")

    def trial_run(self, key: str, name: str, cfg: config.Config, number: int, sampled: dict) -> str | None:
        if not self.enabled:
            return None
        from harness import tracking

        run = self.client.create_run(self.exp_id, run_name=name, tags={
            tracking.PARENT_TAG: key, "mlflow.parentRunId": self.study_run, "optuna.trial_number": str(number),
            "optuna.state": "RUNNING", "optuna.params": json.dumps(sampled)})
        tracking.log_params(self.client, run.info.run_id, cfg)
        return run.info.run_id

    def log_eval(self, run_id: str | None, t: int, metrics: dict) -> None:
        """Eval metrics of iteration t, unless the evaluate stage ran (then it logged them itself)."""
        if not run_id:
            return
        from mlflow.entities import Metric

        have = {m.step for m in self.client.get_metric_history(run_id, "eval/oracle_reward")} | {
            m.step for m in self.client.get_metric_history(run_id, "eval/val_loss")}
        if t in have:
            return
        ts = int(time.time() * 1000)
        rows = [Metric(k, float(v), ts, t) for k, v in metrics.items() if k.startswith("eval/") and v is not None]
        self.client.log_batch(run_id, metrics=rows)

    def finish(self, run_id: str | None, state: str, tags: dict, value: float | None) -> None:
        if not run_id:
            return
        for k, v in {"optuna.state": state, **tags}.items():
            self.client.set_tag(run_id, k, str(v))
        if value is not None:
            self.client.log_metric(run_id, "objective", value)
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(run_id, status)
