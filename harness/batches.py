"""Tokenized training examples and preference pairs as model batches, and the pairs' log-probs.

    e = encode(tokenizer, prompt, response, max_len)      # ids + response mask, the prompt cut from the left
    ids, attn, mask = collate([e, ...], pad_id)           # one padded batch
    lc, lr, sft, nc, nr = pair_logps(model, chosen, rejected, pad_id, average)   # shared prompt computed once

The training loops (harness.train) and evaluation's validation loss read their batches from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness import parallel
from harness.losses import sequence_logps
from harness.packing import token_logps


@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]  # 1 on response tokens (incl. EOS), 0 on the prompt

    @property
    def response_len(self) -> int:
        return sum(self.mask)


def encode(tokenizer, prompt: str, response: str, max_len: int) -> Encoded:
    """Prompt and response tokenized apart (as generation sees them), EOS appended; the prompt is cut from the left."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    r = r[: max_len - 1]
    p = p[-(max_len - len(r)):]
    return Encoded(p + r, [0] * len(p) + [1] * len(r))


def collate(seqs: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), n), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.float32)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        attn[i, : len(s.ids)] = 1
        mask[i, : len(s.ids)] = torch.tensor(s.mask, dtype=torch.float32)
    return parallel.to_device(ids, attn, mask)


# ----------------------------------------------------------------------------------------------------- shared prompts
def pack_pairs(ch, rj, pad_id: int, dtype=torch.float32):
    """One row per pair: [prompt, chosen response, rejected response]; the rejected response attends to the prompt
    and itself only, at the positions it has in its own sequence, so each response's log-probs are those of the
    unpacked (prompt + response) sequence while the shared prompt is computed once. None when a pair's prompts
    differ (left-truncation cut them differently) or a prompt is empty (its first response token is not scored)."""
    spans = []
    for c, r in zip(ch, rj):
        lp, lpr = c.mask.index(1), r.mask.index(1)
        if lp == 0 or c.ids[:lp] != r.ids[:lpr]:
            return None
        spans.append((lp, len(c.ids) - lp, len(r.ids) - lpr))
    b_n, t_n = len(spans), max(sum(s) for s in spans)
    tc, tr = max(s[1] for s in spans), max(s[2] for s in spans)
    ids = torch.full((b_n, t_n), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b_n, t_n), dtype=torch.long)
    allowed = torch.eye(t_n, dtype=torch.bool).repeat(b_n, 1, 1)  # padding rows see themselves: no empty softmax
    idx = {k: torch.zeros((b_n, n), dtype=torch.long) for k, n in (("cp", tc), ("ct", tc), ("rp", tr), ("rt", tr))}
    cm, rm = torch.zeros((b_n, tc), dtype=torch.bool), torch.zeros((b_n, tr), dtype=torch.bool)
    for b, ((lp, lc, lr), c, r) in enumerate(zip(spans, ch, rj)):
        n = lp + lc + lr
        ids[b, :n] = torch.tensor(c.ids + r.ids[lp:])
        position_ids[b, :n] = torch.cat([torch.arange(lp + lc), torch.arange(lp, lp + lr)])
        causal = torch.ones((n, n), dtype=torch.bool).tril()
        causal[lp + lc:, lp:lp + lc] = False  # the rejected response never sees the chosen one
        allowed[b, :n, :n] = causal
        idx["cp"][b, :lc] = torch.arange(lp - 1, lp - 1 + lc)  # logits at t predict token t + 1
        idx["ct"][b, :lc] = ids[b, lp:lp + lc]
        idx["rp"][b, :lr] = torch.cat([torch.tensor([lp - 1]), torch.arange(lp + lc, lp + lc + lr - 1)])
        idx["rt"][b, :lr] = ids[b, lp + lc:n]
        cm[b, :lc], rm[b, :lr] = True, True
    mask = torch.zeros((b_n, 1, t_n, t_n), dtype=dtype).masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    return parallel.to_device(ids, position_ids, mask, (idx["cp"], idx["ct"], cm), (idx["rp"], idx["rt"], rm))


def _packed_pair_logps(model, ids, pos, amask, c, r):
    """Summed log-probs of the chosen and rejected responses of packed rows, and their token counts; the LM head
    runs only on the positions that predict a response token (harness.packing.token_logps)."""
    n, t_n = ids.shape
    rows = torch.arange(n, device=ids.device)[:, None]
    flat = [((rows * t_n + p)[m], t[m], rows.expand_as(p)[m] + k * n) for k, (p, t, m) in enumerate((c, r))]
    lp = token_logps(model, ids, amask, pos, torch.cat([f[0] for f in flat]), torch.cat([f[1] for f in flat]))
    total = torch.zeros(2 * n, dtype=lp.dtype, device=lp.device).index_add(0, torch.cat([f[2] for f in flat]), lp)
    return total[:n], total[n:], c[2].sum(1).to(lp.dtype), r[2].sum(1).to(lp.dtype)


def pair_logps(model, ch: list[Encoded], rj: list[Encoded], pad_id: int, average: bool,
               sft_average: bool | None = None):
    """(chosen logps, rejected logps, chosen logps for the SFT term or None, chosen and rejected lengths) of a
    micro-batch of pairs: packed (the prompt computed once per pair) when possible, else one padded batch."""
    packed = pack_pairs(ch, rj, pad_id, next(model.parameters()).dtype)
    if packed is not None:
        sc, sr, nc, nr = _packed_pair_logps(model, *packed)
        lc, lr = (sc / nc.clamp(min=1), sr / nr.clamp(min=1)) if average else (sc, sr)
        sft = None if sft_average is None else lc if sft_average == average else (
            sc / nc.clamp(min=1) if sft_average else sc)
        return lc, lr, sft, nc, nr
    n = len(ch)
    ids, attn, mask = collate(ch + rj, pad_id)
    logits = model(input_ids=ids, attention_mask=attn).logits
    logps = sequence_logps(logits, ids, mask, average=average)
    sft = None if sft_average is None else logps[:n] if sft_average == average else sequence_logps(
        logits[:n], ids[:n], mask[:n], average=sft_average)
    return logps[:n], logps[n:], sft, mask[:n].sum(1), mask[n:].sum(1)
