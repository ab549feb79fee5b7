"""Generation speed: our sampler vs transformers `generate`, and vs the bare forward passes it needs.

    python bench/bench_generation.py          # prints one JSON object as the last line
    pytest bench/bench_generation.py          # pytest-benchmark timings

The embedded default tiny Llama (hidden 128, 4 layers, 4 heads, intermediate 384, vocab 512), 32 prompts of ~40
tokens, 64 new tokens each, sampled with min_length = max_length so every call makes exactly 32 x 64 tokens.
`matmul_floor_speedup_vs_hf_generate`: HF's time over the matrix products of our bare forwards replayed back to back
(bench/matmul_floor.py), the most any sampler on these kernels could reach.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.matmul_floor import gflop, record, replay  # noqa: E402
from harness.config import LengthParams, SamplingParams, Tiny  # noqa: E402
from harness.determinism import set_threads  # noqa: E402
from harness.generation import generate  # noqa: E402
from harness.generation.sampler import LeanLlama  # noqa: E402
from harness.models.hf import build_tiny  # noqa: E402
from harness.models.tokenizer import train_tokenizer  # noqa: E402

N_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 32, 40, 64
WORDS = ("the a cat dog runs jumps over under big small red blue green apple banana answer question score "
         "judge response helpful harmless user assistant system points total").split()


def setup():
    set_threads()
    rng = random.Random(0)
    tok = train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(400)], Tiny().vocab_size)
    policy = build_tiny(Tiny(), tok, seed=0)
    prompts = []
    for _ in range(N_PROMPTS):  # ~40 tokens each
        ids = []
        while len(ids) < PROMPT_TOKENS:
            ids = tok(" ".join(rng.choice(WORDS) for _ in range(PROMPT_TOKENS)), add_special_tokens=False)["input_ids"]
        prompts.append(tok.decode(ids[:PROMPT_TOKENS]))
    return policy, prompts


def ours(policy, prompts):
    sp = SamplingParams(temperature=1.0, end_strings=[])
    lp = LengthParams(max_length=NEW_TOKENS, min_length=NEW_TOKENS)
    out = generate(policy, prompts, num_samples=1, sampling_params=sp, length_params=lp,
                   seed_parts=[(0, 0, i) for i in range(len(prompts))], batch_size=N_PROMPTS)
    return sum(r["num_tokens"] for rs in out for r in rs)


def hf(policy, prompts):
    tok = policy.tokenizer
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = policy.model.generate(**batch, do_sample=True, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    pad_token_id=tok.pad_token_id, top_k=0, top_p=1.0, temperature=1.0)
    return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]


def bare_forwards(policy, prompts):
    """One prefill + (NEW_TOKENS - 1) single-token decode forwards of LeanLlama with its preallocated cache."""
    tok = policy.tokenizer
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    lens = torch.tensor([len(e) for e in enc])
    ids = torch.full((len(enc), int(lens.max())), tok.pad_token_id)
    for k, e in enumerate(enc):
        ids[k, : len(e)] = torch.tensor(e)
    with torch.inference_mode():
        lean = LeanLlama(policy.model)
        logits = lean.prefill(ids, lens, torch.arange(len(enc)), NEW_TOKENS)
        for _ in range(NEW_TOKENS - 1):
            logits = lean.step(logits.argmax(-1))
    return len(enc) * NEW_TOKENS


def _best(fn, *args, repeats=3):
    """(best wall seconds, best CPU seconds, tokens); CPU time moves less than wall time on a loaded machine."""
    fn(*args)  # warm-up
    times, cpu, n = [], [], 0
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        n = fn(*args)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(times), min(cpu), n


def measure(repeats: int = 3) -> dict:
    policy, prompts = setup()
    t_ours, c_ours, n_ours = _best(ours, policy, prompts, repeats=repeats)
    t_hf, c_hf, n_hf = _best(hf, policy, prompts, repeats=repeats)
    t_bare, _, _ = _best(bare_forwards, policy, prompts, repeats=repeats)
    calls = record(bare_forwards, policy, prompts)
    t_floor = replay(calls, repeats=repeats)
    assert n_ours == n_hf == N_PROMPTS * NEW_TOKENS, (n_ours, n_hf)
    return {
        "bench": "generation",
        "tokens": n_ours,
        "ours_tokens_per_s": round(n_ours / t_ours, 1),
        "hf_generate_tokens_per_s": round(n_hf / t_hf, 1),
        "speedup_vs_hf_generate": round(t_hf / t_ours, 2),
        "cpu_speedup_vs_hf_generate": round(c_hf / c_ours, 2),
        "ours_time_over_bare_forward_time": round(t_ours / t_bare, 3),
        # HF generate over our bare forward passes: the most any sampler on this forward could gain over HF
        "bare_forward_speedup_vs_hf_generate": round(t_hf / t_bare, 2),
        # HF generate over our matrix products alone (bench/matmul_floor.py: the GEMMs and attention matmuls of
        # the bare forwards replayed back to back): the most any sampler on these kernels could gain over HF, with
        # every other op (norms, RoPE, softmax, cache writes, sampling, Python) taking no time at all
        "matmul_gflop": round(gflop(calls), 3),
        "matmul_floor_share_of_ours": round(t_floor / t_ours, 3),
        "matmul_floor_speedup_vs_hf_generate": round(t_hf / t_floor, 2),
        "threads": torch.get_num_threads(),
        "loadavg": float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else None,
    }


# ----------------------------------------------------------------------------------------------------- pytest
def test_generate_ours(benchmark):
    policy, prompts = setup()
    assert benchmark.pedantic(ours, args=(policy, prompts), rounds=3, warmup_rounds=1) == N_PROMPTS * NEW_TOKENS


def test_generate_hf(benchmark):
    policy, prompts = setup()
    assert benchmark.pedantic(hf, args=(policy, prompts), rounds=2, warmup_rounds=1) == N_PROMPTS * NEW_TOKENS


def test_bare_forwards(benchmark):
    policy, prompts = setup()
    benchmark.pedantic(bare_forwards, args=(policy, prompts), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    print(json.dumps(measure()))
