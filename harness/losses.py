"""Token log-probs, the SFT NLL and the six preference losses of NeMo-Aligner's DPO/SPIN trainer.

    /work/venv/bin/pytest tests/test_losses.py

Notation (DESIGN.md, "Losses"): a *logratio* l = log pi(y|x) - log ref(y|x), summed (or averaged, when
preference_average_log_probs) over the response tokens; D = l_chosen - l_rejected; b = beta
(ref_policy_kl_penalty); g = gt_reward_scale * (s_chosen - s_rejected), the judge-score margin.

Every preference loss returns one value per pair ([B]); the caller reduces and weights:
total = preference_loss_weight * L.mean() + sft_loss_weight * NLL(chosen).mean().
One function per loss plus a registry, so adding a loss is one function and one dict entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PREFERENCE_LOSSES",
    "dpo_loss",
    "implicit_rewards",
    "consistency_regularized_loss",
    "ipo_loss",
    "preference_accuracy",
    "preference_loss",
    "rpo_bwd_kl_loss",
    "rpo_fwd_kl_loss",
    "rpo_sq_loss",
    "scale_loss",
    "sequence_logps",
    "sft_loss",
]


# ------------------------------------------------------------------------------------------- token log-probs
def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor, average: bool = False) -> Tensor:
    """Masked sum (or mean) of log p(input_ids[t+1] | <= t) over the response tokens of each sequence.

    Args:
        logits: [B, T, V] model outputs; logits[:, t] predict input_ids[:, t + 1].
        input_ids: [B, T] token ids (padding may hold any id, e.g. -100: masked targets are never gathered).
        loss_mask: [B, T], 1 on response tokens (including the end token), 0 on prompt and padding. Position 0
            can never be a target, so the mask used is loss_mask[:, 1:].
        average: divide by the number of scored tokens (clamped to >= 1) instead of summing.

    Returns:
        [B] float tensor (float32, or float64 when the logits are float64).

    log p = logit[target] - logsumexp(logits): one [B, T-1] reduction instead of a [B, T-1, V] log_softmax, and
    rows are upcast one at a time so bf16 logits never need a full float32 copy.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"expected logits [B,T,V], input_ids and loss_mask [B,T]; got {tuple(logits.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(loss_mask.shape)}"
        )
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    mask = loss_mask[:, 1:].bool()
    targets = torch.where(mask, input_ids[:, 1:], torch.zeros_like(input_ids[:, 1:])).long()
    per_row = []
    for row_logits, row_targets, row_mask in zip(logits[:, :-1], targets, mask):
        row_logits = row_logits.to(compute_dtype)  # [T-1, V]
        target_logit = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        token_logp = target_logit - torch.logsumexp(row_logits, dim=-1)
        # where, not multiply: a non-finite logit on a masked position must not leak into the sum
        per_row.append(torch.where(row_mask, token_logp, torch.zeros_like(token_logp)).sum())
    total = torch.stack(per_row)
    if average:
        return total / mask.sum(dim=1).clamp(min=1).to(compute_dtype)
    return total


def sft_loss(logits: Tensor, input_ids: Tensor, loss_mask: Tensor, average: bool = True) -> Tensor:
    """Per-sample negative log-likelihood of the response tokens, [B] (mean over tokens when average)."""
    return -sequence_logps(logits, input_ids, loss_mask, average=average)


# ------------------------------------------------------------------------------------------ preference losses
def _as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _margins(chosen_logratio, rejected_logratio, chosen_score, rejected_score, beta, gt_reward_scale):
    """(b*D, g): the policy's implicit reward margin and the judge's scaled score margin."""
    policy_margin = _as_tensor(beta, chosen_logratio) * (chosen_logratio - rejected_logratio)
    score_margin = _as_tensor(gt_reward_scale, chosen_logratio) * (
        _as_tensor(chosen_score, chosen_logratio) - _as_tensor(rejected_score, chosen_logratio)
    )
    return policy_margin, score_margin


def _bernoulli_kl(logit_p: Tensor, logit_q: Tensor) -> Tensor:
    """KL(Bern(sig(logit_p)) || Bern(sig(logit_q))) via logsigmoid; exactly 0 when logit_p == logit_q."""
    return torch.sigmoid(logit_p) * (F.logsigmoid(logit_p) - F.logsigmoid(logit_q)) + torch.sigmoid(-logit_p) * (
        F.logsigmoid(-logit_p) - F.logsigmoid(-logit_q)
    )


def dpo_loss(*, chosen_logratio, rejected_logratio, chosen_score, rejected_score, beta, gt_reward_scale=1.0):
    """DPO (Rafailov et al. 2023): -logsigmoid(b*D). Scores are ignored."""
    return -F.logsigmoid(_as_tensor(beta, chosen_logratio) * (chosen_logratio - rejected_logratio))


def scale_loss(*, chosen_logratio, rejected_logratio, chosen_score, rejected_score, beta, gt_reward_scale=1.0):
    """DPO weighted by the judge margin |s_c - s_r|: pairs the judge barely separates count little."""
    dpo = dpo_loss(
        chosen_logratio=chosen_logratio, rejected_logratio=rejected_logratio,
        chosen_score=chosen_score, rejected_score=rejected_score, beta=beta,
    )
    weight = (_as_tensor(chosen_score, chosen_logratio) - _as_tensor(rejected_score, chosen_logratio)).abs()
    return weight * dpo


