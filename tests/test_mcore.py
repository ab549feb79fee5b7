"""The mcore backend against the hf one on the same weights (fp32, CPU): conversion, logits, generation, DPO, files.

The hf backend (transformers' Llama) is the independent implementation: a conversion error (a norm written as 1.0,
q/k/v heads interleaved wrongly, gate and up swapped) shows up as a logits mismatch far above 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness import config
from harness.io import DataError
from harness.models import convert, hf, mcore
from harness.models.base import load_policy
from harness.models.tokenizer import train_tokenizer

TEXTS = [f"question {i}: list {i % 7} colors and {i % 5} animals, then stop." for i in range(60)]
PROMPTS = ["question 3: list", "question 12: list 5 colors and", "then"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


def tiny(gqa: bool = True) -> config.Tiny:
    return config.Tiny(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                  intermediate_size=96, vocab_size=300)


@pytest.fixture(scope="module")
def pair(tok):
    """(hf policy, mcore policy) with identical weights; norms randomised so a dropped norm weight would show."""
    ph = hf.build_tiny(tiny(), tok, seed=7)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, p in ph.model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return ph, mcore.from_hf(ph)


def batch(tok, n=3, T=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tok), (n, T), generator=g)
    attn = torch.ones(n, T, dtype=torch.long)
    attn[1, T - 4:] = 0  # right padding
    return ids, attn


def test_conversion_round_trip_is_exact(pair):
    ph, pm = pair
    back = convert.mcore_to_hf(pm.model.full_state_dict(), pm.model.spec)
    ref = {k: v for k, v in ph.model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_qkv_layout_is_megatrons_group_interleaving():
    """Hand-made q/k/v rows: megatron's fused weight is, per KV group, that group's query heads, key, value."""
    s = convert.GPTSpec(num_layers=1, hidden_size=2, ffn_hidden_size=2, num_attention_heads=4, num_query_groups=2,
                  kv_channels=1, vocab_size=3, max_position_embeddings=8)
    q, k, v = (torch.tensor([[10.0 * r + c for c in range(2)] for r in rows]) for rows in ([0, 1, 2, 3], [4, 5], [6, 7]))
    fused = convert._qkv_fuse(q, k, v, s)
    assert fused[:, 0].tolist() == [0, 10, 40, 60, 20, 30, 50, 70]  # q0 q1 k0 v0 | q2 q3 k1 v1
    assert all(torch.equal(a, b) for a, b in zip(convert._qkv_split(fused, s), (q, k, v)))


@pytest.mark.parametrize("gqa,tied", [(True, True), (False, False)])
def test_logits_match_hf_within_1e5(tok, gqa, tied):
    ph = hf.build_tiny(tiny(gqa), tok, seed=3)
    if not tied:  # an untied head: lm_head its own weight
        ph.model.config.tie_word_embeddings = False
        ph.model.lm_head.weight = torch.nn.Parameter(torch.randn_like(ph.model.lm_head.weight) * 0.02)
    pm = mcore.from_hf(ph)
    assert pm.model.gpt.share_embeddings_and_output_weights is tied
    ids, attn = batch(tok)
    with torch.no_grad():
        a = ph.model(input_ids=ids, attention_mask=attn).logits
        b = pm.model(input_ids=ids, attention_mask=attn).logits
    keep = attn.bool()
    assert a.shape == b.shape
    assert (a - b)[keep].abs().max() < 1e-5


def test_packed_dpo_rows_match_hf(pair, tok):
    """The packed [prompt, chosen, rejected] row: 4D float mask and restarted positions, as train.pair_logps sends."""
    from harness.batches import encode, pack_pairs

    ph, pm = pair
    ch = [encode(tok, p, " 3 colors", 64) for p in PROMPTS]
    rj = [encode(tok, p, " animals and more", 64) for p in PROMPTS]
    ids, pos, mask, *_ = pack_pairs(ch, rj, tok.pad_token_id)
    with torch.no_grad():
        a = ph.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = pm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (a - b).abs().max() < 1e-5


def test_greedy_generation_same_tokens(pair):
    """megatron's KV cache (StaticInferenceContext, left padding) vs LeanLlama on the hf model."""
    from harness.generation.sampler import generate

    ph, pm = pair
    sp = config.SamplingParams(use_greedy=True, end_strings=[])
    lp = config.LengthParams(max_length=12, min_length=0)
    kw = dict(num_samples=2, sampling_params=sp, length_params=lp, seed_parts=[(1, i) for i in range(3)])
    a, b = generate(ph, PROMPTS, **kw), generate(pm, PROMPTS, **kw)
    assert [[x["num_tokens"] for x in o] for o in b] == [[12, 12]] * 3
    assert a == b


def test_sampled_generation_same_tokens(pair):
    from harness.generation.sampler import generate

    ph, pm = pair
    sp = config.SamplingParams(temperature=1.3, top_k=20, end_strings=[])
    kw = dict(num_samples=3, sampling_params=sp, length_params=config.LengthParams(max_length=10, min_length=2),
              seed_parts=[(5, i) for i in range(3)], batch_size=4)
    assert generate(ph, PROMPTS, **kw) == generate(pm, PROMPTS, **kw)


