"""Data parallel and tensor parallel under torchrun (gloo, CPU): 2 processes give what 1 process gives.

One torchrun launch (tests/dist_worker.py) runs both: 2 data-parallel ranks (hf backend) against train_dpo in this
process with the same global batch, and tensor parallel 2 (mcore backend) against the hf model's logits, greedy
tokens and one DPO step. Equal up to float summation order, so compared with tolerances far below the updates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from harness import config
from harness.generation.sampler import generate
from harness.models import hf
from harness.models.tokenizer import train_tokenizer
from harness.train import train_dpo
from tests import dist_worker
from tests.conftest import ROOT

TEXTS = [f"item {i}: name {i % 7} fruits and {i % 5} tools." for i in range(50)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tok = train_tokenizer(TEXTS, 290)
    policy = hf.build_tiny(config.Tiny(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=96, vocab_size=290), tok, seed=4)
    policy.save(d / "base", {})
    pairs = [{"prompt": TEXTS[i][:12], "chosen": TEXTS[i][12:], "rejected": TEXTS[i + 20][20:],
              "chosen_score": 4.0, "rejected_score": 2.0} for i in range(8)]
    (d / "pairs.json").write_text(json.dumps(pairs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "tests/dist_worker.py"), str(d / "base"), str(d / "pairs.json"), str(d)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return d, pairs


def test_two_data_parallel_ranks_equal_one_process(launched):
    from harness.models.base import load_policy

    d, pairs = launched
    one = load_policy(d / "base")
    hist = train_dpo(one, pairs, config.load(None, dist_worker.OVERRIDES, warn=None), iteration=1)
    two = json.loads((d / "dp_history.json").read_text())
    assert [h["step"] for h in two] == [1, 2]
    for a, b in zip(hist, two):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["train/chosen_lengths"] == a["train/chosen_lengths"]  # metric sums gathered from both ranks
    w2 = torch.load(d / "dp_weights.pt", weights_only=True)
    base = load_policy(d / "base").model.state_dict()
    for k, v in one.model.state_dict().items():
        assert (w2[k] - v).abs().max() < 1e-6, k
    assert max(float((v - base[k]).abs().max()) for k, v in w2.items()) > 1e-3  # two real steps were taken


def test_tensor_parallel_2_equals_one_process(launched):
    from harness.models.base import load_policy

    d, pairs = launched
    ref = load_policy(d / "base")
    tp = torch.load(d / "tp.pt", weights_only=True)
    res = json.loads((d / "tp.json").read_text())
    with torch.no_grad():
        logits = ref.model(input_ids=dist_worker.batch(len(ref.tokenizer))).logits
    assert (tp["logits"] - logits).abs().max() < 1e-5
    sp = config.SamplingParams(use_greedy=True, end_strings=[])
    assert res["generated"] == generate(ref, dist_worker.PROMPTS, num_samples=2, sampling_params=sp,
                                        length_params=config.LengthParams(max_length=8),
                                        seed_parts=[(1, i) for i in range(3)])
    cfg = config.load(None, [*dist_worker.OVERRIDES, "trainer.self_rewarding.max_steps=1"], warn=None)
    hist = train_dpo(ref, pairs, cfg, iteration=1)
    assert res["history"][0]["train/loss"] == pytest.approx(hist[0]["train/loss"], rel=1e-5)
    assert res["history"][0]["grad_norm"] == pytest.approx(hist[0]["grad_norm"], rel=1e-5)
    for k, v in ref.model.state_dict().items():
        if k in tp["weights"]:
            assert (tp["weights"][k] - v).abs().max() < 1e-6, k


def test_devices_2_relaunches_under_torchrun_and_only_rank_0_writes(tmp_path):
    """`harness pairs trainer.devices=2` restarts itself as 2 torchrun processes; rank 1's writes are discarded, so
    the outputs equal a one-process run's, byte for byte."""
    from harness.io import tree_hash, write_jsonl
    from tests.conftest import env, run

    def response(text, mean):
        return {"text": text, "num_tokens": len(text), "is_end": True, "mean": mean, "var": 0.0}

    import random

    from harness.data.world import make_task

    # the smoke config is on the task world: each row carries its task's meta (the oracle scores every pair)
    judged = [{"id": str(i), "prompt": f"p{i}", "question": f"q{i}",
               "meta": make_task("animals", random.Random(i), str(i)).meta,
               "responses": [response(f"a{i}", 4.0), response(f"bb{i}", 1.0 + i % 2), response(f"c{i}", 2.0)]}
              for i in range(6)]
    for root in ("one", "two"):
        write_jsonl(tmp_path / root / "iter1/judged.jsonl", judged)
        write_jsonl(tmp_path / root / "iter1/judge_pairs.jsonl", [])
    cmd = [sys.executable, "-m", "harness.cli", "pairs", "-i", "1", "-c", "experiments/smoke.yaml"]
    e = {**env(), "PYTHONPATH": str(ROOT), "HARNESS_NUM_THREADS": "1"}
    two = run([*cmd, "--root", str(tmp_path / "two"), "trainer.devices=2"], ROOT, env=e)
    assert two.stdout.count("policy_pairs=6") == 2  # both ranks ran the stage and printed its summary
    run([*cmd, "--root", str(tmp_path / "one")], ROOT, env=e)
    assert (tmp_path / "one/iter1/pairs.jsonl").stat().st_size > 0
    assert tree_hash(tmp_path / "one/iter1") == tree_hash(tmp_path / "two/iter1")  # timings/: wall-clock, not compared
    assert sorted(p.name for p in (tmp_path / "two").rglob("*")) == sorted(p.name for p in (tmp_path / "one").rglob("*"))
