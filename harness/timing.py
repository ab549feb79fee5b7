"""Where a stage's time goes: start-up (process start to the stage's own code), model loading, and the work itself.

    clock = timing.CLOCK                 # one per process, started at the process's start
    clock.stage_begins()                 # imports, config and tracking set-up are done
    with clock.phase("load"): ...        # model loading (the transformers import included)
    clock.metrics()                      # {"time/startup_s", "time/load_s", "time/work_s", "time/wall_s"}

Wall-clock times differ between reruns, and every artifact a stage writes is bit-identical between reruns (the
determinism contract), so timings never go into a stage's metrics file: each stage writes its own
`timings/<stage>.json` and logs the same numbers to MLflow as `time/...`. They are no DVC output either: dvc.lock
hashes every output, and a rerun must leave dvc.lock (and its hash on the MLflow run) unchanged; a stage that DVC
restores from its cache keeps the timings of the run that computed it. The report stage turns them into "where the
time went" (timings/summary.*).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path


def process_age() -> float | None:
    """Seconds since this process started (the interpreter's own start-up included), or None off Linux."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5): start time in clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StageClock:
    """Phases of one stage process, measured from the process's start (perf_counter offsets)."""

    def __init__(self) -> None:
        age = process_age()
        self.t0 = time.perf_counter() - (age if age is not None else 0.0)
        self.begun: float | None = None
        self.phases: dict[str, float] = {}

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def stage_begins(self) -> None:
        """The stage's own code starts: everything before it (interpreter, imports, config, tracking) is start-up."""
        if self.begun is None:
            self.begun = self.now()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t

    def metrics(self) -> dict[str, float]:
        """time/startup_s, time/<phase>_s for each phase, time/work_s (the rest) and time/wall_s, rounded to ms."""
        wall = self.now()
        startup = self.begun if self.begun is not None else wall
        out = {"time/startup_s": startup}
        out.update({f"time/{k}_s": v for k, v in self.phases.items()})
        out["time/work_s"] = max(0.0, wall - startup - sum(self.phases.values()))
        out["time/wall_s"] = wall
        return {k: round(v, 3) for k, v in out.items()}


CLOCK = StageClock()


def stage_name(stage: str, iteration: int | None = None) -> str:
    """DVC's name of a stage run: generate@1 for iteration stages, evaluate_sft for iteration 0's evaluation."""
    if iteration is None:
        return stage
    if stage == "evaluate" and iteration == 0:
        return "evaluate_sft@0"
    return f"{stage}@{iteration}"


def timings_file(root: Path, stage: str, iteration: int | None = None) -> Path:
    return Path(root) / "timings" / f"{stage if iteration is None else f'{stage}_{iteration}'}.json"


def summary_line(name: str, metrics: dict, times: dict) -> str:
    """One readable line per stage: what it made and where its time went."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    items = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    short = [k.split("/", 1)[-1] for k in items]  # train/acc -> acc, unless two keys would read the same
    parts = [f"{s if short.count(s) == 1 else k}={fmt(v)}" for (k, v), s in zip(items.items(), short)]
    load = f", load {times['time/load_s']:.1f} s" if times.get("time/load_s") else ""
    head = f"harness: {name} done in {times['time/wall_s']:.1f} s (start-up {times['time/startup_s']:.1f} s{load})"
    return head + (": " + " ".join(parts) if parts else "")


# ----------------------------------------------------------------------------------------------------- report
PARTS = ("startup", "load", "work", "tracking")


def collect(root: Path) -> list[dict]:
    """Every stage's timings/<stage>.json under root (the report's own excluded: it is being written)."""
    import json

    rows = []
    for f in sorted((Path(root) / "timings").glob("*.json")):
        row = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(row, dict) and "time/wall_s" in row and row.get("stage") != "report":
            rows.append(row)
    return rows


def write_summary(root: Path) -> list[Path]:
    """timings/summary.md (table), summary.csv and summary.png (bar chart): where the pipeline's time went, by stage
    and by part (start-up, model load, work, MLflow). Returns the files written (none without timings)."""
    rows = collect(root)
    if not rows:
        return []
    out = Path(root) / "timings"
    rows.sort(key=lambda r: -r["time/wall_s"])
    total = sum(r["time/wall_s"] for r in rows)
    sums = {p: sum(r.get(f"time/{p}_s", 0.0) for r in rows) for p in PARTS}
    lines = ["# Where the time went", "", f"{len(rows)} stages, {total:.1f} s of stage wall time (DVC's own time "
             "between stages not included); start-up = process start to the stage's own code.", "",
             "| stage | wall s | share | start-up s | model load s | work s | MLflow s |", "|---|---|---|---|---|---|---|"]
    for r in [*rows, {"stage": "**total**", "time/wall_s": total, **{f"time/{p}_s": v for p, v in sums.items()}}]:
        lines.append(f"| {r['stage']} | {r['time/wall_s']:.2f} | {r['time/wall_s'] / total:.1%} | "
                     + " | ".join(f"{r.get(f'time/{p}_s', 0.0):.2f}" for p in PARTS) + " |")
    from harness.io import write_text

    write_text(out / "summary.md", "\n".join(lines) + "\n")
    write_text(out / "summary.csv", "stage,wall_s," + ",".join(f"{p}_s" for p in PARTS) + "\n" + "".join(
        f"{r['stage']},{r['time/wall_s']}," + ",".join(str(r.get(f"time/{p}_s", 0.0)) for p in PARTS) + "\n"
        for r in rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2), dpi=100)
    left = [0.0] * len(rows)
    names = [r["stage"] for r in rows][::-1]
    for p in PARTS:
        vals = [r.get(f"time/{p}_s", 0.0) for r in rows][::-1]
        ax.barh(names, vals, left=left, label=p)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("seconds")
    ax.set_title("where the time went")
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "summary.png")
    plt.close(fig)
    return [out / "summary.md", out / "summary.csv", out / "summary.png"]
