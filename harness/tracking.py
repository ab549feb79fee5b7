"""MLflow: one run per pipeline execution, a child run per iteration, stages in separate processes attaching to both.

    mlflow ui --backend-store-uri sqlite:///mlflow.db

A pipeline execution is identified by `harness.pipeline_key` = hash(resolved params, git commit): every stage of
one `dvc repro` computes the same key and attaches to the newest parent run with that key that is not FINISHED
(a crashed run is resumed, not duplicated). The report stage finishes it; a failing stage marks it FAILED.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from harness import config

PARENT_TAG, ITER_TAG = "harness.pipeline_key", "harness.iteration"


def tracking_uri(cfg: config.Config) -> str:
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def git_info() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else False
    return {"git_commit": commit or "none", "git_dirty": str(dirty).lower()}


def pipeline_key(cfg: config.Config) -> str:
    explicit = os.environ.get("HARNESS_PIPELINE_KEY")  # sweeps give each trial its own key
    if explicit:
        return explicit
    return hashlib.sha256(f"{config.params_hash(cfg)}:{git_info()['git_commit']}".encode()).hexdigest()[:16]


class Tracker:
    """Thin wrapper over MlflowClient bound to one (parent, child) run pair."""

    def __init__(self, client, run_id: str, parent_id: str):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0, *, parent: bool = False) -> None:
        self._log_rows([(metrics, step)], parent)

    def log_history(self, history: list[dict]) -> None:
        """Every step's metrics in batches of 900 (one database transaction each, not one per step)."""
        self._log_rows([({k: v for k, v in row.items() if "/" in k or k in ("lr", "grad_norm")}, row["step"])
                        for row in history], False)

    def _log_rows(self, rows: list[tuple[dict, int]], parent: bool) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        out = [Metric(k, float(v), ts, step) for metrics, step in rows for k, v in metrics.items()
               if isinstance(v, (int, float))]
        for i in range(0, len(out), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.parent_id if parent else self.run_id, metrics=out[i:i + 900])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *, parent: bool = False) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.parent_id if parent else self.run_id, str(path), artifact_path)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.client.tracking_uri)
        mlflow.log_table(data=data, artifact_file=artifact_file, run_id=self.run_id)

    def log_dataset(self, path: str | Path, name: str, context: str, *, parent: bool = False) -> None:
        """A NeMo SFT jsonl file as an MLflow dataset input (Dataset column of the runs table): one row per record
        (id, prompt, gold answer when it has one), its source the file, its digest MLflow's hash of the rows."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        from harness.data import sft

        path = Path(path)
        if not path.is_file():
            return
        rows = [{"id": str(r.get("id", i)), "prompt": sft.user_text(r), "gold": sft.gold_response(r) or ""}
                for i, r in enumerate(sft.read_sft(path))]
        with warnings.catch_warnings():  # MLflow registers the local source twice ("" and file:) and says so
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_pandas(pd.DataFrame(rows, columns=["id", "prompt", "gold"]),
                                         source=str(path.resolve()), name=name)
        self.client.log_inputs(self.parent_id if parent else self.run_id, datasets=[
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def set_tags(self, tags: dict[str, str], *, parent: bool = False) -> None:
        _set_tags(self.client, self.parent_id if parent else self.run_id, tags)


def _find_or_create(client, exp_id: str, filt: str, tags: dict, name: str) -> tuple[str, bool]:
    runs = client.search_runs([exp_id], filter_string=filt, order_by=["attributes.start_time DESC"], max_results=5)
    for r in runs:
        if r.info.status != "FINISHED" or ITER_TAG in tags:
            client.update_run(r.info.run_id, status="RUNNING")
            return r.info.run_id, False
    run = client.create_run(exp_id, tags={**tags, "mlflow.runName": name}, run_name=name)
    return run.info.run_id, True


# MLflow 3's UI opens an experiment on the view its kind names; untagged, it guesses "GenAI" (traces, empty here).
EXPERIMENT_KIND = {"mlflow.experimentKind": "finetuning"}


def experiment_id(client, name: str) -> str:
    """The experiment's id (created if missing), tagged with its kind so `mlflow ui` opens on its runs."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, tags=EXPERIMENT_KIND)
    if exp is not None and any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
        for k, v in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp_id, k, v)
    return exp_id


