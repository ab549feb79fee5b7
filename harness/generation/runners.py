"""The model runners generation drives: prefill a batch of prompts, then one token per step, over a KV cache.

    runner = LeanLlama(model) if LeanLlama.supports(model) else HFRunner(model)
    logits = runner.prefill(ids, lengths, rep_idx, max_new)   # each prompt once, its cache copied to its samples
    logits = runner.step(tokens); runner.select(rows_still_running)

LeanLlama runs a Llama-family model with fused QKV and gate/up weights, a preallocated KV cache and matmul attention,
and keeps a response's logits bit-identical in any batch on CPU (ROW_ALIGN, KV_ALIGN); HFRunner runs any other HF
causal LM through its own forward and a DynamicCache. generation/mcore.py has the same interface for megatron-core.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")  # same block; qwen2 adds q/k/v biases
FUSE_MAX_PARAMS = 200_000_000  # fusing copies the weights once per call: fine for small models, not for a 7B
# Batch invariance on CPU (MKL): a GEMM row's result depends on the row count only through its M mod 4 tail, and a
# softmax/matmul over keys is unchanged by masked trailing keys when the key count is a multiple of 64. So rows are
# padded to ROW_ALIGN and key lengths to KV_ALIGN, and a response's logits are bit-identical in any batch.
ROW_ALIGN, KV_ALIGN = 8, 64


class LeanLlama:
    """A Llama-family forward over a preallocated KV cache, reading the weights of an HF LlamaForCausalLM.

    Use: prefill(ids, lengths, rep_idx, max_new) -> logits of each row's last prompt token; step(tok) -> next logits;
    select(idx) keeps only those rows (drops finished sequences). Matches HF's logits to float rounding.
    """

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in LEAN_MODEL_TYPES:
            return False
        rope = getattr(cfg, "rope_parameters", None) or {}
        layer = model.model.layers[0]
        # A sliding window (Mistral) changes attention; fall back to HF's forward rather than mimic it.
        no_window = getattr(cfg, "sliding_window", None) is None or getattr(cfg, "use_sliding_window", True) is False
        return (no_window and rope.get("rope_type", "default") == "default" and getattr(cfg, "hidden_act", "") == "silu"
                and layer.mlp.gate_proj.bias is None and layer.self_attn.o_proj.bias is None)

    def __init__(self, model: torch.nn.Module):
        cfg, m = model.config, model.model
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.eps, self.hidden = cfg.rms_norm_eps, cfg.hidden_size
        self.fused = sum(p.numel() for p in model.parameters()) <= FUSE_MAX_PARAMS
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            wq = torch.cat([p.weight for p in qkv]) if self.fused else [p.weight for p in qkv]
            bq = None if a.q_proj.bias is None else (torch.cat([p.bias for p in qkv]) if self.fused
                                                     else [p.bias for p in qkv])
            wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) if self.fused else (
                mlp.gate_proj.weight, mlp.up_proj.weight)
            self.layers.append((layer.input_layernorm.weight, wq, bq, a.o_proj.weight,
                                layer.post_attention_layernorm.weight, wgu, mlp.down_proj.weight))
        self.embed, self.norm, self.lm_head = m.embed_tokens.weight, m.norm.weight, model.lm_head.weight
        self.inv_freq, self.rope_scale = m.rotary_emb.inv_freq, float(m.rotary_emb.attention_scaling)
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.scale = self.hd ** -0.5

    # ---------------------------------------------------------------------------------------------- pieces
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden,), w, self.eps)
        return w * F.rms_norm(x.float(), (self.hidden,), None, self.eps).to(x.dtype)  # HF: norm in fp32

    def _rope_table(self, n: int) -> None:
        # Same arithmetic as HF's LlamaRotaryEmbedding, so cos/sin are bit-identical to it.
        freqs = torch.arange(n, device=self.device, dtype=torch.float32)[:, None] * self.inv_freq.float()[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = self.hd // 2
        self.cos = (emb.cos() * self.rope_scale).to(self.dtype)
        sin = (emb.sin() * self.rope_scale).to(self.dtype)
        # rotate_half(x) * sin == x.roll(half) * [-sin_1, sin_2]: one roll instead of two slices, a neg and a cat.
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + x.roll(self.hd // 2, dims=-1) * sin

    def _forward(self, x, pos, mask, kc, vc, write, kv_len: int) -> torch.Tensor:
        """x [B,T,H] at positions pos [B,T]; write(cache, kv [B,T,nkv,hd]) stores K/V; attends to :kv_len.

        Attention is plain matmul + softmax (not SDPA): with kv_len a multiple of KV_ALIGN its result for a row does
        not depend on the other rows or on masked trailing columns (SDPA's does), and it is faster at these sizes.
        """
        B, T, _ = x.shape
        nh, nkv, hd = self.nh, self.nkv, self.hd
        g = nh // nkv
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # [B,T,1,hd]
        for li, (w1, wq, bq, wo, w2, wgu, wd) in enumerate(self.layers):
            h = self._rms(x, w1)
            if self.fused:
                qkv = F.linear(h, wq, bq).view(B, T, nh + 2 * nkv, hd)
                qk = self._rotate(qkv[:, :, : nh + nkv], cos, sin)
                q, k, v = qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv:]
            else:
                bs = bq or (None, None, None)
                q = self._rotate(F.linear(h, wq[0], bs[0]).view(B, T, nh, hd), cos, sin)
                k = self._rotate(F.linear(h, wq[1], bs[1]).view(B, T, nkv, hd), cos, sin)
                v = F.linear(h, wq[2], bs[2]).view(B, T, nkv, hd)
            write(kc[li], k)
            write(vc[li], v)
            # GQA without copying K/V: the g query heads of one kv head become g*T query rows of one matmul.
            q = q.permute(0, 2, 1, 3).reshape(B, nkv, g * T, hd)
            s = torch.matmul(q, kc[li][:, :, :kv_len].transpose(-1, -2)) * self.scale
            s = s.masked_fill(mask, float("-inf"))
            a = torch.matmul(torch.softmax(s, dim=-1), vc[li][:, :, :kv_len])  # [B,nkv,g*T,hd]
            a = a.view(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)
            x = x + F.linear(a, wo)
            h = self._rms(x, w2)
            if self.fused:
                gate, up = F.linear(h, wgu).chunk(2, dim=-1)
            else:
                gate, up = F.linear(h, wgu[0]), F.linear(h, wgu[1])
            x = x + F.linear(F.silu(gate) * up, wd)
        return self._rms(x, self.norm)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head on [N,H] rows, padded to ROW_ALIGN rows so a row's logits never depend on N."""
        n = h.shape[0]
        pad = -n % ROW_ALIGN
        if pad:
            h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
        return F.linear(h, self.lm_head)[:n].float()

    def _cache(self, B: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shape = (B, self.nkv, n, self.hd)
        mk = lambda: [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]  # noqa: E731
        return mk(), mk()

    def _prefill_hidden(self, ids: torch.Tensor, extra: int = 0):
        """Hidden states [P,T,H] of right-padded prompts (T a multiple of ROW_ALIGN) and their K/V caches.

        Right padding puts every prompt at column 0, so a prompt's numbers never depend on its neighbours; causal
        attention alone keeps real tokens off the pads, and pad rows (finite garbage) are never read.
        """
        P, T = ids.shape
        self._rope_table(T + extra)
        pos = torch.arange(T, device=self.device).expand(P, T)
        n = T + -T % KV_ALIGN  # keys padded (zeros, masked) so the attention reductions are batch-invariant
        mask = (torch.arange(n, device=self.device)[None] > torch.arange(T, device=self.device)[:, None])
        mask = mask.repeat(self.nh // self.nkv, 1)
        kc, vc = self._cache(P, n)

        def write(cache, kv):
            cache[:, :, :T] = kv.transpose(1, 2)

        return self._forward(F.embedding(ids, self.embed), pos, mask, kc, vc, write, n), kc, vc

    # ---------------------------------------------------------------------------------------------- public
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B,T,V] of a right-padded batch (as Policy.forward_logits); pad positions are meaningless."""
        B, T = input_ids.shape
        ids = F.pad(input_ids, (0, -T % ROW_ALIGN))
        return F.linear(self._prefill_hidden(ids)[0][:, :T], self.lm_head)

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, rep_idx: torch.Tensor, max_new: int) -> torch.Tensor:
        """Prefill P right-padded prompts once, copy each one's cache to its rows (rep_idx [B] -> prompt index);
        return the [B,V] logits of every row's last prompt token."""
        P, T = ids.shape
        ids = F.pad(ids, (0, -T % ROW_ALIGN))  # P*T rows: a multiple of ROW_ALIGN
        h, kp, vp = self._prefill_hidden(ids, max_new)
        self.B = rep_idx.numel()
        idx = _align_rows(rep_idx)
        n = ids.shape[1] + max_new
        self.kc, self.vc = self._cache(idx.numel(), n + -n % KV_ALIGN)
        for li in range(len(self.layers)):
            self.kc[li][:, :, : ids.shape[1]] = kp[li][:, :, : ids.shape[1]].index_select(0, idx)
            self.vc[li][:, :, : ids.shape[1]] = vp[li][:, :, : ids.shape[1]].index_select(0, idx)
        self.col = lengths.index_select(0, idx)  # next cache column = next position of every row
        last = h[torch.arange(P, device=self.device), lengths - 1]
        return self._head(last).index_select(0, rep_idx)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return the next logits [B,V]."""
        n, col = self.col.numel(), self.col
        tok = torch.cat([tok, tok[:1].expand(n - tok.numel())])
        rows = torch.arange(n, device=self.device)

        def write(cache, kv):
            cache[rows, :, col] = kv[:, 0].to(cache.dtype)  # bf16 under autocast (trainer.precision=bf16)

        kv_len = int(col.max()) + 1
        kv_len = min(kv_len + -kv_len % KV_ALIGN, self.kc[0].shape[2])
        mask = (torch.arange(kv_len, device=self.device) > col[:, None])[:, None, None]
        h = self._forward(F.embedding(tok[:, None], self.embed), col[:, None], mask, self.kc, self.vc, write, kv_len)
        self.col = col + 1
        return self._head(h[:, 0])[: self.B]

    def select(self, idx: torch.Tensor) -> None:
        self.B = idx.numel()
        idx = _align_rows(idx)
        self.kc = [k.index_select(0, idx) for k in self.kc]
        self.vc = [v.index_select(0, idx) for v in self.vc]
        self.col = self.col.index_select(0, idx)


def _align_rows(idx: torch.Tensor) -> torch.Tensor:
    """Pad a row index to a multiple of ROW_ALIGN with copies of its first row (results of the copies are unused)."""
    pad = -idx.numel() % ROW_ALIGN
    return torch.cat([idx, idx[:1].expand(pad)]) if pad else idx


class HFRunner:
    """Any HF causal LM through its own forward and a DynamicCache (same interface as LeanLlama)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it

    def _call(self, ids, pos):
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                         **{self.cache_kw: self.cache})
        self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None) or self.cache
        return out.logits[:, -1].float()

    def prefill(self, ids, lengths, rep_idx, max_new):
        from transformers import DynamicCache

        # Right- to left-padded: an appending cache needs every row's last prompt token in the last column.
        T = ids.shape[1]
        shift = (torch.arange(T, device=ids.device)[None] - (T - lengths[:, None])) % T
        ids = ids.gather(1, shift)
        self.cache, self.mask = DynamicCache(), (shift < lengths[:, None]).long()
        pos = (self.mask.cumsum(1) - 1).clamp(min=0)
        logits = self._call(ids, pos)
        self.cache.batch_select_indices(rep_idx)
        self.mask, self.pos = self.mask.index_select(0, rep_idx), pos[:, -1].index_select(0, rep_idx) + 1
        return logits.index_select(0, rep_idx)

    def step(self, tok):
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        logits = self._call(tok[:, None], self.pos[:, None])
        self.pos = self.pos + 1
        return logits

    def select(self, idx):
        self.cache.batch_select_indices(idx)
        self.mask, self.pos = self.mask.index_select(0, idx), self.pos.index_select(0, idx)
