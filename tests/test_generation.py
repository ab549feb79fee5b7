"""Sampler: lean forward == HF forward, batch/order invariance, greedy == one-at-a-time, stopping rules for real."""

import random
from types import SimpleNamespace

import pytest
import torch

from harness.config import LengthParams, SamplingParams, Tiny
from harness.generation import generate
from harness.generation.sampler import LeanLlama, choose_tokens, process_logits
from harness.models.base import Policy
from harness.models.hf import build_tiny
from harness.models.tokenizer import train_tokenizer

WORDS = "the a cat dog runs jumps over under big small red blue green apple answer question score".split()
SMALL = Tiny(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(100)], 300)


@pytest.fixture(scope="module")
def policy(tok):
    return build_tiny(SMALL, tok, seed=0)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1)  # lengths 1..40 words, so padding differs a lot between batches
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(10)]


def _gen(policy, prompts, sp, lp, n=1, bs=32, seed_parts=None):
    parts = seed_parts or [(5, 1, i) for i in range(len(prompts))]
    return generate(policy, prompts, num_samples=n, sampling_params=sp, length_params=lp, seed_parts=parts,
                    batch_size=bs)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_lean_forward_matches_hf(tok, kv_heads):
    pol = build_tiny(Tiny(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                          intermediate_size=128), tok, seed=1)
    assert LeanLlama.supports(pol.model)
    ids = torch.randint(6, len(tok), (3, 70))
    mask = torch.ones_like(ids)
    mask[0, 50:] = 0
    mask[1, 3:] = 0
    with torch.no_grad():
        ref = pol.forward_logits(ids, mask)
        got = LeanLlama(pol.model).logits(ids, mask)
    assert torch.allclose(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)


def test_lean_cached_decode_is_bit_identical_in_any_batch(policy, prompts, tok):
    """A row's logits at every step are the same bits alone or beside other prompts (the invariance mechanism)."""
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def run(rows):
        lens = torch.tensor([len(enc[i]) for i in rows])
        ids = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
        for k, i in enumerate(rows):
            ids[k, : len(enc[i])] = torch.tensor(enc[i])
        lean = LeanLlama(policy.model)
        out = [lean.prefill(ids, lens, torch.arange(len(rows)), 8)]
        for s in range(7):
            out.append(lean.step(torch.full((len(rows),), 10 + s)))
        return torch.stack(out, 1)  # [B, steps, V]

    with torch.inference_mode():
        alone = run([3])[0]
        for rows in ([0, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0], [3] * 9):
            assert torch.equal(run(rows)[rows.index(3)], alone)


def test_greedy_batched_equals_one_at_a_time(policy, prompts):
    sp, lp = SamplingParams(use_greedy=True, end_strings=[]), LengthParams(max_length=12, min_length=0)
    batched = _gen(policy, prompts, sp, lp, bs=32)
    single = [_gen(policy, [p], sp, lp, bs=1)[0] for p in prompts]
    assert batched == single
    assert all(r[0]["num_tokens"] >= 1 for r in batched)


def test_sampling_invariant_to_batch_size_and_order(policy, prompts):
    sp = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, end_strings=["<extra_id_1>"])
    lp = LengthParams(max_length=10, min_length=1)
    parts = [(5, 1, i) for i in range(len(prompts))]
    ref = _gen(policy, prompts, sp, lp, n=3, bs=32, seed_parts=parts)
    perm = list(range(len(prompts)))
    random.Random(2).shuffle(perm)
    for bs in (1, 3):
        out = _gen(policy, [prompts[i] for i in perm], sp, lp, n=3, bs=bs, seed_parts=[parts[i] for i in perm])
        assert [out[perm.index(i)] for i in range(len(prompts))] == ref
    texts = [r["text"] for r in ref[0]]
    assert len(set(texts)) == 3  # samples of one prompt differ (own generators)
    other = _gen(policy, prompts, sp, lp, n=3, seed_parts=[(6, 1, i) for i in range(len(prompts))])
    assert other != ref


def test_top_k_1_equals_greedy(policy, prompts):
    lp = LengthParams(max_length=8, min_length=0)
    greedy = _gen(policy, prompts, SamplingParams(use_greedy=True, end_strings=[]), lp)
    top1 = _gen(policy, prompts, SamplingParams(top_k=1, temperature=0.7, end_strings=[]), lp, n=2)
    assert all(g[0] == t[0] == t[1] for g, t in zip(greedy, top1))


