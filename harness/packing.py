"""Packed sequences: several examples per row, each attending only to itself, at the positions it has alone.

    rows = first_fit([len(s.ids) for s in seqs], capacity)       # example indices per row
    p = pack([seqs[i] for i in ...], rows, pad_id)               # ids, position_ids, block-diagonal 4D mask
    logps = packed_logps(model, p, average=True)                 # one value per example, as unpacked

A padded batch of SFT examples (prompts of very different lengths: IFT answers, judge and meta-judge prompts) is
mostly padding; packed rows are mostly real tokens. The block-diagonal causal mask and restarted position ids make
each example's log-probs those of the example alone (tests/test_packing.py), and the LM head runs only on the
positions that predict a scored token (the prompt's logits are never needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Packed", "first_fit", "hidden_and_head", "pack", "packed_logps", "token_logps"]


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped into rows whose lengths sum to <= capacity (deterministic: ties by
    index). A length above capacity gets a row of its own."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


@dataclass
class Packed:
    ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T], restarting at 0 for every example
    mask: torch.Tensor  # [R, 1, T, T] additive: 0 where allowed, dtype's min elsewhere
    pred: torch.Tensor  # [N] flat positions (into R*T) whose logits predict a scored token
    target: torch.Tensor  # [N] the scored token ids
    example: torch.Tensor  # [N] which example each scored token belongs to
    n_examples: int


def pack(seqs, rows: list[list[int]], pad_id: int, dtype: torch.dtype = torch.float32) -> Packed:
    """seqs: objects with .ids and .mask (1 on scored tokens), e.g. train.Encoded; rows: indices into seqs."""
    t_n = max(sum(len(seqs[i].ids) for i in row) for row in rows)
    r_n = len(rows)
    ids = torch.full((r_n, t_n), pad_id, dtype=torch.long)
    pos = torch.zeros((r_n, t_n), dtype=torch.long)
    seg = torch.full((r_n, t_n), -1, dtype=torch.long)  # example index per position, -1 on padding
    pred, target, example = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s, n = seqs[i], len(seqs[i].ids)
            ids[r, at:at + n] = torch.tensor(s.ids)
            pos[r, at:at + n] = torch.arange(n)
            seg[r, at:at + n] = i
            scored = [k for k in range(1, n) if s.mask[k]]  # position 0 is never a target
            pred += [r * t_n + at + k - 1 for k in scored]
            target += [s.ids[k] for k in scored]
            example += [i] * len(scored)
            at += n
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    causal = pos[:, :, None] >= pos[:, None, :]
    allowed = (same & causal) | torch.eye(t_n, dtype=torch.bool)  # padding sees itself: no empty softmax row
    mask = torch.zeros((r_n, 1, t_n, t_n), dtype=dtype).masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    return Packed(ids, pos, mask, torch.tensor(pred, dtype=torch.long), torch.tensor(target, dtype=torch.long),
                  torch.tensor(example, dtype=torch.long), len(seqs))


def hidden_and_head(model):
    """(decoder, lm_head) of an HF causal LM, or None for a model without that split (then full logits are used)."""
    get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_dec is None or get_head is None:
        return None
    dec, head = get_dec(), get_head()
    return (dec, head) if dec is not None and head is not None and dec is not model else None


def token_logps(model, ids, attention_mask, position_ids, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p(target | logits at flat position pred) for a batch [R, T]; the LM head only on the pred positions."""
    split = hidden_and_head(model)
    if split is None:
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits
        sel = logits.reshape(-1, logits.shape[-1])[pred]
    else:
        dec, head = split
        h = dec(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        sel = head(h.reshape(-1, h.shape[-1])[pred])
    sel = sel.float()
    return sel.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(sel, dim=-1)


def packed_logps(model, p: Packed, average: bool) -> torch.Tensor:
    """[n_examples] masked sum (or mean) of each example's scored-token log-probs, as if it were alone."""
    lp = token_logps(model, p.ids, p.mask, p.position_ids, p.pred, p.target)
    total = torch.zeros(p.n_examples, dtype=lp.dtype).index_add(0, p.example, lp)
    if not average:
        return total
    count = torch.zeros(p.n_examples, dtype=lp.dtype).index_add(0, p.example, torch.ones_like(lp))
    return total / count.clamp(min=1)
