"""Batched sampling with a KV cache, per-sample RNG, end strings and prefix sharing (DESIGN.md: generation/).

    responses = generate(policy, prompts, num_samples=4, sampling_params=sp, length_params=lp,
                         seed_parts=[(seed, iteration, pid) for pid in prompt_ids])

Determinism: sample j of prompt i draws every random number from item_generator(*seed_parts[i], j) (one uniform per
step, drawn up front), and all per-row maths (penalties, softmax, top-k/p, inverse CDF) works row by row. On the
LeanLlama path the logits themselves are bit-identical in any batch on CPU (see runners.ROW_ALIGN), so a response never
depends on batch size, prompt order or worker count. The HF fallback path is invariant only up to GEMM rounding.

Speed: a Llama-family model runs through LeanLlama (fused QKV and gate/up weights, a preallocated KV cache, matmul
attention, no per-layer Python beyond the kernels); any other model goes through its own HF forward + DynamicCache.
Each prompt is prefilled once and its cache copied to its samples (prefix sharing).
"""

from __future__ import annotations

from typing import Any

import torch

from harness.determinism import item_generator
from harness.generation.runners import HFRunner, LeanLlama


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
