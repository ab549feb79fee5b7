"""DPO training speed: our `train_dpo` vs TRL's `DPOTrainer` on the same tiny model and pairs, with peak memory.

    python bench/bench_train.py          # each side in its own subprocess; prints one JSON object as the last line
    pytest bench/bench_train.py          # pytest-benchmark timings (in-process, one round each)

Setup (identical for both sides): a byte-level BPE trained on harness.data.world.world_texts, the embedded default
tiny Llama (harness.config.Tiny(): hidden 128, 4 layers, 4 heads, intermediate 384), and 64 preference pairs from
the task world: prompt = the task rendered in NeMo chat format with a one-shot system turn (another task and its
gold answer), chosen = the gold answer, rejected = a degraded answer (oracle score 0..3). Sequences (prompt +
response + EOS) are 72-100 tokens, mean 86. fp32, CPU, 2 threads; global batch 8 = micro batch 8 (TRL:
per_device_train_batch_size=8, gradient_accumulation_steps=1); 1 epoch = 8 optimizer steps; AdamW with the same lr,
betas, eps, weight decay, a constant LR, grad clipping at 1.0, DPO sigmoid loss with the same beta; no validation,
no checkpoints.

What is timed:
- ours: `harness.train.train_dpo(policy, pairs, cfg, iteration=1)`, everything inside it: tokenization of the pairs,
  the reference log-probs (computed once, from the policy before training) and the 8 steps.
- TRL: `trainer.train()` only: the reference model's forward every step (ref_model passed explicitly) and the
  8 steps. TRL tokenizes the dataset in `DPOTrainer.__init__`, which is NOT timed (it favours TRL slightly).
- ours loads the model as the train stage does (saved, then models.lean.load_for_training: LeanTrainLM, the same
  weights and forward bits as transformers' Llama); TRL trains transformers' LlamaForCausalLM.
- TRL is run with gradient_checkpointing=False and bf16=False (DPOConfig defaults are True/True): the same fp32
  computation as ours, no recomputation.
Both sides first run one untimed forward+backward of a throwaway copy of the model (same shapes), so one-off kernel
and allocator warm-up is charged to neither.

Where the speed comes from: ours packs each pair as one row [prompt, chosen, rejected] (the rejected response masked
off the chosen one, its positions restarted after the prompt), so the shared prompt is computed once per pair in the
policy's forward/backward and in the reference pass; TRL concatenates chosen and rejected as two full sequences and
runs the reference model every step. With these prompts (~70 of ~86 tokens) that is ~40% fewer tokens per step.

Where the ratio comes from (a third and fourth subprocess, one per side, recording every matrix product the timed call
makes with bench/matmul_floor.py): `flop_bound_speedup` (TRL's GEMM FLOPs over ours) times `gemm_rate_vs_trl` (GEMM
FLOPs per wall second, ours over TRL's) is `speedup_vs_trl`; `matmul_floor_speedup_vs_trl` is TRL's time over our
matrix products replayed back to back, the most any trainer on these kernels could reach.

Peak memory is ru_maxrss of each side's own process (whole process: Python, torch, the model(s), activations);
`*_rss_before_mb` is the ru_maxrss just before the timed call, so the difference is what the training call added.
TRL keeps a second full model (the reference) in memory; ours keeps only the reference log-probs.

Tokenizer notes for TRL: the harness tokenizer already has pad (<pad>) and eos (</s>) set, so TRL needs no pad
fallback; the data is plain text (not conversational), so no chat template is used or needed; TRL appends the eos
*string* "</s>" to chosen/rejected, which tokenizes to the single eos id, the same token `encode` appends.
"""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.matmul_floor import gflop, record, replay  # noqa: E402
from harness import config  # noqa: E402
from harness.data import world  # noqa: E402
from harness.data.sft import USER, render_nemo  # noqa: E402
from harness.determinism import set_threads  # noqa: E402
from harness.models.hf import build_tiny  # noqa: E402
from harness.models.tokenizer import train_tokenizer  # noqa: E402

N_PAIRS, BATCH, THREADS = 64, 8, int(os.environ.get("HARNESS_NUM_THREADS", "2"))
LR, BETA, SEED = 1e-5, 0.1, 0
OVERRIDES = [
    f"model.micro_batch_size={BATCH}", f"model.global_batch_size={BATCH}",
    "trainer.self_rewarding.max_epochs=1", "trainer.self_rewarding.max_steps=-1",
    "trainer.self_rewarding.val_check_interval=1000", "trainer.self_rewarding.save_interval=100000",
    "trainer.self_rewarding.gradient_clip_val=1.0",
    f"model.optim.lr={LR}", "model.optim.sched.name=constant", "model.optim.weight_decay=0.1",
    "model.optim.betas=[0.9,0.98]", "model.optim.eps=1e-8",
    f"model.spin.ref_policy_kl_penalty={BETA}", "model.spin.preference_loss=dpo",
    "model.spin.sft_loss_weight=0.0", "model.spin.preference_average_log_probs=false",
    "model.data.train_ds.max_seq_length=1024", "model.data.train_ds.shuffle=false",
]


