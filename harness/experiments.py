"""Named experiments under DVC: experiments/<name>.yaml (+ NeMo overrides) run as the DVC experiment <name>.

    harness exp run experiments/meta_rewarding.yaml                  # DVC experiment "meta_rewarding"
    harness exp run experiments/meta_rewarding.yaml seed=1 -n meta-s1
    harness exp run experiments/self_rewarding.yaml --repro          # plain `dvc repro` in the workspace
    dvc exp show                                                      # compare it with the other experiments

DVC tracks params.yaml and the generated dvc.yaml, so a named file becomes a DVC run by writing its resolved config
as params.yaml and regenerating dvc.yaml (iterations and stages follow the config), then `dvc exp run --name <name>`:
the experiment's commit holds exactly the params and graph it ran, its stages share DVC's run cache with every
other run, and `dvc exp apply <name>` brings it back. Like `dvc exp run -S`, it leaves the workspace on the
experiment's params (`git checkout params.yaml dvc.yaml` returns to the committed ones).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import config


def write_workspace(cfg: config.Config, root: Path = Path(".")) -> list[Path]:
    """params.yaml = the resolved config, dvc.yaml = its pipeline; returns the files written."""
    from harness import pipeline
    from harness.io import write_text

    write_text(root / "params.yaml", f"# Written by `harness exp run` from the resolved config.\n{config.dump(cfg)}")
    write_text(root / "dvc.yaml", pipeline.render(cfg))
    return [root / "params.yaml", root / "dvc.yaml"]


def dvc_command(name: str | None, *, repro: bool = False, force: bool = False, queue: bool = False) -> list[str]:
    dvc = Path(sys.executable).parent / "dvc"
    cmd = [str(dvc) if dvc.exists() else "dvc"]
    if repro:
        return [*cmd, "repro"]
    return [*cmd, "exp", "run", *(["--name", name] if name else []), *(["--force"] if force else []),
            *(["--queue"] if queue else [])]


def run(path: str, overrides: list[str], *, name: str | None = None, repro: bool = False, force: bool = False,
        queue: bool = False, root: Path = Path("."), warn=print) -> int:
    """Resolve `path` + overrides (errors name the key before anything is written), write the workspace, run DVC."""
    cfg = config.load(path, overrides, warn=warn)
    name = name or Path(path).stem
    write_workspace(cfg, root)
    cmd = dvc_command(name, repro=repro, force=force, queue=queue)
    print(f"harness: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=root).returncode
