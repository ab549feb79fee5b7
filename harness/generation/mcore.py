"""KV-cached generation for the `mcore` backend through megatron-core's StaticInferenceContext.

Same interface as the sampler's LeanLlama and HFRunner (prefill / step / select), so sampling, end strings and
per-sample RNG are shared. The static context writes every row's keys and values at one common column, so prompts
are left-padded: each row gets its own rotary positions (column - padding) and a mask that hides its padding columns.
Each prompt is prefilled once and its cache copied to its samples (prefix sharing).
"""

from __future__ import annotations

import torch


class MCoreRunner:
    def __init__(self, lm):
        self.lm = lm  # harness.models.mcore.MCoreLM

    def _call(self, ids: torch.Tensor, q_cols: slice) -> torch.Tensor:
        """Logits [B, V] of the last of `ids` [B, t], written at columns q_cols of the cache."""
        blocked = ~(self.valid[:, None, None, : q_cols.stop] & self.causal[None, None, q_cols, : q_cols.stop])
        # With the Transformer Engine spec, megatron drops the mask in decode steps of an eval-mode model (a batch of
        # equal-length prompts needs none); in train mode (TE >= 2.2) it keeps it, and dropout is 0 here.
        was_training = self.lm.gpt.training
        self.lm.gpt.train(self.lm.te)
        try:
            logits = self.lm.logits(ids, self.rope, blocked, context=self.ctx, last_only=True)[:, -1].float()
        finally:
            self.lm.gpt.train(was_training)
        self.ctx.increment_sequence_len_offset(ids.shape[1])
        return logits

    def prefill(self, ids, lengths, rep_idx, max_new):
        from megatron.core.inference.contexts import StaticInferenceContext

        P, T = ids.shape
        n = T + max_new
        pad = T - lengths
        shift = (torch.arange(T, device=ids.device)[None] - pad[:, None]) % T  # right- to left-padded
        ids = ids.gather(1, shift)
        cols = torch.arange(n, device=ids.device)
        self.valid = cols[None] >= pad[:, None]  # [P, n] columns holding a real token (or a future one)
        self.causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        self.rope = self.lm.rope((cols[None] - pad[:, None]).clamp(min=0))  # [n, P, 1, D]
        self.ctx = StaticInferenceContext(max_batch_size=P, max_sequence_length=n)
        logits = self._call(ids, slice(0, T))
        self.ctx.enable_decode_mode()
        self.select(rep_idx)
        return logits.index_select(0, rep_idx)

    def step(self, tok):
        col = self.ctx.sequence_len_offset
        return self._call(tok[:, None], slice(col, col + 1))

    def select(self, idx):
        """Keep (or repeat) rows idx of the cache, positions and masks."""
        mem = self.ctx.key_value_memory_dict
        for layer, (k, v) in list(mem.items()):  # [seq, batch, groups, dim]
            mem[layer] = (k.index_select(1, idx), v.index_select(1, idx))
        self.ctx.max_batch_size = idx.numel()
        self.valid = self.valid.index_select(0, idx)
        self.rope = self.rope.index_select(1, idx)
