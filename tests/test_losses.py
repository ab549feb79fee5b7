"""harness.losses against hand-worked numbers and TRL 1.16's DPOTrainer._compute_loss.

    /work/venv/bin/pytest tests/test_losses.py
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.losses import (
    PREFERENCE_LOSSES,
    implicit_rewards,
    preference_accuracy,
    preference_loss,
    sequence_logps,
    sft_loss,
)

# ------------------------------------------------------------------------------- the 2-pair hand-worked batch
# chosen l = [1.5, -0.5], rejected l = [1.0, 0.5]          -> D  = [0.5, -1.0]
# beta b = 0.1                                             -> bD = [0.05, -0.1]
# chosen s = [4, 2], rejected s = [2, 5], gt_reward_scale 0.1 -> s_c - s_r = [2, -3], g = [0.2, -0.3]
BATCH = dict(
    chosen_logratio=torch.tensor([1.5, -0.5], dtype=torch.float64),
    rejected_logratio=torch.tensor([1.0, 0.5], dtype=torch.float64),
    chosen_score=torch.tensor([4.0, 2.0], dtype=torch.float64),
    rejected_score=torch.tensor([2.0, 5.0], dtype=torch.float64),
    beta=0.1,
    gt_reward_scale=0.1,
)

# sigmoid / logsigmoid values used below (math.exp / math.log):
#   sig(0.2)  = 0.549834, logsig(0.2)  = -0.598139, logsig(-0.2)  = -0.798139
#   sig(0.05) = 0.512497, logsig(0.05) = -0.668460, logsig(-0.05) = -0.718460
#   sig(-0.3) = 0.425557, logsig(-0.3) = -0.854355, logsig(0.3)   = -0.554355
#   sig(-0.1) = 0.475021, logsig(-0.1) = -0.744397, logsig(0.1)   = -0.644397
EXPECTED = {
    # -logsig(bD) = log(1 + exp(-bD)): log(1 + e^-0.05) = log(1.951229) = 0.668460; log(1 + e^0.1) = log(2.105171)
    "dpo": [0.6684596480132863, 0.744396660073571],
    # |s_c - s_r| * dpo: 2 * 0.668460 = 1.336919; 3 * 0.744397 = 2.233190
    "scale": [1.3369192960265726, 2.233189980220713],
    # sig(g)(logsig(g) - logsig(bD)) + sig(-g)(logsig(-g) - logsig(-bD))
    # [0]: 0.549834*(-0.598139+0.668460) + 0.450166*(-0.798139+0.718460) = 0.038665 - 0.035869 = 0.002796
    # [1]: 0.425557*(-0.854355+0.744397) + 0.574443*(-0.554355+0.644397) = -0.046794 + 0.051723 = 0.004930
    "rpo_bwd_kl": [0.0027958782285661815, 0.004929918967375567],
    # sig(bD)(logsig(bD) - logsig(g)) + sig(-bD)(logsig(-bD) - logsig(-g))
    # [0]: 0.512497*(-0.668460+0.598139) + 0.487503*(-0.718460+0.798139) = -0.036039 + 0.038844 = 0.002805
    # [1]: 0.475021*(-0.744397+0.854355) + 0.524979*(-0.644397+0.554355) = 0.052233 - 0.047270 = 0.004963
    "rpo_fwd_kl": [0.00280461189567395, 0.00496274689916823],
    # (D - 1/(2b))^2, 1/(2*0.1) = 5: (0.5 - 5)^2 = 20.25; (-1 - 5)^2 = 36
    "ipo": [20.25, 36.0],
    # (bD - g)^2: (0.05 - 0.2)^2 = 0.0225; (-0.1 + 0.3)^2 = 0.04
    "rpo_sq": [0.0225, 0.04],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_hand_worked_values(name):
    """Each loss on the 2-pair batch above equals the hand arithmetic in the comments (float64, 1e-12)."""
    got = preference_loss(name, **BATCH)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(EXPECTED[name], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # the registry entry and the dispatcher agree
    torch.testing.assert_close(PREFERENCE_LOSSES[name](**BATCH), got, rtol=0, atol=0)


def test_registry_names_match_config():
    from harness.config import PREFERENCE_LOSSES as CONFIG_NAMES

    assert tuple(PREFERENCE_LOSSES) == tuple(CONFIG_NAMES)
    assert all(callable(fn) for fn in PREFERENCE_LOSSES.values())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        preference_loss("dpoo", **BATCH)
    message = str(err.value)
    assert "'dpoo'" in message
    for name in ("dpo", "scale", "rpo_bwd_kl", "rpo_fwd_kl", "ipo", "rpo_sq"):
        assert name in message


def test_python_float_scores_broadcast_like_tensors():
    """Scores given as floats become tensors on the logratio's dtype/device; same answer as per-pair tensors."""
    base = dict(BATCH, chosen_score=7.0, rejected_score=4.0)
    as_tensors = dict(
        BATCH,
        chosen_score=torch.tensor([7.0, 7.0], dtype=torch.float64),
        rejected_score=torch.tensor([4.0, 4.0], dtype=torch.float64),
    )
    for name in PREFERENCE_LOSSES:
        got = preference_loss(name, **base)
        assert got.dtype == torch.float64 and got.shape == (2,)
        torch.testing.assert_close(got, preference_loss(name, **as_tensors), rtol=0, atol=0)
    # float32 logratios keep float32 even with float64 score tensors
    f32 = {k: v.float() if k.endswith("logratio") else v for k, v in BATCH.items()}
    assert preference_loss("rpo_sq", **f32).dtype == torch.float32


