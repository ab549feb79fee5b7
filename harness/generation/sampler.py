"""Batched sampling with a KV cache, per-sample RNG, end strings and prefix sharing (DESIGN.md: generation/).

    responses = generate(policy, prompts, num_samples=4, sampling_params=sp, length_params=lp,
                         seed_parts=[(seed, iteration, pid) for pid in prompt_ids])

Determinism: sample j of prompt i draws every random number from item_generator(*seed_parts[i], j) (one uniform per
step, drawn up front), and all per-row maths (penalties, softmax, top-k/p, inverse CDF) works row by row. On the
LeanLlama path the logits themselves are bit-identical in any batch on CPU (see ROW_ALIGN), so a response never
depends on batch size, prompt order or worker count. The HF fallback path is invariant only up to GEMM rounding.

Speed: a Llama-family model runs through LeanLlama (fused QKV and gate/up weights, a preallocated KV cache, matmul
attention, no per-layer Python beyond the kernels); any other model goes through its own HF forward + DynamicCache.
Each prompt is prefilled once and its cache copied to its samples (prefix sharing).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from harness.determinism import item_generator

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


# -------------------------------------------------------------------------------------------------- sampling
def process_logits(logits, sp, presence: torch.Tensor | None, no_stop_ids: list[int] | None) -> torch.Tensor:
    """HF order: repetition penalty, min-length mask, then temperature. Row-wise only."""
    if presence is not None and sp.repetition_penalty != 1.0:
        # HF semantics over prompt + generated tokens: positive logits divided, negative multiplied.
        pen = torch.where(logits < 0, logits * sp.repetition_penalty, logits / sp.repetition_penalty)
        logits = torch.where(presence, pen, logits)
    if no_stop_ids:
        logits = logits.index_fill(1, torch.tensor(no_stop_ids, device=logits.device), float("-inf"))
    if not sp.use_greedy and sp.temperature != 1.0:
        logits = logits / sp.temperature
    return logits


def choose_tokens(logits: torch.Tensor, sp, u: torch.Tensor | None) -> torch.Tensor:
    """Greedy argmax, or inverse-CDF sampling of the top-k / top-p filtered distribution with one uniform per row."""
    if sp.use_greedy:
        return logits.argmax(-1)
    idx = None
    if sp.top_k > 0 or sp.top_p < 1.0:
        logits, idx = torch.sort(logits, dim=-1, descending=True, stable=True)  # kept tokens form a prefix
        if sp.top_k > 0:
            logits[:, sp.top_k:] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        cum = probs.cumsum(-1)
        probs = probs.masked_fill(cum - probs >= sp.top_p, 0.0)  # keep the smallest prefix reaching top_p
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(u[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    choice = torch.searchsorted(cdf, x, right=True)  # first token whose cdf exceeds x: never a zero-prob one
    return choice[:, 0] if idx is None else idx.gather(1, choice)[:, 0]


class EndStrings:
    """Detect an end string completed by the newest token, decoding only a short tail of the response."""

    def __init__(self, tokenizer, end_strings: list[str]):
        self.ends = [e for e in end_strings if e]
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.decode = ((lambda ids: backend.decode(ids, skip_special_tokens=False)) if backend is not None else
                       (lambda ids: tokenizer.decode(ids, skip_special_tokens=False)))
        self.window = max((len(e.encode()) for e in self.ends), default=0) + 2  # every token is >= 1 byte
        vocab = tokenizer.get_vocab()
        self.single_ids = sorted({vocab[e] for e in self.ends if e in vocab})  # masked before min_length

    def _find(self, text: str, after: int) -> int:
        """Start of the earliest end string occurrence that ends beyond character `after`, or -1."""
        hits = [p for e in self.ends if (p := text.find(e, max(0, after - len(e) + 1))) >= 0]
        return min(hits) if hits else -1

    def hit(self, ids: list[int]) -> bool:
        if not self.ends:
            return False
        tail = ids[-self.window:]
        return self._find(self.decode(tail), len(self.decode(tail[:-1]))) >= 0

    def final_text(self, ids: list[int], ended: bool) -> str:
        text = self.decode(ids)
        if ended:
            text = text[: self._find(text, len(self.decode(ids[:-1])))]
        return text


# -------------------------------------------------------------------------------------------------- generate
@torch.inference_mode()
def generate(policy, prompts: list[str], *, num_samples: int, sampling_params, length_params,
             seed_parts: list[tuple], batch_size: int = 32, progress: bool = False,
             desc: str = "generate", stats: dict | None = None) -> list[list[dict]]:
    """For each prompt, num_samples dicts {"text", "num_tokens", "is_end"}.

    is_end: stopped by EOS (not in text) or an end string (stripped from text with anything after it); False when
    length_params.max_length new tokens were reached. num_tokens counts generated tokens up to and including the
    end token. EOS and single-token end strings are masked before min_length tokens, and an end string only counts
    when its last token is at index >= min_length. batch_size counts sequences (prompt x sample).

    A prompt longer than the model's context minus max_length keeps its last tokens (cut from the left, as NeMo
    does); stats["truncated_prompts"] counts them.
    """
    if len(seed_parts) != len(prompts):
        raise ValueError(f"seed_parts: one tuple per prompt, got {len(seed_parts)} for {len(prompts)} prompts")
    if num_samples < 1 or batch_size < 1:
        raise ValueError("num_samples and batch_size must be >= 1")
    sp, lp, tok = sampling_params, length_params, policy.tokenizer
    enc = [list(ids) for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]] if prompts else []
    bos = tok.bos_token_id
    # The prompt text is used as rendered (a template that wants BOS writes it); only an empty prompt gets one.
    enc = [ids or ([bos] if bos is not None else []) for ids in enc]
    if any(not ids for ids in enc):
        raise ValueError("an empty prompt needs a tokenizer with a BOS token")
    model = policy.model
    room = context_length(model) - lp.max_length
    if room < 1:
        from harness.config import ConfigError

        raise ConfigError(f"model.spin.length_params.max_length={lp.max_length} leaves no room for a prompt in the "
                          f"model's context of {context_length(model)} tokens")
    if stats is not None:
        stats["truncated_prompts"] = sum(len(ids) > room for ids in enc)
    enc = [ids[-room:] for ids in enc]
    with policy.autocast():  # trainer.precision: bf16 compute when asked
        return _generate(policy, prompts, enc, num_samples, sp, lp, seed_parts, batch_size, progress, desc)


def _generate(policy, prompts, enc, num_samples, sp, lp, seed_parts, batch_size, progress, desc) -> list[list[dict]]:
    tok = policy.tokenizer
    model = policy.model
    if hasattr(model, "generation_runner"):  # a backend with its own KV cache (mcore: megatron's inference context)
        runner = model.generation_runner()
    else:
        runner = LeanLlama(model) if LeanLlama.supports(model) else HFRunner(model)
    ends = EndStrings(tok, list(sp.end_strings or []))
    results: list[list[Any]] = [[None] * num_samples for _ in prompts]
    # Sorting by length keeps padding small; it cannot change a response (each row has its own RNG).
    order = sorted(range(len(prompts)), key=lambda i: (len(enc[i]), i))
    rows = [(i, j) for i in order for j in range(num_samples)]
    batches = [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
    from harness.progress import progress as progress_bar

    bar = progress_bar(len(rows), desc, unit="seq", enabled=progress)
    for batch in batches:
        for (i, j), res in zip(batch, _generate_batch(runner, policy, enc, batch, seed_parts, sp, lp, ends)):
            results[i][j] = res
        bar.update(len(batch))
    bar.close()
    return results


def context_length(model) -> int:
    """Positions the model was trained for (config.max_position_embeddings); unbounded when it does not say."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else 1 << 62