def test_one_dpo_step_same_loss_and_weights(tok):
    """train_dpo on each backend, one optimizer step: the same loss and the same updated weights.

    Adam's eps is large here: with eps=1e-8 a first step is lr * sign(g), which hides gradient differences where g is
    large and amplifies float noise where g is ~0; with eps=1e-3 the update is ~lr * g / eps, so the weights compare
    the gradients themselves."""
    from harness.train import train_dpo

    cfg = config.load(None, ["model.micro_batch_size=2", "model.global_batch_size=4", "model.optim.lr=1e-2",
                        "model.optim.eps=1e-3", "model.optim.weight_decay=0.0", "model.optim.sched.name=constant",
                        "trainer.self_rewarding.max_steps=1", "model.data.train_ds.max_seq_length=64",
                        "model.data.train_ds.shuffle=false"], warn=None)
    pairs = [{"prompt": TEXTS[i][:20], "chosen": TEXTS[i][20:], "rejected": TEXTS[i + 9][25:],
              "chosen_score": 4.0, "rejected_score": 1.0} for i in range(4)]
    ph = hf.build_tiny(tiny(), tok, seed=11)
    pm = mcore.from_hf(ph)
    before = {k: v.clone() for k, v in ph.model.state_dict().items()}
    ha, ma = train_dpo(ph, pairs, cfg, iteration=1), train_dpo(pm, pairs, cfg, iteration=1)
    assert ha[0]["train/loss"] == pytest.approx(ma[0]["train/loss"], abs=1e-6)
    assert ha[0]["grad_norm"] == pytest.approx(ma[0]["grad_norm"], rel=1e-5)
    after_m = convert.mcore_to_hf(pm.model.full_state_dict(), pm.model.spec)
    moved = max(float((ph.model.state_dict()[k] - before[k]).abs().max()) for k in after_m)
    diff = max(float((ph.model.state_dict()[k] - after_m[k]).abs().max()) for k in after_m)
    assert moved > 1e-3 and diff < 1e-6  # weights move by ~1e-2 (measured 9.9e-3); backends agree to 1.2e-7


def test_save_is_a_hf_directory_both_backends_load(pair, tmp_path):
    ph, pm = pair
    pm.save(tmp_path / "m", {"seed": 1})
    back = load_policy(tmp_path / "m", backend="hf")
    assert all(torch.equal(back.model.state_dict()[k], v) for k, v in ph.model.state_dict().items())
    again = load_policy(tmp_path / "m", backend="mcore")
    assert again.backend == "mcore" and again.config == {"seed": 1}
    ids, attn = batch(pm.tokenizer)
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids, attention_mask=attn).logits,
                           pm.model(input_ids=ids, attention_mask=attn).logits)


def test_unsupported_architecture_is_refused(tok):
    ph = hf.build_tiny(tiny(), tok, seed=1)
    ph.model.config.hidden_act = "gelu"
    with pytest.raises(DataError, match="hidden_act='gelu'"):
        mcore.from_hf(ph)


def test_bf16_precision_runs_under_autocast_close_to_fp32(pair):
    """trainer.precision=bf16 on mcore: megatron's layers under torch.autocast over fp32 weights, in training forward
    and in the KV-cached generation; logits within bf16 rounding of the fp32 ones."""
    from harness.generation.sampler import generate

    ph, pm = pair
    ids, attn = batch(pm.tokenizer)
    with torch.no_grad():
        ref = pm.model(input_ids=ids, attention_mask=attn).logits
        pm.precision = "bf16"
        try:
            with pm.autocast():
                low = pm.model(input_ids=ids, attention_mask=attn).logits
            out = generate(pm, PROMPTS, num_samples=1, sampling_params=config.SamplingParams(use_greedy=True, end_strings=[]),
                           length_params=config.LengthParams(max_length=4, min_length=4), seed_parts=[(0, i) for i in range(3)])
        finally:
            pm.precision = "32"
    assert low.dtype == torch.bfloat16 and next(pm.model.parameters()).dtype == torch.float32
    keep = attn.bool()
    assert 0 < (low.float() - ref)[keep].abs().max() < 0.05 * ref.abs().max()
    assert [o[0]["num_tokens"] for o in out] == [4, 4, 4]


def test_dpo_resume_state_round_trips_on_mcore(tok, tmp_path):
    """train.py's resume state (safetensors save_model/load_model, resume key) with the mcore wrapper: a run resumed
    from its step-1 state ends bit-identical to the uninterrupted run."""
    from harness.train import train_dpo

    cfg = config.load(None, ["model.micro_batch_size=2", "model.global_batch_size=2", "model.optim.lr=1e-3",
                        "trainer.self_rewarding.max_steps=2", "trainer.self_rewarding.save_interval=1",
                        "model.data.train_ds.max_seq_length=64"], warn=None)
    pairs = [{"prompt": TEXTS[i][:20], "chosen": TEXTS[i][20:], "rejected": TEXTS[i + 3][25:],
              "chosen_score": 3.0, "rejected_score": 1.0} for i in range(4)]
    ph = hf.build_tiny(tiny(), tok, seed=2)
    a, b = mcore.from_hf(ph), mcore.from_hf(ph)
    full = train_dpo(a, pairs, cfg, iteration=1, resume_dir=tmp_path / "ra")
    assert (tmp_path / "ra/state.json").is_file()  # the step-1 state of a 2-step run
    import shutil

    shutil.copytree(tmp_path / "ra", tmp_path / "rb")
    shutil.copy(tmp_path / "ra.ref_logps.safetensors", tmp_path / "rb.ref_logps.safetensors")
    state = json.loads((tmp_path / "rb/state.json").read_text())
    state["history"][0]["resumed_from_here"] = True  # proves step 1 came from the state, not from training again
    (tmp_path / "rb/state.json").write_text(json.dumps(state))
    resumed = train_dpo(b, pairs, cfg, iteration=1, resume_dir=tmp_path / "rb")
    assert resumed[0].pop("resumed_from_here") is True and resumed == full
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