# --------------------------------------------------------------------------------------------- properties
logratios = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False)
scores = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(lc=logratios, lr=logratios, sc=scores, sr=scores, beta=st.floats(0.01, 2.0), scale=st.floats(0.0, 5.0))
def test_rpo_kls_are_nonnegative(lc, lr, sc, sr, beta, scale):
    kwargs = dict(
        chosen_logratio=torch.tensor([lc], dtype=torch.float64),
        rejected_logratio=torch.tensor([lr], dtype=torch.float64),
        chosen_score=sc, rejected_score=sr, beta=beta, gt_reward_scale=scale,
    )
    for name in ("rpo_bwd_kl", "rpo_fwd_kl"):
        value = preference_loss(name, **kwargs)
        assert torch.isfinite(value).all()
        assert (value >= -1e-12).all(), (name, value)


def test_rpo_kls_exactly_zero_when_margins_agree():
    # bD = 0.5 * (3 - 1) = 1.0 and g = 0.25 * (6 - 2) = 1.0, both exact in binary floating point
    kwargs = dict(
        chosen_logratio=torch.tensor([3.0, -1.0]), rejected_logratio=torch.tensor([1.0, 1.0]),
        chosen_score=torch.tensor([6.0, 2.0]), rejected_score=torch.tensor([2.0, 6.0]),
        beta=0.5, gt_reward_scale=0.25,
    )
    for name in ("rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq"):
        assert torch.equal(preference_loss(name, **kwargs), torch.zeros(2)), name
    # and strictly positive once they disagree
    moved = dict(kwargs, chosen_logratio=torch.tensor([3.5, -1.5]))
    for name in ("rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq"):
        assert (preference_loss(name, **moved) > 0).all(), name


def test_ipo_minimum_at_one_over_two_beta():
    beta = 0.25  # minimum at D = 1 / (2 * 0.25) = 2
    rejected = torch.tensor([0.0], dtype=torch.float64)
    chosen = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    at_min = preference_loss("ipo", chosen_logratio=chosen, rejected_logratio=rejected,
                             chosen_score=0.0, rejected_score=0.0, beta=beta)
    assert at_min.item() == 0.0
    at_min.sum().backward()
    assert chosen.grad.item() == 0.0
    for d in (1.5, 1.99, 2.01, 3.0):
        off = preference_loss("ipo", chosen_logratio=torch.tensor([d], dtype=torch.float64),
                              rejected_logratio=rejected, chosen_score=0.0, rejected_score=0.0, beta=beta)
        assert off.item() == pytest.approx((d - 2.0) ** 2) and off.item() > 0


def test_scale_is_zero_when_scores_equal():
    equal = dict(BATCH, chosen_score=torch.tensor([3.0, 5.0]), rejected_score=torch.tensor([3.0, 5.0]))
    assert torch.equal(preference_loss("scale", **equal), torch.zeros(2, dtype=torch.float64))