def rpo_bwd_kl_loss(*, chosen_logratio, rejected_logratio, chosen_score, rejected_score, beta, gt_reward_scale=1.0):
    """RPO, backward KL: KL(Bern(sig(g)) || Bern(sig(b*D))), the judge's preference as the target."""
    policy_margin, score_margin = _margins(
        chosen_logratio, rejected_logratio, chosen_score, rejected_score, beta, gt_reward_scale
    )
    return _bernoulli_kl(score_margin, policy_margin)


def rpo_fwd_kl_loss(*, chosen_logratio, rejected_logratio, chosen_score, rejected_score, beta, gt_reward_scale=1.0):
    """RPO, forward KL: KL(Bern(sig(b*D)) || Bern(sig(g)))."""
    policy_margin, score_margin = _margins(
        chosen_logratio, rejected_logratio, chosen_score, rejected_score, beta, gt_reward_scale
    )
    return _bernoulli_kl(policy_margin, score_margin)


def ipo_loss(*, chosen_logratio, rejected_logratio, chosen_score, rejected_score, beta, gt_reward_scale=1.0):
    """IPO (Azar et al. 2023, eq. 17): (D - 1/(2b))^2, minimised at D = 1/(2b). Scores are ignored."""
    beta_t = _as_tensor(beta, chosen_logratio)
    return (chosen_logratio - rejected_logratio - 1.0 / (2.0 * beta_t)) ** 2


def rpo_sq_loss(*, chosen_logratio, rejected_logratio, chosen_score, rejected_score, beta, gt_reward_scale=1.0):
    """RPO, squared distance: (b*D - g)^2, regress the implicit reward margin onto the judge margin."""
    policy_margin, score_margin = _margins(
        chosen_logratio, rejected_logratio, chosen_score, rejected_score, beta, gt_reward_scale
    )
    return (policy_margin - score_margin) ** 2


PreferenceLoss = Callable[..., Tensor]

# The names are harness.config.PREFERENCE_LOSSES (model.spin.preference_loss); tests check the two agree.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": dpo_loss,
    "scale": scale_loss,
    "rpo_bwd_kl": rpo_bwd_kl_loss,
    "rpo_fwd_kl": rpo_fwd_kl_loss,
    "ipo": ipo_loss,
    "rpo_sq": rpo_sq_loss,
}


def preference_loss(
    name: str,
    *,
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    chosen_score: float | Tensor,
    rejected_score: float | Tensor,
    beta: float | Tensor,
    gt_reward_scale: float = 1.0,
) -> Tensor:
    """Per-pair loss [B] of the named preference loss (see PREFERENCE_LOSSES)."""
    try:
        fn = PREFERENCE_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown preference loss {name!r}; valid names: {', '.join(PREFERENCE_LOSSES)}"
        ) from None
    return fn(
        chosen_logratio=chosen_logratio,
        rejected_logratio=rejected_logratio,
        chosen_score=chosen_score,
        rejected_score=rejected_score,
        beta=beta,
        gt_reward_scale=gt_reward_scale,
    )


def consistency_regularized_loss(
    name: str,
    consistency: Tensor,
    *,
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    chosen_score: float | Tensor,
    rejected_score: float | Tensor,
    beta: float | Tensor,
    gt_reward_scale: float = 1.0,
) -> Tensor:
    """CREAM's soft-label loss (arXiv 2410.12735, eq. 8): C * L(y_c > y_r) + (1 - C) * L(y_r > y_c), [B].

    consistency C in [0, 1] per pair (harness.cream): how far the previous iteration's judge agreed with the current
    one's ranking; C = 1 is the plain loss, C = 1/2 makes the pair's two orders cancel to a pull towards D = 0.
    For dpo: -C logsig(b*D) - (1 - C) logsig(-b*D)."""
    kw = {"beta": beta, "gt_reward_scale": gt_reward_scale}
    forward = preference_loss(name, chosen_logratio=chosen_logratio, rejected_logratio=rejected_logratio,
                              chosen_score=chosen_score, rejected_score=rejected_score, **kw)
    backward = preference_loss(name, chosen_logratio=rejected_logratio, rejected_logratio=chosen_logratio,
                               chosen_score=rejected_score, rejected_score=chosen_score, **kw)
    c = _as_tensor(consistency, forward)
    return c * forward + (1 - c) * backward


# ------------------------------------------------------------------------------------------------- metrics
def implicit_rewards(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float | Tensor) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards b*l for chosen and rejected, detached (they feed train/rewards_*_mean)."""
    beta_t = _as_tensor(beta, chosen_logratio)
    return (beta_t * chosen_logratio).detach(), (beta_t * rejected_logratio).detach()


def preference_accuracy(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float | Tensor) -> Tensor:
    """train/acc: fraction of pairs whose chosen implicit reward is strictly above the rejected one (scalar)."""
    rewards_chosen, rewards_rejected = implicit_rewards(chosen_logratio, rejected_logratio, beta)
    return (rewards_chosen > rewards_rejected).to(rewards_chosen.dtype).mean()