# ----------------------------------------------------------------------------------------------------- setup
def setup():
    """(tokenizer, policy, pairs): the same on both sides, deterministic."""
    set_threads(THREADS)
    tok = train_tokenizer(world.world_texts(300, SEED), config.Tiny().vocab_size)
    policy = build_tiny(config.Tiny(), tok, seed=SEED)
    rng = random.Random(f"bench_train:{SEED}")
    tokens = config.ChatPromptTokens()
    pairs = []
    tasks = world.make_tasks(2 * N_PAIRS, rng, "bench")
    for t, shot in zip(tasks[:N_PAIRS], tasks[N_PAIRS:]):
        rejected_score = rng.choice((0, 1, 2, 3))
        # a one-shot system turn (another task and its gold answer) brings sequences to ~60-100 tokens
        system = f"Answer exactly. Example: {shot.prompt} Answer: {shot.gold}"
        pairs.append({"prompt": render_nemo(system, [{"from": USER, "value": t.prompt}], tokens), "chosen": t.gold,
                      "rejected": world.degrade(t, rejected_score, rng), "chosen_score": 5.0,
                      "rejected_score": float(rejected_score)})
    return tok, policy, pairs


def seq_lengths(tok, pairs) -> list[int]:
    from harness.train import encode

    return [len(encode(tok, p["prompt"], p[k], 1024).ids) for p in pairs for k in ("chosen", "rejected")]


def processed_tokens(tok, pairs) -> tuple[int, int]:
    """(ours, TRL): tokens each side's rows hold per epoch, padding included (rows padded to the batch's longest).
    Ours: one row per pair [prompt, chosen, rejected]; TRL: chosen and rejected as two full rows. Each side runs a
    forward and a backward (~2 forwards) over its rows and one reference forward over the same rows, so at equal
    cost per token the speedup is bounded by their ratio (attention's share, quadratic in length, is small here)."""
    from harness.batches import pack_pairs
    from harness.train import encode

    ours = trl = 0
    for b in range(0, len(pairs), BATCH):
        ch = [encode(tok, p["prompt"], p["chosen"], 1024) for p in pairs[b:b + BATCH]]
        rj = [encode(tok, p["prompt"], p["rejected"], 1024) for p in pairs[b:b + BATCH]]
        ours += pack_pairs(ch, rj, tok.pad_token_id)[0].numel()  # the rows train_dpo runs
        trl += 2 * len(ch) * max(len(e.ids) for e in ch + rj)
    return ours, trl


def _warmup(model, tok, pairs) -> None:
    """One untimed forward+backward of a throwaway copy at the benchmark's shapes."""
    from harness.train import collate, encode

    m = copy.deepcopy(model).train()
    enc = [encode(tok, p["prompt"], p[k], 1024) for p in pairs[:BATCH] for k in ("chosen", "rejected")]
    ids, attn, _ = collate(enc, tok.pad_token_id)
    m(input_ids=ids, attention_mask=attn).logits.float().mean().backward()
    del m


# ----------------------------------------------------------------------------------------------------- ours
def ours_prepare():
    from harness.models.lean import load_for_training

    tok, policy, pairs = setup()
    cfg = config.load(None, OVERRIDES, warn=None)
    with tempfile.TemporaryDirectory() as tmp:  # loaded as the train stage loads M_t: LeanTrainLM, same weights
        policy.save(Path(tmp) / "m", {})
        policy = load_for_training(Path(tmp) / "m")
    _warmup(policy.model, tok, pairs)
    return (policy, pairs, cfg), {}


def ours_run(policy, pairs, cfg) -> int:
    from harness.train import train_dpo

    history = train_dpo(policy, pairs, cfg, iteration=1, validation=())
    steps = [h for h in history if "train/loss" in h]
    assert len(steps) == N_PAIRS // BATCH, len(steps)
    return len(pairs)


# ----------------------------------------------------------------------------------------------------- TRL
def trl_prepare(out_dir: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, policy, pairs = setup()
    model, ref = copy.deepcopy(policy.model).train(), copy.deepcopy(policy.model).eval()
    args = DPOConfig(
        output_dir=out_dir, use_cpu=True, report_to="none", bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, num_train_epochs=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0,
        beta=BETA, loss_type=["sigmoid"], max_length=1024, precompute_ref_log_probs=False,
        eval_strategy="no", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=SEED, data_seed=SEED,
    )
    data = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                              for p in pairs])
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    set_threads(THREADS)  # in case anything in Trainer set-up changed it
    _warmup(policy.model, tok, pairs)
    del policy
    return (trainer,), {}


def trl_run(trainer) -> int:
    out = trainer.train()
    assert out.global_step == N_PAIRS // BATCH, out.global_step
    return N_PAIRS


