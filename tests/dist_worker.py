"""Run by tests/test_parallel.py under `torchrun --nproc_per_node 2` (gloo on CPU): data parallel, then tensor parallel.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py BASE_DIR PAIRS_JSON OUT_DIR

1. hf backend, 2 data-parallel ranks: train_dpo on the pairs; rank 0 writes the history and the weights.
2. mcore backend, tensor parallel 2: logits of a fixed batch, greedy generation, then one DPO step; rank 0 writes
   the logits, the tokens, the history and the gathered weights (converted to HF names).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from harness import config, parallel
from harness.generation.sampler import generate
from harness.models import convert
from harness.models.base import load_policy
from harness.train import train_dpo

OVERRIDES = ["model.micro_batch_size=1", "model.global_batch_size=4", "model.optim.lr=1e-2", "model.optim.eps=1e-3",
             "model.optim.weight_decay=0.0", "model.optim.sched.name=constant", "trainer.self_rewarding.max_steps=2",
             "model.data.train_ds.max_seq_length=64", "model.data.train_ds.shuffle=false"]
PROMPTS = ["item 3: name", "item 12: name 5 fruits and", "tools"]


def batch(n_vocab: int) -> torch.Tensor:
    return torch.arange(3 * 10).reshape(3, 10) * 7 % n_vocab


def main(base: str, pairs_file: str, out: str) -> None:
    torch.set_num_threads(1)
    pairs, out = json.loads(Path(pairs_file).read_text()), Path(out)
    main_rank = parallel.is_main()

    parallel.setup(config.load(None, [*OVERRIDES, "trainer.devices=2"], warn=None))
    policy = load_policy(base, backend="hf")
    history = train_dpo(policy, pairs, config.load(None, [*OVERRIDES, "trainer.devices=2"], warn=None), iteration=1)
    if main_rank:
        (out / "dp_history.json").write_text(json.dumps(history))
        torch.save(policy.model.state_dict(), out / "dp_weights.pt")

    cfg = config.load(None, [*OVERRIDES, "trainer.devices=2", "model.backend=mcore", "model.tensor_model_parallel_size=2",
                        "trainer.self_rewarding.max_steps=1"], warn=None)
    parallel.setup(cfg)
    policy = load_policy(base, backend="mcore")
    with torch.no_grad():
        logits = policy.model(input_ids=batch(len(policy.tokenizer))).logits
    sp = config.SamplingParams(use_greedy=True, end_strings=[])
    outs = generate(policy, PROMPTS, num_samples=2, sampling_params=sp, length_params=config.LengthParams(max_length=8),
                    seed_parts=[(1, i) for i in range(3)])
    history = train_dpo(policy, pairs, cfg, iteration=1)
    weights = convert.mcore_to_hf(policy.model.full_state_dict(), policy.model.spec)  # collective: every rank
    if main_rank:
        torch.save({"logits": logits, "weights": weights}, out / "tp.pt")
        (out / "tp.json").write_text(json.dumps({"history": history, "generated": outs}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
