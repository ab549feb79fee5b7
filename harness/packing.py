"""Packed sequences: several examples per row, each attending only to itself, at the positions it has alone.

    rows = plan(seqs, batch, capacity)             # rows of trees of examples sharing a prefix
    p = pack(seqs, rows, pad_id)                   # ids, position ids (depths), ancestor mask
    logps = packed_logps(model, p, average=True)   # one value per example (p.examples), as if alone

A padded batch of SFT examples (prompts of very different lengths: IFT answers, judge and meta-judge prompts) is
mostly padding; packed rows are mostly real tokens. Examples that share a prefix (the system turn, the judge
template, the same question judged for several answers) hold it once: the tokens of a row form a forest, each token
attends to its ancestors only, at its depth as position, so each example's log-probs and gradients are those of the
example alone (tests/test_packing.py; the shared prefix's gradient is the sum of the examples', as unpacked). The LM
head runs only on positions that predict a scored token (the prompt's logits are never needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Packed", "first_fit", "hidden_and_head", "pack", "packed_logps", "plan", "token_logps"]


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


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plan(seqs, items: list[int], capacity: int) -> list[list[list[int]]]:
    """Rows of trees of the examples `items` (indices into seqs): sorted by their tokens, consecutive examples that
    share a prefix form a tree holding that prefix once (at most `capacity` tokens in all), and the trees go into
    rows of `capacity` tokens, first-fit decreasing. A row is a list of trees, a tree a list of example indices."""
    order = sorted(items, key=lambda i: (seqs[i].ids, i))
    trees, sizes, prev = [], [], None
    for i in order:
        ids = seqs[i].ids
        cost = len(ids) - (_lcp(seqs[prev].ids, ids) if prev is not None else 0)
        if trees and sizes[-1] + cost <= capacity:
            trees[-1].append(i)
            sizes[-1] += cost
        else:
            trees.append([i])
            sizes.append(len(ids))
        prev = i
    return [[trees[t] for t in row] for row in first_fit(sizes, capacity)]


@dataclass
class Packed:
    ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]: a token's depth in its tree, so each example sees its own positions
    mask: torch.Tensor  # [R, 1, T, T] additive: 0 where a token sees an ancestor (or itself), dtype's min elsewhere
    pred: torch.Tensor  # [N] flat positions (into R*T) whose logits predict a scored token
    target: torch.Tensor  # [N] the scored token ids
    example: torch.Tensor  # [N] which example (0..n_examples-1, in the order of `examples`) each belongs to
    examples: list[int]  # the examples packed, as indices into seqs
    n_examples: int


def pack(seqs, rows: list[list[list[int]]], pad_id: int, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu") -> Packed:
    """Rows of trees (plan) as tensors. In a tree of examples sorted by tokens, example k shares its first
    lcp(k-1, k) tokens with the previous one (the longest prefix it shares with any earlier one), so each token is
    written once and attends exactly to the tokens of its own example before it: its log-probs and gradients are
    those of the example alone. seqs: objects with .ids and .mask (1 on scored tokens), e.g. batches.Encoded."""
    laid = []  # per row: (token ids, depths, [(example, node of each of its tokens)])
    for row in rows:
        toks, depth, paths = [], [], []
        for tree in row:
            path: list[int] = []
            prev = None
            for i in tree:
                ids = seqs[i].ids
                keep = _lcp(seqs[prev].ids, ids) if prev is not None else 0
                path = path[:keep] + list(range(len(toks), len(toks) + len(ids) - keep))
                toks += ids[keep:]
                depth += list(range(keep, len(ids)))
                paths.append((i, path))
                prev = i
        laid.append((toks, depth, paths))
    r_n, t_n = len(rows), max(len(x[0]) for x in laid)
    ids = torch.full((r_n, t_n), pad_id, dtype=torch.long)
    pos = torch.zeros((r_n, t_n), dtype=torch.long)
    allowed = torch.eye(t_n, dtype=torch.bool).repeat(r_n, 1, 1)  # padding sees itself: no empty softmax row
    pred, target, example, examples = [], [], [], []
    for r, (toks, depth, paths) in enumerate(laid):
        ids[r, :len(toks)] = torch.tensor(toks)
        pos[r, :len(toks)] = torch.tensor(depth)
        for i, path in paths:
            p = torch.tensor(path)
            allowed[r, p[:, None], p[None, :]] |= torch.ones(len(path), len(path), dtype=torch.bool).tril()
            s = seqs[i]
            scored = [k for k in range(1, len(s.ids)) if s.mask[k]]  # position 0 is never a target
            pred += [r * t_n + path[k - 1] for k in scored]
            target += [s.ids[k] for k in scored]
            example += [len(examples)] * len(scored)
            examples.append(i)
    mask = torch.zeros((r_n, 1, t_n, t_n), dtype=dtype).masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    longs = [torch.tensor(x, dtype=torch.long) for x in (pred, target, example)]
    return Packed(*(x.to(device) for x in (ids, pos, mask, *longs)), examples, len(examples))


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
    total = torch.zeros(p.n_examples, dtype=lp.dtype, device=lp.device).index_add(0, p.example, lp)
    if not average:
        return total
    count = torch.zeros_like(total).index_add(0, p.example, torch.ones_like(lp))
    return total / count.clamp(min=1)
