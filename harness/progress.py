"""Progress of the loops a user waits for (training steps, generation, judging, evaluation).

    bar = progress(total=900, desc="sft", unit="step")
    bar.update(1, loss=1.23)
    bar.close()

On a terminal: a tqdm bar (items/s and the latest values as its postfix). Off a terminal (CI, `dvc repro > log`,
a sweep trial): one plain line every HARNESS_PROGRESS_SECONDS (default 30) and a last one at the end, so logs show
progress without tqdm's carriage returns. Progress goes to stderr; it never changes what a stage computes.
"""

from __future__ import annotations

import os
import sys
import time


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class LineProgress:
    """tqdm's update/set_postfix/close interface, printing a line at most every `every` seconds."""

    def __init__(self, total: int, desc: str, unit: str, every: float, file=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.file = file or sys.stderr
        self.n, self.t0 = 0, time.perf_counter()
        self.last, self.postfix = self.t0, {}

    def set_postfix(self, **kw) -> None:
        self.postfix = kw

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = postfix
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        dt = max(now - self.t0, 1e-9)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {k}={_fmt(v)}" for k, v in self.postfix.items())
        print(f"harness: {self.desc}: {self.n}/{self.total} {self.unit}s{pct}, {self.n / dt:.3g} {self.unit}/s, "
              f"{dt:.0f} s{extra}", file=self.file, flush=True)

    def close(self) -> None:
        if self.n:
            self._line(time.perf_counter())


class TqdmProgress:
    """A tqdm bar whose update() also takes the postfix values (loss, ...)."""

    def __init__(self, total: int, desc: str, unit: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def set_postfix(self, **kw) -> None:
        self.bar.set_postfix({k: _fmt(v) for k, v in kw.items()}, refresh=False)

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.set_postfix(**postfix)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, desc: str, unit: str = "it", *, enabled: bool = True):
    """A bar on a terminal, periodic lines elsewhere, nothing when disabled (HARNESS_PROGRESS=0 disables all)."""
    if not enabled or os.environ.get("HARNESS_PROGRESS", "1") == "0":
        return LineProgress(total, desc, unit, every=float("inf"), file=_Null())
    if sys.stderr.isatty():
        return TqdmProgress(total, desc, unit)
    return LineProgress(total, desc, unit, every=float(os.environ.get("HARNESS_PROGRESS_SECONDS", "30")))


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass
