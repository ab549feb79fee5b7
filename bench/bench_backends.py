"""The mcore backend against the hf one on the same weights: DPO training pairs/s and generation tokens/s.

    python bench/bench_backends.py          # prints one JSON object as the last line

The embedded default tiny Llama (hidden 128, 4 layers), 32 DPO pairs (micro 8, global 16, 2 steps after the
reference pass) and 32 prompts x 32 sampled tokens, on the current device. Ratios are mcore / hf, measured in one run;
each number is the best of REPEATS runs, the backends interleaved, so a busy machine skews both alike.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import config  # noqa: E402
from harness.determinism import set_threads  # noqa: E402
from harness.generation import generate  # noqa: E402
from harness.models import hf, mcore  # noqa: E402
from harness.models.tokenizer import train_tokenizer  # noqa: E402
from harness.train import train_dpo  # noqa: E402

REPEATS = 3
WORDS = "the a cat dog runs over big small red blue apple answer question score judge response user".split()


def setup():
    set_threads()
    rng = random.Random(0)
    sent = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    tok = train_tokenizer([sent(50) for _ in range(300)], config.Tiny().vocab_size)
    ph = hf.build_tiny(config.Tiny(), tok, seed=0)
    pairs = [{"prompt": sent(40), "chosen": sent(30), "rejected": sent(25), "chosen_score": 4.0,
              "rejected_score": 1.0} for _ in range(32)]
    return ph, mcore.from_hf(ph), pairs, [sent(30) for _ in range(32)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> dict:
    ph, pm, pairs, prompts = setup()
    cfg = config.load(None, ["model.micro_batch_size=8", "model.global_batch_size=16", "model.optim.lr=1e-5",
                        "model.data.train_ds.max_seq_length=256", "trainer.self_rewarding.max_steps=2"], warn=None)
    sp, lp = config.SamplingParams(end_strings=[]), config.LengthParams(max_length=32, min_length=32)
    gen = dict(num_samples=1, sampling_params=sp, length_params=lp, seed_parts=[(0, i) for i in range(32)],
               batch_size=32)
    best: dict[str, float] = {}
    for r in range(REPEATS + 1):  # round 0 warms up
        for name, policy in (("hf", ph), ("mcore", pm)):
            for what, fn in (("train", lambda p=policy: train_dpo(p, pairs, cfg, iteration=1)),
                             ("gen", lambda p=policy: generate(p, prompts, **gen))):
                t = timed(fn)
                if r:
                    best[f"{name}_{what}"] = min(best.get(f"{name}_{what}", float("inf")), t)
    out = {}
    for name in ("hf", "mcore"):
        out[f"{name}_train_pairs_per_s"] = 2 * 16 / best[f"{name}_train"]
        out[f"{name}_gen_tokens_per_s"] = 32 * 32 / best[f"{name}_gen"]
    out["train_ratio_mcore_over_hf"] = out["mcore_train_pairs_per_s"] / out["hf_train_pairs_per_s"]
    out["gen_ratio_mcore_over_hf"] = out["mcore_gen_tokens_per_s"] / out["hf_gen_tokens_per_s"]
    return {k: round(v, 3) for k, v in out.items()}


if __name__ == "__main__":
    print(json.dumps(main()))
