"""CREAM (arXiv 2410.12735): Kendall tau-b consistency rates and the consistency-weighted soft-label DPO loss.

Hand-worked numbers:
- tau-b of x = [3, 1, 2, 2], y = [2, 1, 2, 0]: pairs (0,1) P, (0,2) tied in y only, (0,3) P, (1,2) P, (1,3) Q,
  (2,3) tied in x only: P = 3, Q = 1, Tx = Ty = 1, tau_b = (3 - 1) / sqrt(5 * 5) = 0.4, rate = (0.4 + 1) / 2 = 0.7.
- DPO with beta = 0.5, chosen logratio 1, rejected -1: b*D = 1; -logsig(1) = log(1 + e^-1) = 0.3132617,
  -logsig(-1) = log(1 + e) = 1.3132617; C = 0.75: 0.75 * 0.3132617 + 0.25 * 1.3132617 = 0.5632617.
"""

import math

import pytest
import torch
from scipy.stats import kendalltau

from harness import cream
from harness.losses import consistency_regularized_loss, preference_loss


def test_kendall_tau_b_hand_worked_and_against_scipy():
    x, y = [3, 1, 2, 2], [2, 1, 2, 0]
    assert cream.kendall_tau_b(x, y) == pytest.approx(0.4)
    assert cream.kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)
    for x, y in (([1, 2, 3, 4], [4, 3, 2, 1]), ([0, 0, 1, 5], [1, 2, 2, 3]), ([2.5, 1, 1, 4], [3, 3, 1, 0.5])):
        assert cream.kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)


def test_tau_undefined_for_constant_or_short_rankings():
    assert cream.kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    assert cream.kendall_tau_b([1], [2]) is None
    assert cream.prompt_rate([3, None, 1], [None, 2, 2]) is None  # one response scored by both
    assert cream.prompt_rate([3, 1, 2, 2], [2, 1, 2, 0]) == pytest.approx(0.7)


def _rows(*pairs_of_lists, ended=True):
    return [{"responses": [{"mean": a, "is_end": ended, "prev": {"mean": b}} for a, b in zip(now, prev)]}
            for now, prev in pairs_of_lists]


def test_consistency_avg_and_dyn():
    rows = _rows(([3, 1, 2, 2], [2, 1, 2, 0]),  # 0.7
                 ([1, 2, 3], [3, 2, 1]),  # tau -1: 0.0
                 ([1, 1, 1], [1, 2, 3]))  # constant now-ranking: no rate
    rates, stats = cream.consistency(rows, "avg")
    assert rates == pytest.approx([0.35, 0.35, 0.35])
    assert stats == {"cream/consistency_rate": pytest.approx(0.35), "cream/prompts_ranked": 2}
    rates, _ = cream.consistency(rows, "dyn")
    assert rates == pytest.approx([0.7, 0.0, 0.35])  # the prompt without a rate gets the mean


def test_no_ranked_prompt_means_plain_dpo():
    rows = _rows(([3, 1, 2], [None, None, None]))  # e.g. an untrained previous model: nothing parses
    rates, stats = cream.consistency(rows, "dyn")
    assert rates == [1.0] and stats["cream/prompts_ranked"] == 0 and math.isnan(stats["cream/consistency_rate"])
    assert cream.consistency(_rows(([3, 1, 2], [1, 2, 3]), ended=False), "avg")[1]["cream/prompts_ranked"] == 0


def test_consistency_regularized_dpo_hand_worked():
    kw = {"chosen_logratio": torch.tensor([1.0, 1.0, 1.0]), "rejected_logratio": torch.tensor([-1.0, -1.0, -1.0]),
          "chosen_score": torch.tensor([4.0] * 3), "rejected_score": torch.tensor([1.0] * 3), "beta": 0.5}
    got = consistency_regularized_loss("dpo", torch.tensor([1.0, 0.75, 0.5]), **kw)
    assert got.tolist() == pytest.approx([0.3132617, 0.5632617, 0.8132617], abs=1e-6)
    # C = 1 is the plain loss; C = 0 is the loss of the swapped pair
    assert torch.equal(consistency_regularized_loss("dpo", torch.ones(3), **kw), preference_loss("dpo", **kw))
    swapped = preference_loss("dpo", chosen_logratio=kw["rejected_logratio"], rejected_logratio=kw["chosen_logratio"],
                              chosen_score=kw["rejected_score"], rejected_score=kw["chosen_score"], beta=0.5)
    assert torch.allclose(consistency_regularized_loss("dpo", torch.zeros(3), **kw), swapped)


def test_consistency_regularized_gradient_vanishes_at_half_consistency():
    """C = 1/2: d/dD of [-logsig(bD) - logsig(-bD)] / 2 = b (sig(bD) - sig(-bD)) / 2 = 0 at D = 0."""
    c = torch.tensor([0.0], requires_grad=True)
    loss = consistency_regularized_loss("dpo", torch.tensor([0.5]), chosen_logratio=c, rejected_logratio=torch.zeros(1),
                                        chosen_score=1.0, rejected_score=0.0, beta=0.1)
    loss.sum().backward()
    assert c.grad.item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(math.log(2))
