"""The matrix products a workload makes, recorded and replayed back to back: the floor of its time on these kernels.

    calls = record(fn, *args)         # every aten mm / addmm / bmm / baddbmm fn runs, forward and backward
    gflop(calls)                      # their FLOPs (2*M*N*K each)
    seconds = replay(calls)           # the same products on fresh operands of the same shapes and strides

A speedup goal that needs a workload to run faster than the replay of its own matrix products needs faster kernels,
not a leaner loop: everything else it does (norms, RoPE, softmax, attention kernels, cache writes, the optimizer,
Python) is taken as free here.
"""

from __future__ import annotations

import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATMULS = ("mm", "addmm", "bmm", "baddbmm")


def _spec(t: torch.Tensor) -> tuple:
    """Where an operand lives (its storage, so the replay reuses memory as the workload did: the same weights every
    step stay in cache) and how it is laid out."""
    st = t.untyped_storage()
    return (st.data_ptr(), st.nbytes(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset())


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in MATMULS:
            self.calls.append((func, [_spec(a) if isinstance(a, torch.Tensor) else a for a in args], kwargs))
        return func(*args, **kwargs)


def record(fn, *args) -> list:
    """(aten op, [operand spec (_spec) or plain arg], kwargs) of every matrix product fn(*args) runs."""
    rec = _Recorder()
    # Ops under inference_mode never reach a dispatch mode: run those blocks (generation, the reference log-probs)
    # under no_grad instead, the same products without autograd.
    with mock.patch.object(torch, "inference_mode", torch.no_grad), rec:
        fn(*args)
    return rec.calls


def _flops(func, specs) -> int:
    name = func.overloadpacket.__name__
    a, b = [s[3] for s in specs if isinstance(s, tuple)][-2:]  # the multiplied operands' shapes (addmm: bias first)
    if name in ("mm", "addmm"):
        return 2 * a[0] * a[1] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[2]  # bmm, baddbmm


def gflop(calls) -> float:
    return sum(_flops(f, s) for f, s, _ in calls) / 1e9


def replay(calls, repeats: int = 3) -> float:
    """Best wall seconds of the recorded products run back to back on random operands laid out as recorded."""
    g = torch.Generator().manual_seed(0)
    sizes = {}  # elements of each recorded storage (the largest seen at that address)
    for _, specs, _ in calls:
        for ptr, nbytes, dtype, *_ in (s for s in specs if isinstance(s, tuple)):
            sizes[(ptr, dtype)] = max(nbytes // dtype.itemsize, sizes.get((ptr, dtype), 0))
    # one buffer of random finite values (no denormal slow paths) per recorded storage
    bases = {k: torch.randn(n, generator=g).to(k[1]) for k, n in sizes.items()}
    ops = [(func, [bases[(s[0], s[2])].as_strided(s[3], s[4], s[5]) if isinstance(s, tuple) else s for s in specs],
            kw) for func, specs, kw in calls]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            t = time.perf_counter()
            for func, args, kw in ops:
                func(*args, **kw)
            best = min(best, time.perf_counter() - t)
    return best