def test_repetition_penalty_and_filters_hand_maths():
    sp = SamplingParams(repetition_penalty=2.0, temperature=0.5)
    lg = process_logits(torch.tensor([[2.0, -2.0, 1.0, 0.0]]), sp, torch.tensor([[True, True, False, False]]), [3])
    # seen: 2 -> 2/2 = 1, -2 -> -2*2 = -4; unseen kept; id 3 masked (min_length); then / temperature 0.5
    assert lg.tolist() == [[2.0, -8.0, 2.0, float("-inf")]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    top_p = SamplingParams(top_p=0.8)  # keeps {0, 1}: renormalised 0.625 / 0.375
    assert choose_tokens(probs, top_p, torch.tensor([0.62])).item() == 0
    assert choose_tokens(probs, top_p, torch.tensor([0.63])).item() == 1
    assert choose_tokens(probs, top_p, torch.tensor([0.999999])).item() == 1
    plain = SamplingParams()
    assert choose_tokens(probs, plain, torch.tensor([0.96])).item() == 3


# ------------------------------------------------------------------------------------------ scripted stopping
class ScriptedLM(torch.nn.Module):
    """Emits script[k] at generation step k (k from the position ids), else FALLBACK; runs through HFRunner."""

    def __init__(self, vocab, script, prompt_len, fallback):
        super().__init__()
        self.vocab, self.script, self.prompt_len, self.fallback = vocab, script, prompt_len, fallback
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        k = (position_ids + 1 - self.prompt_len).clamp(0, len(self.script) - 1)
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.fallback] = 10.0
        logits.scatter_(-1, torch.tensor(self.script)[k][..., None], 20.0)
        return SimpleNamespace(logits=logits, cache=cache)


def _scripted(tok, script_text, *, eos_at_end=False, end_strings=("<extra_id_1>",), min_length=0, max_length=30):
    script = tok(script_text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos_at_end else [])
    prompt = "the cat"
    plen = len(tok(prompt, add_special_tokens=False)["input_ids"])
    pol = Policy(ScriptedLM(len(tok), script, plen, tok.convert_tokens_to_ids("F")), tok)
    assert not LeanLlama.supports(pol.model)
    sp = SamplingParams(use_greedy=True, end_strings=list(end_strings))
    out = _gen(pol, [prompt], sp, LengthParams(max_length=max_length, min_length=min_length), n=2)
    assert out[0][0] == out[0][1], "samples of one prompt differ under greedy"
    return out[0][0], script


def test_end_string_single_token_is_stripped(tok):
    r, script = _scripted(tok, "red dog<extra_id_1>blue")
    assert r == {"text": "red dog", "num_tokens": script.index(tok.convert_tokens_to_ids("<extra_id_1>")) + 1,
                 "is_end": True}


def test_end_string_multi_token_is_stripped(tok):
    r, script = _scripted(tok, "red XYZWQ blue", end_strings=["ZWQ"])
    n = next(k for k in range(1, len(script) + 1) if "ZWQ" in tok.decode(script[:k]))
    assert r == {"text": "red XY", "num_tokens": n, "is_end": True}


def test_eos_ends_without_eos_in_text(tok):
    r, script = _scripted(tok, "red dog", eos_at_end=True)
    assert r == {"text": "red dog", "num_tokens": len(script), "is_end": True}


def test_max_length_is_not_an_end(tok):
    r, _ = _scripted(tok, "red dog jumps over the big cat", max_length=3)
    assert r["num_tokens"] == 3 and r["is_end"] is False
    assert "</s>" not in r["text"] and r["text"] == tok.decode(tok("red dog jumps", add_special_tokens=False)[
        "input_ids"][:3])


def test_min_length_masks_eos_and_single_token_end_strings(tok):
    # script: EOS at steps 0..3 -> masked for steps 0,1,2 (FALLBACK "F" instead), allowed at step 3.
    script_eos = tok.eos_token
    r, _ = _scripted(tok, script_eos * 4, min_length=3)
    assert r == {"text": "FFF", "num_tokens": 4, "is_end": True}
    r, _ = _scripted(tok, "<extra_id_1>" * 2 + "a<extra_id_1>", min_length=2)
    assert r == {"text": "FFa", "num_tokens": 4, "is_end": True}


def test_min_length_ignores_an_end_string_completed_before_it(tok):
    # "QQ" is completed at token 2 (< min_length 4): not an end; the later one at token >= 4 is.
    r, _ = _scripted(tok, "QQxyQQz", end_strings=["QQ"], min_length=4)
    assert r["is_end"] is True and r["text"] == "QQxy"


def test_hf_fallback_path_matches_lean_path_greedy(policy, prompts, monkeypatch):
    sp, lp = SamplingParams(use_greedy=True, end_strings=[]), LengthParams(max_length=10, min_length=0)
    lean = _gen(policy, prompts, sp, lp, bs=4)
    monkeypatch.setattr(LeanLlama, "supports", staticmethod(lambda model: False))
    assert _gen(policy, prompts, sp, lp, bs=4) == lean
