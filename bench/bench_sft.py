"""SFT speed: packed `train_sft` vs today's padded loop vs TRL's SFTTrainer with packing, same data and model.

    python bench/bench_sft.py            # each side in its own subprocess; prints one JSON object as the last line
    pytest bench/bench_sft.py            # pytest-benchmark timings (in-process, one round each)

Setup (identical for every side): `harness prepare` on the default params.yaml in a temporary directory (the task
world, its BPE tokenizer and the tiny Llama M0, exactly as the pipeline builds them), then the pipeline's SFT
examples (stages.sft_examples: IFT gold answers, EFT judgements, MFT meta-judgements, rendered in NeMo chat format)
of which N_EXAMPLES are taken in the world's mix (shuffled with a fixed seed). fp32, CPU; one epoch; a global batch
of 16 examples, micro batch 8 (params.yaml); AdamW, constant LR, grad clipping at 1.0; loss on the answer tokens
only (prompt tokens masked), sequences capped at params.yaml's 256 tokens.

Sides:
- packed: `harness.train.train_sft(..., packed=True)` (the default) on M0 loaded as the sft stage loads it
  (models.lean.LeanTrainLM: transformers' Llama forward, same bits, without its per-module overhead): each global
  batch packed into rows as long as its longest example (block-diagonal mask, restarted positions), 8 rows per
  forward, LM head only on answers.
- padded: `train_sft(..., packed=False)` on transformers' LlamaForCausalLM, the loop as it was: micro-batches of 8
  examples padded to the longest.
- trl: `SFTTrainer(...).train()` with packing=True (TRL's default BFD packing, padding-free), max_length=256,
  completion-only loss, per_device_train_batch_size=8 packed rows, gradient checkpointing and bf16 off (the same
  fp32 computation). TRL tokenizes and packs in its __init__, which is NOT timed (it favours TRL).
Ours are timed whole (tokenization included). Each side first runs one untimed forward+backward of a throwaway
copy of the model. `*_cpu_seconds` is the process CPU time of the timed call: on a loaded machine it moves less
than wall time, so its ratios are reported too.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import config  # noqa: E402
from harness.determinism import set_threads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_EXAMPLES, THREADS, SEED = 256, int(os.environ.get("HARNESS_NUM_THREADS", "2")), 0
OVERRIDES = ["model.sft.max_epochs=1", "model.optim.sched.name=constant", "trainer.self_rewarding.val_check_interval=1000",
             "trainer.self_rewarding.save_interval=100000", "model.data.sft_ds.shuffle=false", "tracking.enabled=false"]


def setup(tmp: str, lean: bool = False):
    """(cfg, policy M0, examples): the pipeline's own prepare and SFT examples, a fixed subset. lean: M0 loaded as
    the sft stage loads it (models.lean.LeanTrainLM), else as transformers' LlamaForCausalLM (TRL's side)."""
    from harness import stages
    from harness.layout import Layout
    from harness.models.base import load_policy
    from harness.models.lean import load_for_training

    set_threads(THREADS)
    cfg = config.load(str(ROOT / "params.yaml"), OVERRIDES, warn=None)
    lay = Layout(Path(tmp))
    stages.prepare(cfg, lay)
    policy = (load_for_training if lean else load_policy)(lay.base_model)
    examples, _ = stages.sft_examples(cfg, lay, policy)
    random.Random(SEED).shuffle(examples)
    return cfg, policy, examples[:N_EXAMPLES]


def seq_lengths(cfg, policy, examples) -> list[int]:
    from harness.train import encode

    return [len(encode(policy.tokenizer, p, r, config.seq_len(cfg, cfg.model.data.sft_ds)).ids) for p, r in examples]


def _warmup(cfg, policy, examples) -> None:
    from harness.train import collate, encode

    m = copy.deepcopy(policy.model).train()
    enc = [encode(policy.tokenizer, p, r, 256) for p, r in examples[:8]]
    ids, attn, _ = collate(enc, policy.tokenizer.pad_token_id)
    m(input_ids=ids, attention_mask=attn).logits.float().mean().backward()


# ----------------------------------------------------------------------------------------------------- sides
def ours_prepare(tmp: str, packed: bool):
    cfg, policy, examples = setup(tmp, lean=packed)
    _warmup(cfg, policy, examples)
    return (policy, examples, cfg, packed), {}


def ours_run(policy, examples, cfg, packed) -> int:
    from harness.train import train_sft

    history = train_sft(policy, examples, cfg, packed=packed)
    assert len([h for h in history if "train/loss" in h]) == -(-len(examples) // cfg.model.global_batch_size)
    return len(examples)


def trl_prepare(tmp: str):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg, policy, examples = setup(tmp)
    args = SFTConfig(
        output_dir=str(Path(tmp) / "trl"), use_cpu=True, report_to="none", bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=8, gradient_accumulation_steps=1,
        num_train_epochs=1, learning_rate=cfg.model.sft.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.model.optim.weight_decay, adam_beta1=cfg.model.optim.betas[0],
        adam_beta2=cfg.model.optim.betas[1], adam_epsilon=cfg.model.optim.eps, optim="adamw_torch",
        max_grad_norm=1.0, max_length=256, packing=True, completion_only_loss=True,
        eval_strategy="no", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=SEED, data_seed=SEED, shuffle_dataset=False,
    )
    data = Dataset.from_list([{"prompt": p, "completion": r} for p, r in examples])
    model = copy.deepcopy(policy.model).train()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=policy.tokenizer)
    set_threads(THREADS)
    _warmup(cfg, policy, examples)
    return (trainer, len(examples)), {}


def trl_run(trainer, n: int) -> int:
    trainer.train()
    return n


def run_side(side: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args, _ = trl_prepare(tmp) if side == "trl" else ours_prepare(tmp, packed=side == "packed")
        fn = trl_run if side == "trl" else ours_run
        t, c = time.perf_counter(), time.process_time()
        n = fn(*args)
        dt, dc = time.perf_counter() - t, time.process_time() - c
    return {"side": side, "examples": n, "seconds": dt, "cpu_seconds": dc, "threads": torch.get_num_threads()}


def measure() -> dict:
    res = {}
    for side in ("packed", "padded", "trl"):
        proc = subprocess.run([sys.executable, __file__, "--side", side], capture_output=True, text=True,
                              env={**os.environ, "HARNESS_NUM_THREADS": str(THREADS), "HARNESS_PROGRESS": "0"})
        if proc.returncode != 0:
            raise RuntimeError(f"{side} subprocess failed:\n{proc.stderr[-4000:]}")
        res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        lens = seq_lengths(*setup(tmp))
    p, d, t = res["packed"], res["padded"], res["trl"]
    return {
        "bench": "sft_train",
        "examples": N_EXAMPLES, "global_batch": 16, "micro_batch": 8,
        "seq_tokens_min_mean_max": [min(lens), round(sum(lens) / len(lens), 1), max(lens)],
        "packed_examples_per_s": round(p["examples"] / p["seconds"], 2),
        "padded_examples_per_s": round(d["examples"] / d["seconds"], 2),
        "trl_packed_examples_per_s": round(t["examples"] / t["seconds"], 2),
        "speedup_vs_padded": round(d["seconds"] / p["seconds"], 2),
        "speedup_vs_trl": round(t["seconds"] / p["seconds"], 2),
        "cpu_speedup_vs_padded": round(d["cpu_seconds"] / p["cpu_seconds"], 2),
        "cpu_speedup_vs_trl": round(t["cpu_seconds"] / p["cpu_seconds"], 2),
        "seconds": {k: round(v["seconds"], 2) for k, v in res.items()},
        "cpu_seconds": {k: round(v["cpu_seconds"], 2) for k, v in res.items()},
        "threads": THREADS,
        "loadavg": float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else None,
    }


# ----------------------------------------------------------------------------------------------------- pytest
def test_bench_sft_packed(benchmark, tmp_path):
    assert benchmark.pedantic(ours_run, setup=lambda: ours_prepare(str(tmp_path), True), rounds=1) == N_EXAMPLES


def test_bench_sft_padded(benchmark, tmp_path):
    assert benchmark.pedantic(ours_run, setup=lambda: ours_prepare(str(tmp_path), False), rounds=1) == N_EXAMPLES


def test_bench_sft_trl(benchmark, tmp_path):
    assert benchmark.pedantic(trl_run, setup=lambda: trl_prepare(str(tmp_path)), rounds=1) == N_EXAMPLES


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--side":
        print(json.dumps(run_side(sys.argv[2])))
    else:
        print(json.dumps(measure()))
