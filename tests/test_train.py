"""Training loops: the LR schedule by hand, accumulation equivalence, the DPO step against hand-computed losses,
and exact resume after a crash between save points."""

import json
import math

import pytest
import torch

from harness import config as C
from harness import train as T
from harness.config import Tiny
from harness.models.hf import build_tiny
from harness.models.tokenizer import train_tokenizer

TEXTS = [f"Sort these numbers: {a} {b} {c}\n{min(a, b, c)} {max(a, b, c)}" for a in range(10) for b in range(5)
         for c in range(3)]
SMALL = Tiny(hidden_size=32, num_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
PAIRS = [{"prompt": f"Sort these numbers: {i} {i + 3} {i + 1}\n", "chosen": f"{i} {i + 1} {i + 3}",
          "rejected": f"{i + 3} {i}", "chosen_score": 5.0, "rejected_score": 1.0 + (i % 3)} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


def cfg(*overrides):
    return C.load(None, ["model.micro_batch_size=2", "model.global_batch_size=4", "model.optim.lr=1e-2",
                         "model.optim.weight_decay=0.0", "model.optim.sched.warmup_steps=1",
                         "model.optim.sched.constant_steps=0", "model.optim.sched.min_lr=1e-3",
                         "trainer.self_rewarding.max_epochs=2", "trainer.self_rewarding.val_check_interval=100",
                         *overrides], warn=None)


def test_cosine_schedule_hand_worked():
    s = C.Sched(warmup_steps=2, constant_steps=1, min_lr=0.1)
    # total 7: warm-up 0.5, 1.0; cosine over 7-2-1 = 4 steps: 0.1 + 0.9*(1+cos(pi*k/4))/2; then held at min_lr
    got = [T.lr_at(i, 7, 1.0, s) for i in range(7)]
    want = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4)),
            0.1]
    assert got == pytest.approx(want, abs=1e-12)


def test_encode_masks_response_and_eos_and_cuts_prompt_from_left(tok):
    enc = T.encode(tok, "Sort these numbers: 1 2 3\n", "1 2 3", 64)
    r = tok("1 2 3", add_special_tokens=False)["input_ids"]
    assert enc.ids[-len(r) - 1:] == r + [tok.eos_token_id] and enc.response_len == len(r) + 1
    short = T.encode(tok, "Sort these numbers: 1 2 3\n", "1 2 3", len(r) + 3)
    assert len(short.ids) == len(r) + 3 and short.mask == [0, 0] + [1] * (len(r) + 1)


def test_micro_batch_split_gives_the_same_step(tok):
    """global 4 as 2 micro-batches of 2 == 1 micro-batch of 4: accumulation is a mean over the global batch."""
    a, b = build_tiny(SMALL, tok, seed=1), build_tiny(SMALL, tok, seed=1)
    ha = T.train_dpo(a, PAIRS[:4], cfg("model.micro_batch_size=2", "trainer.self_rewarding.max_epochs=1"),
                     iteration=1)
    hb = T.train_dpo(b, PAIRS[:4], cfg("model.micro_batch_size=4", "trainer.self_rewarding.max_epochs=1"),
                     iteration=1)
    assert ha[0]["train/loss"] == pytest.approx(hb[0]["train/loss"], rel=1e-6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-4)  # lr 1e-2: a wrong mean is ~1e-2 off


