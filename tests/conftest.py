"""Shared fixtures: a copy of the project in a temporary directory, configured with the smoke experiment."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    return [f for f in out if f and not f.startswith("runs/") and (ROOT / f).is_file()]


def env() -> dict:
    """The current interpreter's bin first on PATH (dvc.yaml calls `harness`), quiet transformers."""
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e["TRANSFORMERS_VERBOSITY"] = "error"
    e["HF_HUB_OFFLINE"] = "1"
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=kw.pop("env", env()), capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def make_project(dest: Path, experiment: str = "experiments/smoke.yaml", overrides: list[str] = ()) -> Path:
    """A git repository holding the project, with params.yaml = the resolved experiment and a matching dvc.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in project_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    params = run([sys.executable, "-m", "harness.cli", "config", "show", "-c", experiment, *overrides], dest).stdout
    (dest / "params.yaml").write_text(params)
    run([sys.executable, "-m", "harness.cli", "pipeline", "write"], dest)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture
def tmp_project(tmp_path) -> Path:
    return make_project(tmp_path / "proj")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend, shared by the end-to-end tests."""
    d = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination", str(d / "artifacts"),
         "--workers", "1"], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(360):  # its first start migrates the sqlite schema: slow on a loaded 2-core machine
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start")
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine: gunicorn's workers may not stop in time; nothing to keep
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