def test_implicit_rewards_and_accuracy():
    chosen = torch.tensor([1.5, -0.5, 2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.5, 2.0, -3.0])
    rewards_chosen, rewards_rejected = implicit_rewards(chosen, rejected, 0.1)
    torch.testing.assert_close(rewards_chosen, torch.tensor([0.15, -0.05, 0.2, 0.0]))
    torch.testing.assert_close(rewards_rejected, torch.tensor([0.1, 0.05, 0.2, -0.3]))
    assert not rewards_chosen.requires_grad
    # chosen > rejected in pairs 0 and 3; the tie (pair 2) does not count -> 2/4
    assert preference_accuracy(chosen, rejected, 0.1).item() == 0.5


# ---------------------------------------------------------------------------------------------- token log-probs
V = 5


def _hand_sequence():
    """Prompt [1, 2, 3], response [4, 2], end token 0: T = 6, loss_mask = [0, 0, 0, 1, 1, 1].

    Scored targets (mask[:, 1:]) are positions 3, 4, 5, predicted by logits rows 2, 3, 4:
      row 2 = zeros                             -> log p(4) = log(1/5)
      row 3 = log 6 on token 2, zeros elsewhere -> log p(2) = log(6 / (6 + 4)) = log 0.6
      row 4 = log 4 on token 1, zeros elsewhere -> log p(0) = log(1 / (4 + 4)) = log(1/8)
    sum = log(0.2 * 0.6 * 0.125) = log(0.015) = -4.199705; mean over the 3 scored tokens = -1.399902.
    Rows 0, 1 (predicting prompt tokens 2, 3) and row 5 (predicts nothing) hold arbitrary values.
    """
    input_ids = torch.tensor([[1, 2, 3, 4, 2, 0]])
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    logits = torch.zeros(1, 6, V)
    logits[0, 0] = torch.tensor([3.0, -1.0, 2.0, 0.5, 7.0])
    logits[0, 1] = torch.tensor([-2.0, 4.0, 1.0, 9.0, 0.0])
    logits[0, 3, 2] = math.log(6.0)
    logits[0, 4, 1] = math.log(4.0)
    logits[0, 5] = torch.tensor([5.0, 5.0, -5.0, 1.0, 2.0])
    return logits, input_ids, loss_mask


HAND_SUM = -4.199705077879927  # log(0.015)


def test_sequence_logps_hand_sum_and_mean():
    logits, input_ids, loss_mask = _hand_sequence()
    total = sequence_logps(logits, input_ids, loss_mask)
    assert total.shape == (1,) and total.dtype == torch.float32
    assert total.item() == pytest.approx(HAND_SUM, abs=1e-6)
    assert total.item() == pytest.approx(math.log(0.2) + math.log(0.6) + math.log(1 / 8), abs=1e-6)
    mean = sequence_logps(logits, input_ids, loss_mask, average=True)
    assert mean.item() == pytest.approx(HAND_SUM / 3, abs=1e-6)  # 3 scored tokens: 2 response + end
    torch.testing.assert_close(sft_loss(logits, input_ids, loss_mask), -mean)
    torch.testing.assert_close(sft_loss(logits, input_ids, loss_mask, average=False), -total)


def test_last_prompt_token_not_scored_end_token_scored():
    logits, input_ids, loss_mask = _hand_sequence()
    base = sequence_logps(logits, input_ids, loss_mask).item()
    # row 1 predicts the last prompt token (id 3 at position 2): changing it changes nothing
    bumped = logits.clone()
    bumped[0, 1, 3] += 10.0
    assert sequence_logps(bumped, input_ids, loss_mask).item() == base
    # the final row predicts nothing
    bumped = logits.clone()
    bumped[0, 5] += torch.arange(V, dtype=torch.float32)
    assert sequence_logps(bumped, input_ids, loss_mask).item() == base
    # row 4 predicts the end token (id 0): raising its logit to log 5 gives exp-weights [5, 4, 1, 1, 1],
    # so log p = log(5 / 12) instead of log(1/8)
    bumped = logits.clone()
    bumped[0, 4, 0] = math.log(5.0)
    expected = math.log(0.2) + math.log(0.6) + math.log(5 / 12)
    assert sequence_logps(bumped, input_ids, loss_mask).item() == pytest.approx(expected, abs=1e-6)
    # unmasking the end token drops exactly its term
    no_end = loss_mask.clone()
    no_end[0, 5] = 0
    assert sequence_logps(logits, input_ids, no_end).item() == pytest.approx(math.log(0.2 * 0.6), abs=1e-6)


def test_padding_contributes_nothing():
    logits, input_ids, loss_mask = _hand_sequence()
    # right-pad to T = 9 with garbage logits (including inf) and an out-of-vocab pad id
    pad_logits = torch.cat([logits, torch.randn(1, 3, V) * 100], dim=1)
    pad_logits[0, 6, 2] = float("inf")
    pad_ids = torch.cat([input_ids, torch.full((1, 3), -100)], dim=1)
    pad_mask = torch.cat([loss_mask, torch.zeros(1, 3, dtype=loss_mask.dtype)], dim=1)
    # a second, longer-prompt sequence shares the batch
    other_logits = torch.randn(1, 9, V)
    other_ids = torch.randint(0, V, (1, 9))
    other_mask = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1]])
    batch = sequence_logps(
        torch.cat([pad_logits, other_logits]), torch.cat([pad_ids, other_ids]), torch.cat([pad_mask, other_mask])
    )
    assert batch[0].item() == pytest.approx(HAND_SUM, abs=1e-6)
    torch.testing.assert_close(batch[1:], sequence_logps(other_logits, other_ids, other_mask))
    mean = sequence_logps(pad_logits, pad_ids, pad_mask, average=True)
    assert mean.item() == pytest.approx(HAND_SUM / 3, abs=1e-6)


def test_gradient_flows_only_through_scored_rows():
    logits, input_ids, loss_mask = _hand_sequence()
    logits.requires_grad_(True)
    sequence_logps(logits, input_ids, loss_mask).sum().backward()
    grad = logits.grad[0]
    # d log p(y) / d logits = onehot(y) - softmax(logits) on scored rows, 0 elsewhere
    for row in (0, 1, 5):
        assert torch.equal(grad[row], torch.zeros(V))
    torch.testing.assert_close(grad[2], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]) - 0.2)
    torch.testing.assert_close(grad[3], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]) - torch.tensor([1, 1, 6, 1, 1]) / 10)
    torch.testing.assert_close(grad[4], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]) - torch.tensor([1, 4, 1, 1, 1]) / 8)


def test_bf16_logits_scored_in_float32():
    logits, input_ids, loss_mask = _hand_sequence()
    out = sequence_logps(logits.bfloat16(), input_ids, loss_mask)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(HAND_SUM, abs=2e-2)  # only the bf16 rounding of log 6 / log 4


def test_shape_mismatch_raises():
    logits, input_ids, loss_mask = _hand_sequence()
    with pytest.raises(ValueError, match="expected logits"):
        sequence_logps(logits, input_ids[:, :-1], loss_mask)


# ------------------------------------------------------------------------------ cross-check against TRL 1.16
# TRL 1.16 has no standalone dpo_loss: the "sigmoid" and "ipo" formulas live inside DPOTrainer._compute_loss
# (trl/trainer/dpo_trainer.py, ~line 1387: -F.logsigmoid(beta * delta_score); ~line 1393-1404: IPO divides each
# logratio by its completion length, then (delta - 1/(2 beta))**2). We call that unbound method with a minimal
# stand-in trainer and a stand-in model whose per-token log-probs come from random logits, so TRL's own code does
# the masking, chunking into [chosen; rejected], the loss formula and the batch mean.
class _FakeFusedModel:
    """Mimics a model called with labels=..., fused_lm_head=True: per-token log-probs of the shifted labels, 0 on -100."""

    training = True

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, *, input_ids, attention_mask, labels, use_cache, fused_lm_head):
        assert fused_lm_head and not use_cache
        targets = labels[:, 1:]
        keep = targets != -100
        logp = torch.log_softmax(self.logits[:, :-1], dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        shape = targets.shape
        return SimpleNamespace(
            log_probs=torch.where(keep, logp, torch.zeros_like(logp)),
            entropy=torch.zeros(shape, dtype=logp.dtype),
            mean_logits=torch.zeros(shape, dtype=logp.dtype),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )


def _trl_loss(loss_type, beta, logits, input_ids, completion_mask, ref_chosen_logps, ref_rejected_logps):
    from trl.trainer.dpo_trainer import DPOTrainer

    identity = lambda x: x  # noqa: E731 - single process: gather is the identity
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), completion_mask=completion_mask,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    loss = DPOTrainer._compute_loss(trainer, _FakeFusedModel(logits), inputs, return_outputs=False)
    return loss, trainer._metrics["train"]  # TRL's logged rewards/chosen, rewards/accuracies, ...


def _random_pairs(seed, num_pairs=4, seq_len=12, vocab=11):
    gen = torch.Generator().manual_seed(seed)
    n = 2 * num_pairs  # rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], TRL's layout
    logits = torch.randn(n, seq_len, vocab, generator=gen, dtype=torch.float64) * 3
    input_ids = torch.randint(0, vocab, (n, seq_len), generator=gen)
    completion_mask = torch.zeros(n, seq_len, dtype=torch.long)
    for row in range(n):
        start = int(torch.randint(1, 5, (1,), generator=gen))  # prompt of 1..4 tokens
        end = int(torch.randint(start + 1, seq_len + 1, (1,), generator=gen))  # >= 1 completion token, then pad
        completion_mask[row, start:end] = 1
    ref = torch.randn(n, generator=gen, dtype=torch.float64) * 5 - 20
    return logits, input_ids, completion_mask, ref[:num_pairs], ref[num_pairs:]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl_sigmoid(seed, beta):
    logits, input_ids, completion_mask, ref_c, ref_r = _random_pairs(seed)
    trl_loss, metrics = _trl_loss("sigmoid", beta, logits, input_ids, completion_mask, ref_c, ref_r)

    logps = sequence_logps(logits, input_ids, completion_mask)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_logratio, rejected_logratio = chosen_logps - ref_c, rejected_logps - ref_r
    ours = preference_loss("dpo", chosen_logratio=chosen_logratio, rejected_logratio=rejected_logratio,
                           chosen_score=0.0, rejected_score=0.0, beta=beta)
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-10, atol=1e-12)

    rewards_chosen, rewards_rejected = implicit_rewards(chosen_logratio, rejected_logratio, beta)
    assert rewards_chosen.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], rel=1e-10)
    assert rewards_rejected.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], rel=1e-10)
    acc = preference_accuracy(chosen_logratio, rejected_logratio, beta).item()
    assert acc == pytest.approx(metrics["rewards/accuracies"][-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl_ipo(seed, beta):
    """TRL's IPO divides each token-summed logratio by its completion length, i.e. uses average log-probs;
    ours takes whatever logratio it is given, so feed it sequence_logps(average=True) - ref / length."""
    logits, input_ids, completion_mask, ref_c, ref_r = _random_pairs(seed)
    trl_loss, _ = _trl_loss("ipo", beta, logits, input_ids, completion_mask, ref_c, ref_r)

    lengths = completion_mask[:, 1:].sum(dim=1).to(torch.float64)  # position 0 is always prompt here
    avg_logps = sequence_logps(logits, input_ids, completion_mask, average=True)
    avg_ref = torch.cat([ref_c, ref_r]) / lengths
    chosen_logratio, rejected_logratio = (avg_logps - avg_ref).chunk(2)
    ours = preference_loss("ipo", chosen_logratio=chosen_logratio, rejected_logratio=rejected_logratio,
                           chosen_score=0.0, rejected_score=0.0, beta=beta)
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-10, atol=1e-12)


def test_trl_cross_check_per_pair():
    """The batch mean could hide compensating errors: compare pair by pair (TRL on a 1-pair batch)."""
    logits, input_ids, completion_mask, ref_c, ref_r = _random_pairs(7, num_pairs=3)
    logps = sequence_logps(logits, input_ids, completion_mask)
    per_pair = preference_loss("dpo", chosen_logratio=logps[:3] - ref_c, rejected_logratio=logps[3:] - ref_r,
                               chosen_score=0.0, rejected_score=0.0, beta=0.2)
    for i in range(3):
        rows = torch.tensor([i, 3 + i])
        trl_loss, _ = _trl_loss("sigmoid", 0.2, logits[rows], input_ids[rows], completion_mask[rows],
                                ref_c[i:i + 1], ref_r[i:i + 1])
        torch.testing.assert_close(per_pair[i], trl_loss, rtol=1e-10, atol=1e-12)