def _generate_batch(runner, policy, enc, batch, seed_parts, sp, lp, ends: EndStrings) -> list[dict]:
    device = policy.device
    uniq = list(dict.fromkeys(i for i, _ in batch))
    slot = {i: k for k, i in enumerate(uniq)}
    rep_idx = torch.tensor([slot[i] for i, _ in batch], device=device)
    lengths = torch.tensor([len(enc[i]) for i in uniq])
    ids = torch.full((len(uniq), int(lengths.max())), policy.pad_token_id, dtype=torch.long)
    for k, i in enumerate(uniq):  # right padding (LeanLlama keeps every prompt at column 0)
        ids[k, : len(enc[i])] = torch.tensor(enc[i])
    B, max_new, min_len = len(batch), lp.max_length, lp.min_length
    # All of a sample's randomness, drawn up front from its own generator: step s uses u[:, s].
    u = None if sp.use_greedy else torch.stack(
        [torch.rand(max_new, generator=item_generator(*seed_parts[i], j)) for i, j in batch]).to(device)
    logits = runner.prefill(ids.to(device), lengths.to(device), rep_idx, max_new)
    presence = None  # [B, V] tokens seen so far (prompt included), for the repetition penalty
    if sp.repetition_penalty != 1.0:
        presence = torch.zeros(len(uniq), logits.shape[1], dtype=torch.bool)
        for k, i in enumerate(uniq):
            presence[k, enc[i]] = True
        presence = presence.to(device).index_select(0, rep_idx)
    eos = policy.eos_token_id
    no_stop = sorted({eos, *ends.single_ids})
    live = list(range(B))  # original row of each current batch position
    out: list[list[int]] = [[] for _ in range(B)]
    res: list[dict | None] = [None] * B
    for s in range(max_new):
        lg = process_logits(logits.float(), sp, presence, no_stop if s < min_len else None)  # bf16 under autocast
        tok = choose_tokens(lg, sp, None if u is None else u[live, s] if len(live) < B else u[:, s])
        for r, t in zip(live, tok.tolist()):
            if res[r] is not None:
                continue  # finished, waiting to be dropped from the batch
            out[r].append(t)
            if t == eos:
                res[r] = {"text": ends.decode(out[r][:-1]), "num_tokens": len(out[r]), "is_end": True}
            elif s >= min_len and ends.hit(out[r]):
                res[r] = {"text": ends.final_text(out[r], True), "num_tokens": len(out[r]), "is_end": True}
            elif s + 1 == max_new:
                res[r] = {"text": ends.final_text(out[r], False), "num_tokens": len(out[r]), "is_end": False}
        keep = [k for k, r in enumerate(live) if res[r] is None]
        if not keep:
            break
        if presence is not None:
            presence[torch.arange(len(live), device=device), tok] = True
        if len(keep) <= len(live) // 2:  # drop finished rows once they are half the batch
            idx = torch.tensor(keep, device=device)
            runner.select(idx)
            tok, live = tok.index_select(0, idx), [live[k] for k in keep]
            presence = None if presence is None else presence.index_select(0, idx)
        logits = runner.step(tok)
    return res