class Deferred:
    """Records a stage's tracking calls and replays them on a Tracker once the stage's work is done.

    Importing MLflow costs seconds; a stage attaches to its runs after its work, so that cost is no part of its
    start-up (timing.CLOCK: phase "tracking"). Calls made after the replay go straight to the Tracker.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.live: Tracker | None = None

    def __getattr__(self, name: str):
        if name.startswith("_") or not hasattr(Tracker, name):
            raise AttributeError(name)

        def call(*args, **kwargs):
            if self.live is not None:
                return getattr(self.live, name)(*args, **kwargs)
            self.calls.append((name, args, kwargs))
            return None

        return call

    def replay(self, live: Tracker) -> None:
        self.live = live
        for name, args, kwargs in self.calls:
            getattr(live, name)(*args, **kwargs)
        self.calls.clear()


def _attach(cfg: config.Config, stage: str, iteration: int | None) -> tuple[Tracker, str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    exp_id = experiment_id(client, cfg.tracking.experiment_name)
    key = pipeline_key(cfg)
    parent_id, created = _find_or_create(client, exp_id, f"tags.`{PARENT_TAG}` = '{key}'",
                                         {PARENT_TAG: key}, cfg.exp_manager.name)
    if created:
        log_params(client, parent_id, cfg)
    run_id = parent_id
    if iteration is not None:
        run_id, created_child = _find_or_create(
            client, exp_id, f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{ITER_TAG}` = '{iteration}'",
            {ITER_TAG: str(iteration), "mlflow.parentRunId": parent_id},
            f"iteration-{iteration}")
        if created_child:
            log_params(client, run_id, cfg)
    tracker = Tracker(client, run_id, parent_id)
    tracker.set_tags({"harness.last_stage": stage, "dvc_experiment": os.environ.get("DVC_EXP_NAME", "workspace")},
                     parent=True)
    return tracker, run_id, parent_id


@contextlib.contextmanager
def stage_run(cfg: config.Config, stage: str, iteration: int | None = None, *, finish_parent: bool = False
              ) -> Iterator[Deferred | None]:
    """Attach this stage to the pipeline's parent run (and the iteration's child) when its work is done, and log
    what it recorded; on any error, attach and mark both runs FAILED."""
    if not cfg.tracking.enabled or int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 logs for all
        yield None
        return
    from harness.timing import CLOCK

    deferred = Deferred()
    try:
        yield deferred
    except BaseException:
        with CLOCK.phase("tracking"):
            tracker, run_id, parent_id = _attach(cfg, stage, iteration)
            tracker.client.set_terminated(run_id, "FAILED")
            if run_id != parent_id:
                tracker.client.set_terminated(parent_id, "FAILED")
        raise
    with CLOCK.phase("tracking"):
        tracker, run_id, parent_id = _attach(cfg, stage, iteration)
        deferred.replay(tracker)
        if run_id != parent_id:
            tracker.client.set_terminated(run_id, "FINISHED")
        if finish_parent:
            tracker.client.set_terminated(parent_id, "FINISHED")


def log_params(client, run_id: str, cfg: config.Config) -> None:
    """Every config key as an MLflow param, plus git, params_hash and environment tags (sweep trials use it too)."""
    from mlflow.entities import Param

    from harness.determinism import fingerprint

    flat = config.flatten(config.to_dict(cfg))
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flat.items()]
    for i in range(0, len(params), 90):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=params[i:i + 90])
    tags = {**git_info(), "params_hash": config.params_hash(cfg)}
    tags.update({f"env.{k}": str(v) for k, v in fingerprint().items()})
    _set_tags(client, run_id, tags)


def _set_tags(client, run_id: str, tags: dict) -> None:
    """All tags in one batch (one database transaction, not one per tag)."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def file_tag(path: str | Path) -> str:
    from harness.io import file_hash

    return file_hash(path)[:16] if Path(path).is_file() else "none"