# ----------------------------------------------------------------------------------------------------- one side
def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_side(side: str, count_flops: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args, _ = ours_prepare() if side == "ours" else trl_prepare(tmp)
        fn = ours_run if side == "ours" else trl_run
        if count_flops:  # a separate run: recording slows the one it watches
            calls = record(fn, *args)
            return {"side": side, "gemm_gflop": gflop(calls), "matmul_floor_s": replay(calls)}
        before = _maxrss_mb()
        t, c = time.perf_counter(), time.process_time()
        n = fn(*args)
        dt, dc = time.perf_counter() - t, time.process_time() - c
    return {"side": side, "pairs": n, "seconds": dt, "cpu_seconds": dc, "rss_before_mb": before,
            "peak_rss_mb": _maxrss_mb(), "threads": torch.get_num_threads()}


def measure() -> dict:
    res, flops = {}, {}
    for side in ("ours", "trl"):
        for mode, out in (("--side", res), ("--flops", flops)):
            proc = subprocess.run([sys.executable, __file__, mode, side], capture_output=True, text=True,
                                  env={**os.environ, "HARNESS_NUM_THREADS": str(THREADS), "HARNESS_PROGRESS": "0"})
            if proc.returncode != 0:
                raise RuntimeError(f"{side} subprocess failed:\n{proc.stderr[-4000:]}")
            out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    tok, _, pairs = setup()
    lens = seq_lengths(tok, pairs)
    ours_tokens, trl_tokens = processed_tokens(tok, pairs)
    o, t = res["ours"], res["trl"]
    rate = {s: flops[s]["gemm_gflop"] / res[s]["seconds"] for s in ("ours", "trl")}  # GEMM GFLOP per wall second
    return {
        "bench": "dpo_train",
        "pairs": N_PAIRS, "batch": BATCH, "steps": N_PAIRS // BATCH,
        "seq_tokens_min_mean_max": [min(lens), round(sum(lens) / len(lens), 1), max(lens)],
        "ours_pairs_per_s": round(o["pairs"] / o["seconds"], 3),
        "trl_pairs_per_s": round(t["pairs"] / t["seconds"], 3),
        "speedup_vs_trl": round(t["seconds"] / o["seconds"], 2),
        "cpu_speedup_vs_trl": round(t["cpu_seconds"] / o["cpu_seconds"], 2),  # moves less with the machine's load
        # the speedup the token counts allow at equal cost per token: what packing the shared prompt buys
        "tokens_per_epoch": {"ours": ours_tokens, "trl": trl_tokens},
        "token_bound_speedup": round(trl_tokens / ours_tokens, 2),
        # speedup_vs_trl = flop_bound_speedup * gemm_rate_vs_trl: the work each side does (GEMM FLOPs, ~99% of all
        # FLOPs) and how fast it gets through it (GEMM GFLOP per wall second, everything else counted as overhead)
        "gemm_gflop": {s: round(flops[s]["gemm_gflop"], 2) for s in ("ours", "trl")},
        "flop_bound_speedup": round(flops["trl"]["gemm_gflop"] / flops["ours"]["gemm_gflop"], 2),
        "gemm_gflop_per_s": {s: round(rate[s], 1) for s in ("ours", "trl")},
        "gemm_rate_vs_trl": round(rate["ours"] / rate["trl"], 2),
        # TRL's time over our matrix products alone (bench/matmul_floor.py: every mm/addmm/bmm of the forward,
        # backward and reference passes replayed back to back): the most any trainer on these kernels could gain,
        # with attention, elementwise ops, the optimizer and Python taking no time at all
        "matmul_floor_share_of_ours": round(flops["ours"]["matmul_floor_s"] / o["seconds"], 3),
        "matmul_floor_speedup_vs_trl": round(t["seconds"] / flops["ours"]["matmul_floor_s"], 2),
        "ours_seconds": round(o["seconds"], 2), "trl_seconds": round(t["seconds"], 2),
        "ours_peak_rss_mb": round(o["peak_rss_mb"], 1), "trl_peak_rss_mb": round(t["peak_rss_mb"], 1),
        "ours_rss_before_mb": round(o["rss_before_mb"], 1), "trl_rss_before_mb": round(t["rss_before_mb"], 1),
        "threads": [o["threads"], t["threads"]],
        "loadavg": float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else None,
    }


# ----------------------------------------------------------------------------------------------------- pytest
def test_bench_dpo_ours(benchmark):
    assert benchmark.pedantic(ours_run, setup=ours_prepare, rounds=1, iterations=1) == N_PAIRS


def test_bench_dpo_trl(benchmark, tmp_path):
    assert benchmark.pedantic(trl_run, setup=lambda: trl_prepare(str(tmp_path)), rounds=1, iterations=1) == N_PAIRS


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--side", "--flops"):
        print(json.dumps(run_side(sys.argv[2], count_flops=sys.argv[1] == "--flops")))
    else:
        print(json.dumps(measure()))
