"""bench/matmul_floor.py: the matrix products a workload makes, counted by hand, and replayed."""

import torch
import torch.nn.functional as F

from bench.matmul_floor import gflop, record, replay


def test_record_counts_forward_backward_and_inference_mode_products():
    x = torch.randn(4, 5, 6, requires_grad=True)
    w = torch.randn(7, 6, requires_grad=True)
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 6)

    def work():
        F.linear(x, w).sum().backward()  # forward x@w.T, then grad_x = g@w and grad_w = g.T@x: three [20,6,7] GEMMs
        with torch.inference_mode():  # a dispatch mode alone never sees these: record() runs them under no_grad
            torch.matmul(a, b)  # one bmm: 6 batches of [4,5]@[5,6]

    calls = record(work)
    names = sorted(f.overloadpacket.__name__ for f, _, _ in calls)
    assert names == ["bmm", "mm", "mm", "mm"]
    assert gflop(calls) * 1e9 == 3 * (2 * 20 * 6 * 7) + 2 * 6 * 4 * 5 * 6


def test_replay_keeps_layouts_and_shares_storage():
    w = torch.randn(8, 16)
    xs = [torch.randn(3, 16) for _ in range(4)]
    k = torch.randn(2, 1, 16, 4).expand(2, 3, 16, 4)  # a broadcast operand (stride 0), as GQA's expand makes

    def work():
        for x in xs:
            F.linear(x, w)  # the weight's transpose: a strided view of one storage, four times
        torch.matmul(torch.randn(2, 3, 5, 4), k.transpose(-1, -2))

    calls = record(work)
    weight_specs = [specs[-1] for f, specs, _ in calls if f.overloadpacket.__name__ == "mm"]
    assert len(weight_specs) == 4 and len({s[0] for s in weight_specs}) == 1  # one storage, as in the workload
    assert weight_specs[0][4] == (1, 16)  # w.T's strides
    assert replay(calls, repeats=1) > 0