def test_first_dpo_step_loss_is_log2_and_metrics_named(tok):
    """At step 1 the policy is the reference: every logratio is 0, so dpo = -logsigmoid(0) = log 2."""
    p = build_tiny(SMALL, tok, seed=2)
    h = T.train_dpo(p, PAIRS[:4], cfg("trainer.self_rewarding.max_epochs=1"), iteration=1)
    assert h[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert h[0]["train/rewards_chosen_mean"] == pytest.approx(0.0, abs=1e-6)
    assert h[0]["train/chosen_generated_rewards"] == 5.0
    assert h[0]["train/rejected_generated_rewards"] == pytest.approx(sum(1.0 + (i % 3) for i in range(4)) / 4)
    for k in ("train/preference_loss", "train/sft_loss", "train/acc", "train/rewards_rejected_mean",
              "train/chosen_lengths", "train/reject_lengths", "grad_norm", "lr"):
        assert k in h[0]


def test_dpo_raises_chosen_over_rejected(tok):
    p = build_tiny(SMALL, tok, seed=3)
    c = cfg("trainer.self_rewarding.max_epochs=6")
    ch = [T.encode(tok, x["prompt"], x["chosen"], 64) for x in PAIRS]
    rj = [T.encode(tok, x["prompt"], x["rejected"], 64) for x in PAIRS]
    before = torch.sub(*T.reference_logps(p, ch, rj, False, 8))
    h = T.train_dpo(p, PAIRS, c, iteration=1)
    after = torch.sub(*T.reference_logps(p, ch, rj, False, 8))
    assert (after - before).mean() > 1.0  # the margin log pi(c) - log pi(r) grew on the training pairs
    assert h[-1]["train/acc"] == 1.0 and h[-1]["train/loss"] < math.log(2)


def test_per_iteration_beta_is_used(tok):
    """beta comes from the iteration's entry. Adam's first step is scale-free, so after it both runs have (almost)
    the same logratios and the implicit rewards beta * logratio differ by the beta ratio 2.0 / 0.1 = 20."""
    c = cfg("trainer.self_rewarding.max_epochs=1", "trainer.self_rewarding.max_iterations=3",
            "model.spin.ref_policy_kl_penalty=[0.1,0.5,2.0]")
    h0 = T.train_dpo(build_tiny(SMALL, tok, seed=4), PAIRS[:8], c, iteration=0)
    h2 = T.train_dpo(build_tiny(SMALL, tok, seed=4), PAIRS[:8], c, iteration=2)
    assert h2[1]["train/rewards_chosen_mean"] / h0[1]["train/rewards_chosen_mean"] == pytest.approx(20, rel=0.02)


def test_resume_after_crash_is_bit_identical(tok, tmp_path, monkeypatch):
    c = cfg("trainer.self_rewarding.save_interval=2", "trainer.self_rewarding.max_epochs=2")
    ref = build_tiny(SMALL, tok, seed=5)
    T.train_dpo(ref, PAIRS, c, iteration=1)

    crashed = build_tiny(SMALL, tok, seed=5)
    real_save, calls = T._save_state, []

    def save_then_crash(*a, **k):
        real_save(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after the step-4 save point")

    monkeypatch.setattr(T, "_save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        T.train_dpo(crashed, PAIRS, c, iteration=1, resume_dir=tmp_path / "resume")
    resumed = build_tiny(SMALL, tok, seed=5)  # a fresh process would reload M_t; the state file overrides it
    h = T.train_dpo(resumed, PAIRS, c, iteration=1, resume_dir=tmp_path / "resume")
    assert h[0]["step"] == 1 and h[-1]["step"] == 6  # history restored, then continued
    for (n, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_corrupt_resume_state_is_reported(tok, tmp_path):
    d = tmp_path / "resume"
    d.mkdir()
    policy = build_tiny(SMALL, tok, seed=6)
    key = T.resume_key(PAIRS, C.to_dict(cfg()), 1, policy.model)  # a state written for these very inputs
    (d / "state.json").write_text(json.dumps({"step": 2, "history": [], "key": key}))
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(Exception, match="corrupt resume state"):
        T.train_dpo(policy, PAIRS, cfg(), iteration=1, resume_dir=d)


def _pairs_enc(tok, pairs):
    ch = [T.encode(tok, p["prompt"], p["chosen"], 256) for p in pairs]
    rj = [T.encode(tok, p["prompt"], p["rejected"], 256) for p in pairs]
    return ch, rj


@pytest.mark.parametrize("average", [False, True])
def test_shared_prompt_packing_gives_the_unpacked_logps_and_gradients(tok, average):
    """[prompt, chosen, rejected] in one row (rejected masked off chosen, positions restarted) == two sequences."""
    policy = build_tiny(SMALL, tok, seed=3)
    ch, rj = _pairs_enc(tok, PAIRS[:5])
    weights = torch.arange(1.0, 11.0)
    ids, attn, mask = T.collate(ch + rj, tok.pad_token_id)
    ref = T.sequence_logps(T._logits(policy.model, ids, attn), ids, mask, average=average)
    (ref * weights).sum().backward()
    ref_grads = [p.grad.clone() for p in policy.model.parameters()]
    policy.model.zero_grad()
    packed = T.pack_pairs(ch, rj, tok.pad_token_id)
    assert packed is not None and packed[0].numel() < ids.numel()  # the prompt is computed once
    c, r, sft, c_len, r_len = T.pair_logps(policy.model, ch, rj, tok.pad_token_id, average, sft_average=True)
    (torch.cat([c, r]) * weights).sum().backward()
    assert torch.allclose(torch.cat([c, r]), ref, atol=1e-5, rtol=1e-5)
    for p, g in zip(policy.model.parameters(), ref_grads):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)
    assert c_len.tolist() == mask[:5].sum(1).tolist() and r_len.tolist() == mask[5:].sum(1).tolist()
    assert torch.allclose(sft.detach(), T.sequence_logps(T._logits(policy.model, ids, attn), ids, mask, average=True)[:5],
                          atol=1e-5)


def test_packing_falls_back_when_prompts_differ(tok):
    ch, rj = _pairs_enc(tok, PAIRS[:2])
    rj[1] = T.encode(tok, "Sort these numbers: 9 9 9\n", "9 9 9", 256)
    assert T.pack_pairs(ch, rj, tok.pad_token_id) is None
    policy = build_tiny(SMALL, tok, seed=3)
    c, r, *_ = T.pair_logps(policy.model, ch, rj, tok.pad_token_id, False)
    ids, attn, mask = T.collate(ch + rj, tok.pad_token_id)
    assert torch.allclose(torch.cat([c, r]), T.sequence_logps(T._logits(policy.model, ids, attn), ids, mask), atol=1e-6)


def _crash_at_first_save(tok, c, resume_dir, monkeypatch):
    """train_dpo killed right after its first save point (as SIGKILL would leave it)."""
    real_save = T._save_state

    def crash(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "_save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        T.train_dpo(build_tiny(SMALL, tok, seed=5), PAIRS, c, iteration=1, resume_dir=resume_dir)
    monkeypatch.setattr(T, "_save_state", real_save)


def test_reference_logps_are_cached_on_disk_and_not_recomputed_on_resume(tok, tmp_path, monkeypatch):
    c = cfg("trainer.self_rewarding.save_interval=2")
    _crash_at_first_save(tok, c, tmp_path / "resume", monkeypatch)
    assert T.ref_cache_path(tmp_path / "resume").exists()
    monkeypatch.setattr(T, "reference_logps", lambda *a, **k: pytest.fail("reference log-probs recomputed"))
    h = T.train_dpo(build_tiny(SMALL, tok, seed=5), PAIRS, c, iteration=1, resume_dir=tmp_path / "resume")
    assert h[0]["step"] == 1 and h[-1]["step"] == 6


def test_resume_state_of_other_inputs_is_ignored(tok, tmp_path, monkeypatch):
    """A crash, then a changed param: the stale resume state and reference cache must not be used."""
    c = cfg("trainer.self_rewarding.save_interval=2")
    _crash_at_first_save(tok, c, tmp_path / "resume", monkeypatch)
    changed = cfg("trainer.self_rewarding.save_interval=2", "model.spin.ref_policy_kl_penalty=0.3")
    fresh = build_tiny(SMALL, tok, seed=5)
    T.train_dpo(fresh, PAIRS, changed, iteration=1)
    after_crash = build_tiny(SMALL, tok, seed=5)
    h = T.train_dpo(after_crash, PAIRS, changed, iteration=1, resume_dir=tmp_path / "resume")
    assert [r["step"] for r in h if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    for (n, a), b in zip(fresh.model.state_dict().items(), after_crash.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_group_by_length_keeps_every_item_and_groups_lengths():
    import random

    lengths = [40, 95, 140] * 40  # answers, judgements, meta-judgements
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    out = T.group_by_length(order, lengths, gbs=8, rng=random.Random(1), chunk=5)
    assert sorted(out) == list(range(len(lengths)))
    batches = [out[i:i + 8] for i in range(0, len(out), 8)]
    pad = sum(8 * max(lengths[j] for j in b) - sum(lengths[j] for j in b) for b in batches)
    mixed = sum(8 * max(lengths[j] for j in order[i:i + 8]) - sum(lengths[j] for j in order[i:i + 8])
                for i in range(0, len(order), 8))
    assert pad < 0.25 * mixed  # padding of length-grouped batches vs the shuffled order's
    assert T.group_by_length(order, lengths, 8, random.Random(1), 5) == out  # a pure function of the rng
